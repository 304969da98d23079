"""GPTQ on SmolLM2-135M: qalign against llm-compressor, same model, tokens, spec; one process each.

    python benchmarks/gptq_smollm2.py --lc-python /path/to/lc-venv/bin/python \
        --samples 128 --seq-len 512 --bits 3 --group-size 64 --dtype float32 bfloat16 \
        --out results/bench-gptq

The calibration blocks (a qalign DataBudget of the embedded Wikipedia train split) and the
held-out windows are written once to a safetensors file that both sides read. For each compute
dtype (the model's weights and activations; both libraries keep their Hessians and solves in
float32 or wider), each side runs in a fresh process, one after the other, and reports its
quantization seconds, whole-process wall time and peak RSS (ru_maxrss; qalign's also by phase:
after loading, while quantizing, while evaluating) and the held-out perplexity. qalign tunes
glibc's allocator first, as its command line does (`ptq.allocator`); llm-compressor runs once per
--lc-allocator: with glibc's defaults, as a user gets it, and with the same settings given as
environment variables, which isolates the libraries' own work. Without --lc-python only qalign
runs. (llm-compressor pins its own transformers: `python -m venv lc &&
lc/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1`.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

T_START = time.perf_counter()


def prepare(args) -> Path:
    from safetensors.torch import save_file

    from compare.data import DataBudget, load_text, tokenize
    from compare.evaluate import eval_windows
    from compare.models import load_model, prepare_embedded

    _, tok = load_model("smollm2-135m", with_tokenizer=True)
    text = load_text("wiki")
    calib = DataBudget(args.samples, args.seq_len, args.seed).blocks(tokenize(tok, text.train))
    windows = eval_windows(tokenize(tok, text.heldout), args.seq_len, args.max_tokens)
    path = args.out / "tokens.safetensors"
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"calib": calib.contiguous(), "eval": windows.contiguous()}, str(path))
    args.model_dir = prepare_embedded("smollm2-135m")
    return path


def run_ours(args) -> None:
    """The qalign side, in its own process: load, quantize (gptq), evaluate, report JSON."""
    import torch
    from safetensors.torch import load_file

    from compare.evaluate import evaluate_nll
    from compare.memory import PeakRSS, current_rss
    from compare.models import load_model
    from ptq.allocator import tune_allocator
    from ptq.gptq import GPTQOptions
    from ptq import quantize_model

    tuned = tune_allocator()
    tokens = load_file(args.tokens)
    dtype = getattr(torch, args.dtype[0])
    model, _ = load_model("smollm2-135m", with_tokenizer=False, dtype=dtype)
    loaded = current_rss()
    spec = f"int{args.bits}{'-sym' if args.sym else ''}-g{args.group_size}"
    options = GPTQOptions(act_order=not args.no_act_order, clip_search=not args.no_clip_search)
    t0 = time.perf_counter()
    with PeakRSS() as quantizing:
        quantize_model(model, spec, "gptq", options, calib=tokens["calib"], progress=False)
    quantize_seconds = time.perf_counter() - t0
    with PeakRSS() as evaluating:
        ev = evaluate_nll(model, tokens["eval"], progress=False)
    print(json.dumps({"library": "qalign", "dtype": args.dtype[0], "spec": spec,
                      "allocator": "tuned" if tuned else "default",
                      "options": vars(options),
                      "quantize_seconds": quantize_seconds, "nll": ev.nll,
                      "perplexity": math.exp(ev.nll),
                      "wall_seconds": time.perf_counter() - T_START,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rss_loaded_bytes": loaded, "peak_rss_quantize_bytes": quantizing.peak,
                      "peak_rss_evaluate_bytes": evaluating.peak}))


def child(cmd: list[str], env: dict | None = None) -> dict:
    print("$", *(f"{k}={v}" for k, v in (env or {}).items()), " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=None if env is None else {**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=128, help="calibration blocks (default: 128)")
    p.add_argument("--seq-len", type=int, default=512, help="block length (default: 512)")
    p.add_argument("--seed", type=int, default=0, help="calibration draw seed (default: 0)")
    p.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens (default: 16384)")
    p.add_argument("--bits", type=int, default=3, help="weight bits (default: 3)")
    p.add_argument("--group-size", type=int, default=64, help="group size (default: 64)")
    p.add_argument("--sym", action="store_true", help="symmetric grid on both sides")
    p.add_argument("--no-act-order", action="store_true", help="qalign without act_order")
    p.add_argument("--no-clip-search", action="store_true", help="qalign without MSE clipping")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="compute dtypes, each a row per library (default: float32)")
    p.add_argument("--lc-python", help="python of a venv with llmcompressor (else qalign only)")
    p.add_argument("--lc-allocator", nargs="+", default=["default", "tuned"],
                   choices=["default", "tuned"],
                   help="llm-compressor's malloc settings, a row each: glibc's defaults and/or "
                        "qalign's, as environment variables (default: both)")
    p.add_argument("--out", type=Path, default=Path("results/bench-gptq"), help="output folder")
    p.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ours:
        run_ours(args)
        return

    from ptq.allocator import ALLOCATOR_ENV

    tokens = prepare(args)
    rows = []
    script = str(Path(__file__).with_name("llmcompressor_gptq.py"))
    for dtype in args.dtype:
        flags = ["--bits", str(args.bits), "--group-size", str(args.group_size), "--dtype", dtype]
        flags += ["--sym"] if args.sym else []
        rows.append(child([sys.executable, __file__, "--ours", "--tokens", str(tokens), *flags,
                           *(["--no-act-order"] if args.no_act_order else []),
                           *(["--no-clip-search"] if args.no_clip_search else [])]))
        for allocator in args.lc_allocator if args.lc_python else []:
            row = child([args.lc_python, script, "--model", str(args.model_dir),
                         "--tokens", str(tokens), *flags],
                        env=ALLOCATOR_ENV if allocator == "tuned" else None)
            rows.append({**row, "allocator": allocator})
    from compare.io import write_json
    from recipes.shared.common import versions

    write_json(args.out / "results.json", {"args": {k: str(v) for k, v in vars(args).items()},
                                           "versions": versions(), "rows": rows})
    print(f"\n{args.samples} x {args.seq_len} calibration tokens, int{args.bits} "
          f"{'sym' if args.sym else 'asym'} g{args.group_size}")
    print("| library | dtype | allocator | quantize s | whole run s | peak RSS GB | perplexity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['library']} | {r['dtype']} | {r['allocator']} | {r['quantize_seconds']:.1f} | "
              f"{r['wall_seconds']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
              f"{r['perplexity']:.2f} |")


if __name__ == "__main__":
    main()

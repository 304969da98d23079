"""GPTQ on SmolLM2-135M in float32 and bfloat16: time, perplexity, memory growth, eval speed.

    python -m benchmarks.gptq_dtype --out docs/results/bench-dtype

Every row runs in a fresh process (so peak RSS is that row's own), one after the other, on the
same calibration blocks (a qalign DataBudget of n x 512 tokens of the embedded Wikipedia train
split, seed 0, as benchmarks/gptq_smollm2.py draws them) and the same held-out windows (the
first 16,384 held-out tokens in 512-token windows), written once to a safetensors file that each
row reads; no row tokenizes text, so the tokenizer's working memory is not in any row.

Rows:
  1. GPTQ int3 sym g64 (act_order, MSE clipping: the method's defaults) on 128 x 512 tokens,
     model loaded in float32 and in bfloat16: quantization seconds, held-out perplexity,
     whole-process peak RSS; then evaluation speed on the quantized model, input tokens per second
     of `compare.evaluate.evaluate_nll` against a plain transformers loop
     (`model(input_ids=b, labels=b).loss` per batch of 2 windows) on the same windows.
  2. Memory growth with the calibration budget, bfloat16, 16 / 64 / 128 / 256 x 512 tokens
     (quantization only): the process RSS before quantizing (model and token ids loaded) and the
     peak sampled during `quantize_model`, and their difference; with --offload, the largest
     budget again with the block inputs offloaded to disk. With --budget-s, growth rows that
     would not finish in time are skipped (and listed as skipped in results.json).
  3. Evaluation speed without the noise of rows run at different times: float32 and bfloat16
     models in one process, `evaluate_nll` and the plain loop interleaved, best of 2 rounds on
     8 windows.
The machine, thread count and library versions go into results.json with the rows.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()
SPEC = "int3-sym-g64"


def prepare(args) -> Path:
    """Calibration blocks for every budget and the held-out windows, in one safetensors file."""
    from safetensors.torch import save_file

    from compare.data import DataBudget, load_text, tokenize
    from compare.evaluate import eval_windows
    from compare.models import load_model

    _, tok = load_model("smollm2-135m", with_tokenizer=True)
    text = load_text("wiki")
    train = tokenize(tok, text.train)
    tensors = {f"calib{n}": DataBudget(n, args.seq_len, 0).blocks(train).contiguous()
               for n in sorted({args.samples, *args.growth})}
    tensors["eval"] = eval_windows(tokenize(tok, text.heldout), args.seq_len,
                                   args.max_tokens).contiguous()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "tokens.safetensors"
    save_file(tensors, str(path))
    return path


def plain_forward_eval(model, windows, batch_size: int = 2) -> dict:
    """Mean NLL and input tokens/s of a bare transformers loop with labels= (its own loss)."""
    import torch

    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch in windows.split(batch_size):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += float(loss) * n
            count += n
    seconds = time.perf_counter() - t0
    return {"nll": total / count, "seconds": seconds,
            "tokens_per_second": windows.numel() / seconds}


def run_row(args) -> None:
    """One row, in its own process: load, quantize, optionally evaluate; JSON on stdout."""
    import torch
    from safetensors.torch import load_file

    import ptq
    from compare.dtypes import describe_dtype_choice, resolve_dtype
    from compare.evaluate import evaluate_nll
    from compare.memory import PeakRSS, current_rss
    from compare.models import load_model

    tokens = load_file(args.tokens)
    calib, windows = tokens[f"calib{args.samples}"], tokens["eval"]
    dtype = resolve_dtype(args.dtype, "cpu")
    model, _ = load_model("smollm2-135m", dtype=dtype, with_tokenizer=False)
    with torch.no_grad():  # page in weights that loading left memory-mapped, so that they
        for p in model.parameters():  # count in "before", not in the growth
            p.sum()
    row = {"dtype": str(dtype).removeprefix("torch."),
           "dtype_reason": describe_dtype_choice(args.dtype, "cpu"),
           "samples": args.samples, "seq_len": calib.shape[1], "spec": SPEC,
           "offload": bool(args.offload_dir), "rss_before_quantize_bytes": current_rss()}
    kw = {}
    if args.offload_dir:
        kw["offload_dir"] = args.offload_dir
    t0, c0 = time.perf_counter(), time.process_time()
    with PeakRSS() as peak:
        if "offload_dir" in inspect.signature(ptq.quantize_model).parameters or not kw:
            ptq.quantize_model(model, SPEC, "gptq", calib=calib, progress=False, **kw)
        else:  # quantize_model without the option yet: the driver it calls, directly
            from ptq.sequential import quantize_blocks

            m = ptq.get_method("gptq")
            quantize_blocks(model, calib, ptq.parse_spec(SPEC), m, m.resolve_options(None),
                            dict(ptq.quantizable_linears(model)), progress=False, **kw)
    row["quantize_seconds"] = time.perf_counter() - t0
    # CPU seconds of all this process's threads: less inflated than wall time when other
    # processes share the cores
    row["quantize_cpu_seconds"] = time.process_time() - c0
    row["quantize_peak_rss_bytes"] = peak.peak
    row["quantize_rss_growth_bytes"] = peak.peak - row["rss_before_quantize_bytes"]
    if args.evaluate:
        with torch.no_grad():
            model(input_ids=windows[:1, :64])  # warm up both paths alike
        ev = evaluate_nll(model, windows, batch_size=2, progress=False)
        plain = plain_forward_eval(model, windows, batch_size=2)
        row.update(nll=ev.nll, perplexity=math.exp(ev.nll), eval_windows=ev.n_windows,
                   eval_tokens_per_second=ev.tokens_per_second, eval_seconds=ev.seconds,
                   plain_forward_tokens_per_second=plain["tokens_per_second"],
                   plain_forward_seconds=plain["seconds"], plain_forward_nll=plain["nll"])
    row["threads"] = torch.get_num_threads()
    row["wall_seconds"] = time.perf_counter() - T_START
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(row))


def run_eval_speed(args) -> None:
    """Evaluation tokens/s of evaluate_nll and of a plain transformers loop, float32 and bfloat16
    models in one process, interleaved (so a change in the machine's load hits all four alike),
    best of `--speed-rounds`; on the FP model (the speed does not depend on the weights' values)."""
    import torch
    from safetensors.torch import load_file

    from compare.evaluate import evaluate_nll
    from compare.models import load_model

    windows = load_file(args.tokens)["eval"][: args.speed_windows]
    models = {d: load_model("smollm2-135m", dtype=getattr(torch, d), with_tokenizer=False)[0]
              for d in ("float32", "bfloat16")}
    best: dict[str, float] = {}
    nll: dict[str, float] = {}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=windows[:1, :64])  # warm up
        for _ in range(args.speed_rounds):
            for d, m in models.items():
                ev = evaluate_nll(m, windows, batch_size=2, progress=False)
                plain = plain_forward_eval(m, windows, batch_size=2)
                for key, v in ((f"evaluate_nll_{d}", ev.tokens_per_second),
                               (f"plain_forward_{d}", plain["tokens_per_second"])):
                    best[key] = max(best.get(key, 0.0), v)
                nll[d] = ev.nll
    print(json.dumps({"eval_speed": True, "windows": list(windows.shape),
                      "rounds": args.speed_rounds, "best_tokens_per_second": best,
                      "fp_nll": nll, "threads": torch.get_num_threads(),
                      "wall_seconds": time.perf_counter() - T_START}))


def run_child(cmd: list[str]) -> dict:
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {time.perf_counter() - t0:.0f} s: {json.dumps(row)}", flush=True)
    return row


def child(args, tokens: Path, dtype: str, samples: int, evaluate: bool,
          offload_dir: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.gptq_dtype", "--row", "--tokens", str(tokens),
           "--dtype", dtype, "--samples", str(samples)]
    cmd += ["--evaluate"] if evaluate else []
    cmd += ["--offload-dir", offload_dir] if offload_dir else []
    return run_child(cmd)


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def tables(rows: list[dict], speed: dict | None) -> str:
    main = [r for r in rows if "perplexity" in r]
    lines = ["| dtype | quantize s (wall) | quantize CPU s | perplexity | "
             "whole-process peak RSS GB | evaluate_nll tok/s | plain transformers loop tok/s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['quantize_seconds']:.1f} | "
              f"{r['quantize_cpu_seconds']:.0f} | {r['perplexity']:.2f} | "
              f"{_gb(r['peak_rss_bytes'])} | {r['eval_tokens_per_second']:.0f} | "
              f"{r['plain_forward_tokens_per_second']:.0f} |" for r in main]
    lines += ["", "| dtype | calibration | offload | RSS before GB | peak while quantizing GB | "
              "growth GB | quantize s (wall) | quantize CPU s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["dtype"], r["offload"], r["samples"])):
        lines.append(f"| {r['dtype']} | {r['samples']} x {r['seq_len']} | "
                     f"{'disk' if r['offload'] else 'memory'} | "
                     f"{_gb(r['rss_before_quantize_bytes'])} | "
                     f"{_gb(r['quantize_peak_rss_bytes'])} | "
                     f"{_gb(r['quantize_rss_growth_bytes'])} | {r['quantize_seconds']:.1f} | "
                     f"{r['quantize_cpu_seconds']:.0f} |")
    if speed:
        b = speed["best_tokens_per_second"]
        lines += ["", f"Evaluation, {speed['windows'][0]} windows x {speed['windows'][1]} tokens, "
                  f"batch 2, best of {speed['rounds']} interleaved rounds (input tokens/s):", "",
                  "| dtype | evaluate_nll | plain transformers loop | ratio |", "|---|---|---|---|"]
        lines += [f"| {d} | {b[f'evaluate_nll_{d}']:.0f} | {b[f'plain_forward_{d}']:.0f} | "
                  f"{b[f'evaluate_nll_{d}'] / b[f'plain_forward_{d}']:.2f} |"
                  for d in ("float32", "bfloat16")]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=128,
                   help="calibration blocks of the fp32-vs-bf16 rows (default: 128)")
    p.add_argument("--seq-len", type=int, default=512, help="block length (default: 512)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="held-out tokens evaluated (default: 16384)")
    p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"],
                   help="dtypes of the comparison rows; none: skip them "
                        "(default: float32 bfloat16)")
    p.add_argument("--growth", type=int, nargs="*", default=[16, 64, 128, 256],
                   help="calibration budgets of the memory-growth rows, in bfloat16; the "
                        "comparison row's budget is not run twice (default: 16 64 128 256)")
    p.add_argument("--offload", action="store_true",
                   help="also run the largest growth budget with block inputs offloaded to disk")
    p.add_argument("--budget-s", type=float, default=0,
                   help="skip growth rows that would take the whole run past this many seconds "
                        "(default: 0, run them all)")
    p.add_argument("--speed-rounds", type=int, default=2,
                   help="interleaved rounds of the evaluation-speed measurement; 0 skips it "
                        "(default: 2)")
    p.add_argument("--speed-windows", type=int, default=8,
                   help="held-out windows of the evaluation-speed measurement (default: 8)")
    p.add_argument("--results", default="results.json",
                   help="results file name inside --out (default: results.json)")
    p.add_argument("--out", type=Path, default=Path("docs/results/bench-dtype"),
                   help="output folder (default: docs/results/bench-dtype)")
    p.add_argument("--row", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--eval-speed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--offload-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        run_row(args)
        return
    if args.eval_speed:
        run_eval_speed(args)
        return

    from compare.io import write_json
    from recipes.shared.common import versions

    tokens = prepare(args)
    rows: list[dict] = []
    skipped: list[dict] = []
    speed = None

    def save(complete: bool) -> None:  # after every row, so a killed run keeps what it measured
        write_json(args.out / args.results, {
            "command": "python -m benchmarks.gptq_dtype " + " ".join(sys.argv[1:]),
            "args": {k: str(v) for k, v in vars(args).items() if k in
                     ("samples", "seq_len", "max_tokens", "dtypes", "growth", "offload",
                      "budget_s", "speed_rounds", "speed_windows")},
            "spec": SPEC, "versions": versions(), "cpu_count": os.cpu_count(),
            "total_seconds": time.perf_counter() - T_START, "complete": complete,
            "rows": rows, "skipped": skipped, "eval_speed": speed})

    for d in args.dtypes:
        rows.append(child(args, tokens, d, args.samples, evaluate=True))
        save(False)
    if args.speed_rounds:
        speed = run_child([sys.executable, "-m", "benchmarks.gptq_dtype", "--eval-speed",
                           "--tokens", str(tokens), "--speed-rounds", str(args.speed_rounds),
                           "--speed-windows", str(args.speed_windows)])
        save(False)
    done = {(r["dtype"], r["samples"]) for r in rows}
    # growth rows, smallest first; a row whose estimated time would pass --budget-s is skipped
    # (estimate: the bf16 comparison row's wall time, scaled by the budget, at least 1/4 of it)
    ref = next((r for r in rows if r["dtype"] == "bfloat16"), rows[-1] if rows else None)
    plan = [(n, False) for n in sorted(args.growth) if ("bfloat16", n) not in done]
    plan += [(max(args.growth), True)] if args.offload and args.growth else []
    for n, offload in plan:
        estimate = ref["wall_seconds"] * max(n / ref["samples"], 0.25) if ref else 0.0
        if args.budget_s and time.perf_counter() - T_START + estimate > args.budget_s:
            skipped.append({"samples": n, "offload": offload, "estimated_seconds": estimate})
            print(f"  skipped {n} x {args.seq_len} (offload={offload}): ~{estimate:.0f} s "
                  f"would pass --budget-s {args.budget_s}", flush=True)
            continue
        if offload:
            with tempfile.TemporaryDirectory(prefix="bench-offload-", dir=args.out) as d:
                rows.append(child(args, tokens, "bfloat16", n, evaluate=False, offload_dir=d))
        else:
            rows.append(child(args, tokens, "bfloat16", n, evaluate=False))
        save(False)
    tokens.unlink()  # regenerated from the data on every run; not a result
    save(True)
    table = tables(rows, speed)
    print(table)
    print(f"\ntotal {time.perf_counter() - T_START:.0f} s")


if __name__ == "__main__":
    main()

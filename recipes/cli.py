"""The `qalign` command line: prepare, quantize, eval, recipe.

    qalign prepare                      # embedded model and text, offline
    qalign quantize --spec int3-g64 --out runs/rtn-int3
    qalign eval --model runs/rtn-int3
    qalign recipe ptq-table --out results/ptq-table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from compare.data import DataBudget, DataError, load_text, tokenize
from compare.evaluate import eval_windows, evaluate_nll
from compare.io import write_csv, write_json
from compare.models import EMBEDDED_MODELS, ModelError, load_model, prepare_embedded
from ptq.checkpoint import save_quantized
from ptq.formats import SpecError, parse_spec
from recipes import misalignment, ptq_table, same_budget
from recipes.finetune import add_finetune_args, finetune_model
from recipes.common import resolve_device, versions
from recipes.quantization import add_budget_args, add_method_args, layer_table, method_options, run_ptq

RECIPES = {"misalignment": misalignment, "ptq-table": ptq_table, "same-budget": same_budget}


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name, local model folder or hub id (default: smollm2-135m)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a hub model's own Python code to run (off by default)")


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="wiki",
                   help="'wiki' (embedded), a text file, or hf:NAME[:CONFIG] (default: wiki)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="evaluation window, and calibration block length (default: 512)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="held-out tokens evaluated (default: 16384)")
    p.add_argument("--batch-size", type=int, default=2, help="windows per forward (default: 2)")


def cmd_prepare(args) -> None:
    names = list(EMBEDDED_MODELS) if args.model == "all" else [args.model]
    for name in names:
        t0 = time.perf_counter()
        path = prepare_embedded(name, force=args.force)
        print(f"model {name}: {path} ({time.perf_counter() - t0:.1f} s)")
    splits = load_text(args.data)
    print(f"text {splits.name}: train {len(splits.train):,} chars, "
          f"held-out {len(splits.heldout):,} chars")


def cmd_quantize(args) -> None:
    spec = parse_spec(args.spec)
    method_options(args)  # fail on a foreign flag before loading anything
    model, tokenizer = load_model(args.model, device=resolve_device(args.device),
                                  trust_remote_code=args.trust_remote_code)
    report = run_ptq(model, tokenizer, args)
    quantized = report.pop("_quantized")
    out = Path(args.out)
    save_quantized(model, quantized, out, {"method": args.method, "source_model": args.model})
    tokenizer.save_pretrained(out)
    write_json(out / "qalign-quant.json", {"source_model": args.model, **report,
                                           "versions": versions()})
    write_csv(out / "layers.csv", report["layers"])
    print(layer_table(report["layers"]))
    print(f"{args.method} {spec}: {len(report['layers'])} layers in {report['seconds']:.1f} s "
          f"-> {out}")


def cmd_eval(args) -> None:
    spec = parse_spec(args.spec) if args.spec else None  # fail on a bad spec before loading
    if spec is not None:
        method_options(args)
    model, tokenizer = load_model(args.model, device=resolve_device(args.device),
                                  trust_remote_code=args.trust_remote_code)
    text = load_text(args.data)  # once: calibration (train split) and evaluation (held-out)
    if args.spec:
        report = run_ptq(model, tokenizer, args, text=text)
        print(f"{args.method} {spec}: {len(report['layers'])} layers in "
              f"{report['seconds']:.1f} s")
    windows = eval_windows(tokenize(tokenizer, text.heldout), args.seq_len, args.max_tokens)
    result = evaluate_nll(model, windows, batch_size=args.batch_size)
    row = {"model": args.model, "data": args.data, "method": args.method if args.spec else "fp",
           "spec": str(spec) if spec else None, **result.to_dict()}
    print(json.dumps(row, indent=1))
    if args.json:
        write_json(args.json, row)


def cmd_finetune(args) -> None:
    if (args.mode == "fp") == (args.spec is not None):
        raise SystemExit("give --spec with --mode qaft/lora, and no --spec with --mode fp")
    spec = parse_spec(args.spec) if args.spec else None
    model, tokenizer = load_model(args.model, device=resolve_device(args.device),
                                  trust_remote_code=args.trust_remote_code)
    budget = DataBudget(args.samples, args.seq_len, args.budget_seed)
    calib = budget.blocks(tokenize(tokenizer, load_text(args.data).train))
    model, codes, result, info = finetune_model(model, calib, str(spec) if spec else None, args)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: every rank holds the same result
        return
    out = Path(args.out)
    if codes is None:
        model.save_pretrained(out)
    else:
        save_quantized(model, codes, out, {"method": f"{args.mode}", "source_model": args.model})
    tokenizer.save_pretrained(out)
    write_json(out / "qalign-finetune.json", {
        "source_model": args.model, "spec": str(spec) if spec else None, **info,
        "budget": {"data": args.data, **asdict(budget), "unique_tokens": budget.unique_tokens},
        "steps": result.steps, "tokens_processed": result.tokens_processed,
        "unique_tokens": result.unique_tokens, "train_seconds": result.seconds,
        "history": result.history, "versions": versions()})
    last = result.history[-1]
    print(f"{args.mode} {spec or 'fp'}: {result.steps} steps, {result.tokens_processed:,} tokens "
          f"({result.unique_tokens:,} unique), final loss {last['loss']:.4f}, "
          f"{info['seconds']:.0f} s -> {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qalign", description="Local vs global loss of quantized LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare", help="convert the embedded model and check the embedded text",
                       description="Convert the embedded GGUF model to fp32 safetensors in the "
                                   "cache (once) and load the embedded text.")
    s.add_argument("--model", default="smollm2-135m",
                   help=f"embedded model, or 'all' (have: {', '.join(EMBEDDED_MODELS)})")
    s.add_argument("--data", default="wiki", help="text source to check (default: wiki)")
    s.add_argument("--force", action="store_true", help="convert again even if cached")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("quantize", help="quantize a model and save it",
                       description="Quantize every linear layer of the decoder blocks and save "
                                   "the model (safetensors) with a qalign-quant.json report.")
    _model_args(s)
    add_method_args(s, spec_required=True)
    add_budget_args(s)
    s.add_argument("--data", default="wiki",
                   help="calibration text: 'wiki', a text file or hf:NAME[:CONFIG] (default: wiki)")
    s.add_argument("--seq-len", type=int, default=512,
                   help="calibration block length in tokens (default: 512)")
    s.add_argument("--out", required=True, help="output model folder")
    s.set_defaults(fn=cmd_quantize)

    s = sub.add_parser("eval", help="held-out NLL and perplexity of a model",
                       description="Mean token NLL / perplexity on held-out text; with --spec, "
                                   "of the model quantized on the fly.")
    _model_args(s)
    _eval_args(s)
    add_method_args(s, spec_required=False)
    add_budget_args(s)
    s.add_argument("--json", help="also write the result to this JSON file")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("finetune", help="QAFT / LoRA / FP fine-tuning on a PTQ data budget",
                       description="Fine-tune on exactly the token blocks PTQ calibrates on "
                                   "(--samples x --seq-len of the train split) and save the "
                                   "result (packed codes, or plain safetensors for --mode fp).")
    _model_args(s)
    s.add_argument("--spec", help="quantization spec (not with --mode fp)")
    s.add_argument("--data", default="wiki",
                   help="training text: 'wiki', a text file or hf:NAME[:CONFIG] (default: wiki)")
    s.add_argument("--samples", type=int, default=128,
                   help="budget: number of token blocks (default: 128)")
    s.add_argument("--seq-len", type=int, default=512, help="budget: block length (default: 512)")
    s.add_argument("--budget-seed", type=int, default=0,
                   help="seed of the block draw, as PTQ's --seed (default: 0)")
    add_finetune_args(s)
    s.add_argument("--out", required=True, help="output model folder")
    s.set_defaults(fn=cmd_finetune)

    s = sub.add_parser("recipe", help="run an experiment recipe",
                       description="Run a recipe; `qalign recipe NAME --help` lists its flags.")
    rsub = s.add_subparsers(dest="recipe", required=True)
    for name, module in RECIPES.items():
        r = rsub.add_parser(name, help=module.__doc__.split("\n")[0],
                            description=module.__doc__.split("\n")[0])
        module.build_parser(r)
        r.set_defaults(fn=lambda a, m=module: m.run(a))
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    torch.manual_seed(0)
    try:
        args.fn(args)
    except (SpecError, DataError, ModelError) as e:
        print(f"qalign: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

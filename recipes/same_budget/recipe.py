"""Recipe: FP, RTN, GPTQ and QAFT on one data budget, with the FP fine-tuning control.

    python -m recipes.same_budget --samples 32 --seq-len 256 --epochs 2 --out results/same-budget
    qalign recipe same-budget --samples 32 --seq-len 256 --epochs 2 --out results/same-budget

GPTQ calibrates on, and QAFT (and the FP control) trains on, exactly the same `--samples x
--seq-len` token blocks of the train split. Every row records unique tokens, tokens processed and
wall time (quantization + training), and the held-out perplexity (windows of --eval-seq-len).
QAFT's gain must be read against `fp-ft` (the FP model fine-tuned on the same tokens with the
same schedule) as well as against `fp`: fine-tuning on in-domain text lowers held-out NLL by itself.
Writes DIR/results.json, DIR/table.md, DIR/same_budget.png; finished rows are kept and skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import qaft
from compare.data import DataBudget, budget_blocks, load_text
from compare.evaluate import evaluate_nll, heldout_windows
from compare.io import atomic_write_text, write_json
from compare.memory import PeakRSS
from compare.models import check_seq_len, load_model
from compare.plots import new_figure, save_figure
from ptq import quantize_model
from ptq.formats import parse_spec
from ptq.gptq import GPTQOptions
from recipes.shared.common import (at_least, check_specs, finished_rows, out_folder,
                                   resolve_device, run_or_exit, versions)

METHODS = ("rtn", "gptq", "qaft")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m recipes.same_budget",
                                          description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name, local model folder or hub id (default: smollm2-135m)")
    p.add_argument("--data", default="wiki", help="text source (default: wiki)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4],
                   help="integer bit widths (default: 2 3 4)")
    p.add_argument("--granularity", default="g64", help="ch, t or gN (default: g64)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods per bit width (default: rtn gptq qaft)")
    p.add_argument("--samples", type=at_least(int, 1), default=32,
                   help="budget: blocks (default: 32)")
    p.add_argument("--seq-len", type=at_least(int, 2), default=256,
                   help="budget: block length (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="budget and data-order seed (default: 0)")
    p.add_argument("--epochs", type=at_least(int, 1), default=2,
                   help="QAFT / FP-control epochs (default: 2)")
    p.add_argument("--lr", type=float, default=1e-5, help="QAFT / FP-control AdamW lr (1e-5)")
    p.add_argument("--eval-seq-len", type=at_least(int, 2), default=512,
                   help="evaluation window (default: 512)")
    p.add_argument("--max-tokens", type=at_least(int, 1), default=16384,
                   help="held-out tokens evaluated (default: 16384)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", type=Path, default=Path("results/same-budget"),
                   help="output folder (default: results/same-budget)")
    p.add_argument("--fresh", action="store_true", help="discard finished rows in --out")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every window and block with BOS (default: the tokenizer's own "
                        "convention)")
    return p


def markdown(rows: list[dict]) -> str:
    lines = ["| method | spec | perplexity | unique tokens | tokens processed | wall s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['spec']} | {r['perplexity']:,.2f} | "
                     f"{r['unique_tokens']:,} | {r['tokens_processed']:,} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = new_figure()
    for method in METHODS:
        pts = sorted((parse_spec(r["spec"]).bits, r["perplexity"]) for r in rows
                     if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=method)
    for method, style in (("fp", "--"), ("fp-ft", ":")):
        for r in rows:
            if r["method"] == method:
                ax.axhline(r["perplexity"], color="k", ls=style, lw=1, label=method)
    ax.set(yscale="log", xlabel="bits", ylabel="held-out perplexity", title=title)
    ax.set_xticks(sorted({parse_spec(r["spec"]).bits for r in rows if r["spec"] != "fp32"}))
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run(args) -> dict:
    budget = DataBudget(args.samples, args.seq_len, args.seed)
    config = {"recipe": "same-budget", "model": args.model, "data": args.data,
              "budget": dataclasses.asdict(budget), "epochs": args.epochs, "lr": args.lr,
              "eval_seq_len": args.eval_seq_len, "max_tokens": args.max_tokens,
              "granularity": args.granularity, "gptq": dataclasses.asdict(GPTQOptions())}
    out = out_folder(args.out)
    train = qaft.TrainConfig(lr=args.lr, epochs=args.epochs, seed=args.seed)
    results_path = out / "results.json"
    rows = finished_rows(results_path, config, args.fresh)
    done = {(r["method"], r["spec"]) for r in rows}
    result = {"config": config, "versions": versions(), "rows": rows}
    device = resolve_device(args.device)
    specs = [str(parse_spec(f"int{b}-{args.granularity}")) for b in args.bits]

    model, tokenizer = load_model(args.model, device=device)
    check_seq_len(model, args.seq_len)
    check_seq_len(model, args.eval_seq_len, "--eval-seq-len")
    check_specs(model, specs)
    del model
    text = load_text(args.data)
    windows, bos_id = heldout_windows(tokenizer, text, args.eval_seq_len, args.max_tokens,
                                      args.add_bos)
    calib = budget_blocks(tokenizer, text, budget, args.add_bos)
    todo = [("fp", "fp32"), ("fp-ft", "fp32")] + [(m, s) for s in specs for m in args.methods]
    for method, spec in todo:
        if (method, spec) in done:
            continue
        model, _ = load_model(args.model, device=device, with_tokenizer=False)
        t0 = time.perf_counter()
        steps = processed = 0
        with PeakRSS() as mem:
            if method == "rtn":
                quantize_model(model, spec, "rtn")
            elif method == "gptq":
                quantize_model(model, spec, "gptq", GPTQOptions(), calib=calib)
                processed = budget.unique_tokens
            elif method in ("qaft", "fp-ft"):
                res = (qaft.finetune_qaft(model, calib, spec, qaft.QAFTConfig(), train)
                       if method == "qaft" else qaft.finetune_fp(model, calib, train))
                steps, processed = res.train.steps, res.train.tokens_processed
        seconds = time.perf_counter() - t0
        ev = evaluate_nll(model, windows, desc=f"eval {method} {spec}", bos_id=bos_id)
        rows.append({"method": method, "spec": spec, "nll": ev.nll, "perplexity": ev.perplexity,
                     "unique_tokens": 0 if method in ("fp", "rtn") else budget.unique_tokens,
                     "tokens_processed": processed, "steps": steps, "seconds": seconds,
                     "peak_rss_bytes": mem.peak, "scored_tokens": ev.scored_tokens})
        print(f"{method:6s} {spec:10s} perplexity {ev.perplexity:12,.2f}  {seconds:6.0f} s",
              flush=True)
        write_json(results_path, result)
    order = {k: i for i, k in enumerate(todo)}
    rows.sort(key=lambda r: order.get((r["method"], r["spec"]), len(order)))
    write_json(results_path, result)
    atomic_write_text(out / "table.md", markdown(rows))
    plot(rows, out / "same_budget.png",
         f"{args.model}: {budget.n_samples} x {budget.seq_len} tokens, {args.epochs} epoch(s)")
    print(markdown(rows))
    return result


def main(argv=None) -> None:
    run_or_exit(run, build_parser().parse_args(argv))


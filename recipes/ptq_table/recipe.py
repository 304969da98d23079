"""Recipe: held-out perplexity in full precision and after each PTQ method at several specs.

    python -m recipes.ptq_table --methods rtn gptq --out results/ptq-table
    qalign recipe ptq-table --methods rtn gptq --out results/ptq-table

All methods calibrate on the same budget (--samples x --seq-len tokens of the train split, seeded);
each row records the quantization seconds and the peak RSS sampled during quantization.
Writes DIR/results.json (config, versions, one row per method and spec), DIR/table.md and
DIR/ptq.png. Each finished row is saved at once; a rerun with the same config skips finished rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from compare.data import budget_blocks, load_text
from compare.evaluate import evaluate_nll, heldout_windows
from compare.io import atomic_write_text, write_json
from compare.memory import PeakRSS
from compare.models import check_seq_len, load_model
from compare.plots import new_figure, save_figure
from ptq import quantize_model
from ptq.formats import parse_spec
from ptq.registry import get_method
from recipes.shared.common import (WeightSnapshot, at_least, check_specs, finished_rows,
                                   out_folder, resolve_device, run_or_exit, versions)
from recipes.shared.flags import from_args
from recipes.shared.quantization import (CalibConfig, add_calib_flags, add_method_flags,
                                         method_options)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m recipes.ptq_table",
                                          description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name, local model folder or hub id (default: smollm2-135m)")
    p.add_argument("--data", default="wiki",
                   help="'wiki' (embedded), a text file, or hf:NAME[:CONFIG] (default: wiki)")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"],
                   help="registered PTQ methods (default: rtn gptq)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4],
                   help="integer bit widths (default: 2 3 4)")
    p.add_argument("--granularity", nargs="+", default=["ch", "g64"],
                   help="scaling granularities: ch, t or gN (default: ch g64)")
    p.add_argument("--sym", action="store_true", help="symmetric grids (int{b}-sym)")
    p.add_argument("--max-tokens", type=at_least(int, 1), default=16384,
                   help="held-out tokens evaluated (default: 16384)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", type=Path, default=Path("results/ptq-table"),
                   help="output folder (default: results/ptq-table)")
    p.add_argument("--fresh", action="store_true",
                   help="discard finished rows in --out instead of resuming")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="start every window and block with BOS (default: the tokenizer's own "
                        "convention)")
    add_calib_flags(p)  # --seq-len: calibration block length and evaluation window
    add_method_flags(p, with_method=False)
    return p


def specs_of(args) -> list[str]:
    sym = "-sym" if args.sym else ""
    return [str(parse_spec(f"int{b}{sym}-{g}")) for b in args.bits for g in args.granularity]


def markdown(rows: list[dict]) -> str:
    lines = ["| method | spec | perplexity | NLL (nats) | quantize s | peak RSS GB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['spec']} | {r['perplexity']:,.2f} | {r['nll']:.4f} | "
                     f"{r['quantize_seconds']:.1f} | {r['peak_rss_bytes'] / 1e9:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    fp = next(r for r in rows if r["method"] == "fp")
    quant = [r for r in rows if r["method"] != "fp"]
    fig, ax = new_figure()
    for method in dict.fromkeys(r["method"] for r in quant):
        for gran, style in zip(dict.fromkeys(r["spec"].split("-")[-1] for r in quant), "-:"):
            pts = sorted((parse_spec(r["spec"]).bits, r["perplexity"]) for r in quant
                         if r["method"] == method and r["spec"].endswith("-" + gran))
            if pts:
                ax.plot(*zip(*pts), marker="o", ls=style, label=f"{method} -{gran}")
    ax.axhline(fp["perplexity"], color="k", ls="--", lw=1, label="FP")
    ax.set(yscale="log", xlabel="bits", ylabel="held-out perplexity", title=title)
    ax.set_xticks(sorted({parse_spec(r["spec"]).bits for r in quant}))
    ax.legend(fontsize=8)
    save_figure(fig, path)


def run(args) -> dict:
    methods = list(dict.fromkeys(args.methods))
    options = method_options(args, methods)  # unknown names and foreign flags fail here
    calib_cfg = from_args(CalibConfig, args)
    budget = calib_cfg.budget
    specs = specs_of(args)
    out = out_folder(args.out)
    config = {"recipe": "ptq-table", "model": args.model, "data": args.data,
              "seq_len": budget.seq_len, "max_tokens": args.max_tokens,
              "budget": dataclasses.asdict(budget), "true_sequential": calib_cfg.true_sequential,
              "propagate": calib_cfg.propagate,
              "options": {m: dataclasses.asdict(o) for m, o in options.items()}}
    results_path = out / "results.json"
    rows = finished_rows(results_path, config, args.fresh)
    done = {(r["method"], r["spec"]) for r in rows}

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    check_seq_len(model, budget.seq_len)
    check_specs(model, specs)  # before the FP row is written
    text = load_text(args.data)
    windows, bos_id = heldout_windows(tokenizer, text, budget.seq_len, args.max_tokens,
                                      args.add_bos)
    calib = budget_blocks(tokenizer, text, budget, args.add_bos)
    snapshot = WeightSnapshot(model)
    result = {"config": config, "versions": versions(), "device": device, "rows": rows}

    todo = [("fp", "fp32")] + [(m, s) for s in specs for m in methods]
    for method, spec in todo:
        if (method, spec) in done:
            continue
        snapshot.restore()
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            if method != "fp":
                uses_data = get_method(method).needs_data
                quantize_model(model, spec, method, options[method],
                               calib=calib if uses_data else None,
                               true_sequential=calib_cfg.true_sequential and uses_data,
                               propagate=calib_cfg.propagate if uses_data else "quantized",
                               batch_size=calib_cfg.calib_batch_size)
        q_seconds = time.perf_counter() - t0
        ev = evaluate_nll(model, windows, desc=f"eval {method} {spec}", bos_id=bos_id)
        uses_data = method != "fp" and get_method(method).needs_data
        rows.append({"method": method, "spec": spec, "nll": ev.nll, "perplexity": ev.perplexity,
                     "scored_tokens": ev.scored_tokens,
                     "calibration_tokens": budget.unique_tokens if uses_data else 0,
                     "quantize_seconds": q_seconds, "peak_rss_bytes": mem.peak,
                     "eval_seconds": ev.seconds, "tokens_per_second": ev.tokens_per_second})
        print(f"{method:5s} {spec:12s} perplexity {ev.perplexity:12,.2f}  quantize "
              f"{q_seconds:6.1f} s  peak RSS {mem.peak / 1e9:.2f} GB", flush=True)
        write_json(results_path, result)
    snapshot.restore()

    order = {key: i for i, key in enumerate(todo)}
    rows.sort(key=lambda r: order.get((r["method"], r["spec"]), len(order)))
    write_json(results_path, result)
    table = markdown(rows)
    atomic_write_text(out / "table.md", table)
    plot(rows, out / "ptq.png", f"{args.model}: {budget.n_samples} x {budget.seq_len} calibration, "
         f"{windows.numel():,} eval tokens")
    print(table)
    print(f"wrote {results_path}, {out / 'table.md'}, {out / 'ptq.png'}")
    return result


def main(argv=None) -> None:
    run_or_exit(run, build_parser().parse_args(argv))


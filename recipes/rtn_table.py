"""Recipe: held-out perplexity of a model in full precision and after RTN at several specs.

    python -m recipes.rtn_table --out results/rtn-table
    qalign recipe rtn-table --out results/rtn-table

Writes DIR/results.json (config, versions, one row per spec), DIR/table.md and DIR/rtn.png.
Each finished row is saved at once; a rerun with the same config skips finished rows.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from compare.evaluate import evaluate_nll
from compare.io import atomic_write_text, read_json, write_json
from compare.models import load_model
from ptq.apply import quantize_model
from ptq.formats import parse_spec
from recipes.common import WeightSnapshot, heldout_windows, resolve_device, versions


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m recipes.rtn_table",
                                          description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name, local model folder or hub id (default: smollm2-135m)")
    p.add_argument("--data", default="wiki",
                   help="'wiki' (embedded), a text file, or hf:NAME[:CONFIG] (default: wiki)")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4],
                   help="integer bit widths (default: 2 3 4)")
    p.add_argument("--granularity", nargs="+", default=["ch", "g64"],
                   help="scaling granularities: ch, t or gN (default: ch g64)")
    p.add_argument("--sym", action="store_true", help="symmetric grids (int{b}-sym)")
    p.add_argument("--seq-len", type=int, default=512, help="evaluation window (default: 512)")
    p.add_argument("--max-tokens", type=int, default=16384,
                   help="held-out tokens evaluated (default: 16384)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--out", type=Path, default=Path("results/rtn-table"),
                   help="output folder (default: results/rtn-table)")
    p.add_argument("--fresh", action="store_true",
                   help="discard finished rows in --out instead of resuming")
    return p


def specs_of(args) -> list[str]:
    sym = "-sym" if args.sym else ""
    return [str(parse_spec(f"int{b}{sym}-{g}")) for b in args.bits for g in args.granularity]


def markdown(rows: list[dict]) -> str:
    lines = ["| method | spec | perplexity | NLL (nats) | quantize s | eval s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['spec']} | {r['perplexity']:,.2f} | {r['nll']:.4f} | "
                     f"{r['quantize_seconds']:.1f} | {r['eval_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp = next(r for r in rows if r["method"] == "fp")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for gran in sorted({r["spec"].split("-")[-1] for r in rows if r["method"] != "fp"}):
        pts = sorted((parse_spec(r["spec"]).bits, r["perplexity"]) for r in rows
                     if r["method"] != "fp" and r["spec"].endswith("-" + gran))
        ax.plot(*zip(*pts), marker="o", label=f"RTN -{gran}")
    ax.axhline(fp["perplexity"], color="k", ls="--", lw=1, label="FP")
    ax.set(yscale="log", xlabel="bits", ylabel="held-out perplexity", title=title)
    ax.set_xticks(sorted({parse_spec(r["spec"]).bits for r in rows if r["method"] != "fp"}))
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def run(args) -> dict:
    config = {"recipe": "rtn-table", "model": args.model, "data": args.data,
              "seq_len": args.seq_len, "max_tokens": args.max_tokens, "specs": specs_of(args)}
    out: Path = args.out
    results_path = out / "results.json"
    previous = None if args.fresh else read_json(results_path)
    rows = []
    if previous is not None:
        old = {k: v for k, v in previous["config"].items() if k != "specs"}
        new = {k: v for k, v in config.items() if k != "specs"}
        if old != new:
            raise SystemExit(f"{results_path} holds results of another config ({old}); use "
                             "another --out, or --fresh to discard them")
        rows = previous["rows"]
    done = {(r["method"], r["spec"]) for r in rows}

    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    windows = heldout_windows(tokenizer, args.data, args.seq_len, args.max_tokens)
    snapshot = WeightSnapshot(model)
    result = {"config": config, "versions": versions(), "device": device, "rows": rows}

    todo = [("fp", "fp32")] + [("rtn", s) for s in config["specs"]]
    for method, spec in todo:
        if (method, spec) in done:
            continue
        snapshot.restore()
        t0 = time.perf_counter()
        if method == "rtn":
            quantize_model(model, spec, "rtn")
        q_seconds = time.perf_counter() - t0
        ev = evaluate_nll(model, windows, desc=f"eval {spec}")
        rows.append({"method": method, "spec": spec, "nll": ev.nll, "perplexity": ev.perplexity,
                     "scored_tokens": ev.scored_tokens, "quantize_seconds": q_seconds,
                     "eval_seconds": ev.seconds, "tokens_per_second": ev.tokens_per_second})
        print(f"{method:4s} {spec:12s} perplexity {ev.perplexity:12,.2f}  "
              f"({ev.scored_tokens} tokens, {ev.seconds:.0f} s)", flush=True)
        write_json(results_path, result)
    snapshot.restore()

    order = {s: i for i, (_, s) in enumerate(todo)}
    rows.sort(key=lambda r: order.get(r["spec"], len(order)))
    write_json(results_path, result)
    table = markdown(rows)
    atomic_write_text(out / "table.md", table)
    plot(rows, out / "rtn.png", f"{args.model}, {windows.numel():,} held-out tokens")
    print(table)
    print(f"wrote {results_path}, {out / 'table.md'}, {out / 'rtn.png'}")
    return result


def main(argv=None) -> None:
    torch.manual_seed(0)
    run(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()

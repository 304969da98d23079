"""How far a misalignment study's numbers move when only the execution changes.

    OMP_NUM_THREADS=1 qalign recipe misalignment --preset quick --bits 2 3 4 \\
        --methods rtn gptq qaft-gptq --search ... --out results/threads1
    python -m benchmarks.variation results/study results/threads1 --out docs/results/variation

The same code, inputs and seeds on a different number of threads sum the same products in another
order (a bfloat16 GEMM's fp32 accumulator, a reduction); the last bits of some activations differ,
as they do on another CPU. This pairs the solutions two results folders share (the same method,
spec, seed and chosen options; `--search` pins the second run to the first run's choices) and
reports each pair's held-out perplexities and their relative difference, per bit width. Runs that
chose different options are not a like-for-like pair and are listed apart. Several second folders
(e.g. one per width, run side by side) are pooled.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from compare.io import atomic_write_text, read_json, write_json

# config fields that only select which units run, or how they were chosen
SELECTION = {"bits", "methods", "seeds", "search", "trials", "tune", "gptq_variants"}


def load(folder: Path) -> dict:
    state = read_json(folder / "results.json")
    if state is None:
        raise SystemExit(f"{folder}/results.json not found; give a misalignment --out folder")
    return state


def pairs(a: dict, b: dict) -> tuple[list[dict], list[dict]]:
    """(like-for-like pairs, pairs whose chosen options differ), in a's order."""
    differ = sorted(k for k in a["config"] if k not in SELECTION
                    and a["config"][k] != b["config"].get(k))
    if differ:
        raise SystemExit(f"the two studies differ in {differ}: not the same units; rerun the "
                         "second with the first's values")
    key = lambda r: (r["method"], r["spec"], r["variant"], r["seed"])  # noqa: E731
    other = {key(r): r for r in b["runs"].values()}
    same, chose_else = [], []
    for r in a["runs"].values():
        s = other.get(key(r))
        if s is None:
            continue
        pa, pb = r["metrics"]["perplexity"], s["metrics"]["perplexity"]
        row = {"method": r["method"], "spec": r["spec"], "bits": r["bits"], "seed": r["seed"],
               "chosen": r["chosen"], "ppl_a": pa, "ppl_b": pb,
               "rel_diff": pb / pa - 1, "nll_diff": s["metrics"]["nll"] - r["metrics"]["nll"]}
        (same if r["chosen"] == s["chosen"] else chose_else).append(row)
    return same, chose_else


def report(same: list[dict], chose_else: list[dict], names: tuple[str, str]) -> str:
    lines = [f"| method | spec | seed | chosen | perplexity {names[0]} | perplexity {names[1]} "
             "| relative difference |", "|---|---|---|---|---|---|---|"]
    for r in same:
        chosen = ", ".join(f"{k}={v}" for k, v in r["chosen"].items()) or "-"
        lines.append(f"| {r['method']} | {r['spec']} | {r['seed']} | {chosen} | "
                     f"{r['ppl_a']:,.2f} | {r['ppl_b']:,.2f} | {100 * r['rel_diff']:+.3f}% |")
    lines += ["", "| bits | pairs | largest relative difference | identical pairs |",
              "|---|---|---|---|"]
    group = lambda r: r["bits"] or {"fp": "FP", "fp-ft": "FP control"}[r["method"]]  # noqa: E731
    for label in dict.fromkeys(map(group, sorted(same, key=lambda r: (r["bits"] is None,
                                                                       r["bits"])))):
        rows = [r for r in same if group(r) == label]
        worst = max(abs(r["rel_diff"]) for r in rows)
        exact = sum(r["ppl_a"] == r["ppl_b"] for r in rows)
        lines.append(f"| {label} | {len(rows)} | {100 * worst:.3f}% | {exact} |")
    if chose_else:
        lines += ["", "Chose different options (not compared): " + ", ".join(
            f"{r['method']}/{r['spec']}@{r['seed']}" for r in chose_else)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a", type=Path, help="a misalignment results folder (the reference)")
    p.add_argument("b", type=Path, nargs="+",
                   help="one or more others: (parts of) the same study run differently")
    p.add_argument("--out", type=Path, help="also write report.md and variation.json here")
    args = p.parse_args(argv)
    a, others = load(args.a), [load(b) for b in args.b]
    same, chose_else = [], []
    seen = set()
    for b in others:  # units two folders share (the FP model, the FP control) count once
        for rows, found in zip((same, chose_else), pairs(a, b)):
            for r in found:
                if (r["method"], r["spec"], r["seed"]) not in seen:
                    seen.add((r["method"], r["spec"], r["seed"]))
                    rows.append(r)
    if not same:
        raise SystemExit("the folders share no solution with the same chosen options")
    names = (args.a.name, "+".join(b.name for b in args.b))
    if names[0] == names[1]:  # two folders of one name (results/misalignment): say which is which
        names = (str(args.a), "+".join(map(str, args.b)))
    text = report(same, chose_else, names)
    print(text, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "report.md", text)
        write_json(args.out / "variation.json",
                   {"a": str(args.a), "b": [str(b) for b in args.b],
                    "versions": [a["versions"], *(b["versions"] for b in others)],
                    "pairs": same, "chose_differently": chose_else,
                    "largest_rel_diff": max(abs(r["rel_diff"]) for r in same)})


if __name__ == "__main__":
    main()

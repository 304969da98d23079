"""The fp-scaling recipe's outputs: runs.csv, three plots and report.md, computed from the runs
and the fit (never written by hand)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from compare.fp_law import PUBLISHED, LawConstants, best_layout, critical_data, predict
from compare.io import atomic_write_text, write_csv, write_json
from compare.plots import new_figure, save_figure
from ptq.formats import parse_spec

__all__ = ["write_outputs"]


def _fitted(state) -> LawConstants | None:
    return LawConstants(**state["fit"]["constants"]) if state.get("fit") else None


def _plot_predicted(state, c, path: Path) -> None:
    fig, ax = new_figure(4.6, 4.2)
    runs = list(state["runs"].values())
    actual = [r["loss"] for r in runs]
    pred = [float(predict(r["N"], r["D"], r["E"], r["M"], r["B"], c)) for r in runs]
    for fmt in dict.fromkeys(r["format"] for r in runs):
        idx = [i for i, r in enumerate(runs) if r["format"] == fmt]
        ax.scatter([pred[i] for i in idx], [actual[i] for i in idx], s=12, label=fmt)
    lo, hi = min(actual + pred), max(actual + pred)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="x = y")
    ax.set(xlabel="predicted loss (fitted law)", ylabel="held-out loss", title="fit")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _plot_loss_vs_tokens(state, cfg, c, path: Path) -> None:
    size, B = cfg.sizes[-1], cfg.blocks[0]
    fig, ax = new_figure(5.6, 4.0)
    runs = [r for r in state["runs"].values() if r["size"] == size and r["B"] == B]
    for fmt in cfg.formats:
        pts = sorted((r["D"], r["loss"], r["N"], r["E"], r["M"]) for r in runs
                     if r["format"] == fmt)
        if not pts:
            continue
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=fmt)[0]
        N, E, M = pts[0][2], pts[0][3], pts[0][4]
        Ds = np.geomspace(pts[0][0] / 2, pts[-1][0] * 4, 60)
        ax.plot(Ds, predict(N, Ds, E, M, B, c), "-", color=line.get_color(), lw=0.8)
        d_crit = critical_data(N, E, M, B, c)
        if Ds[0] <= d_crit <= Ds[-1]:
            ax.axvline(d_crit, color=line.get_color(), ls=":", lw=0.8)
    ax.set(xscale="log", xlabel="training tokens D", ylabel="held-out loss",
           title=f"model {size}, B = {B}: runs (dots), fitted law (lines)")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _plot_best_split(c, path: Path) -> None:
    fig, ax = new_figure(5.0, 3.6)
    widths = list(range(4, 17))
    for consts, label in ((PUBLISHED, "published"), (c, "fitted here")):
        ax.plot(widths, [best_layout(P, consts)[0] for P in widths], "o-", label=f"E, {label}")
    ax.set(xlabel="total bits P", ylabel="exponent bits of the best layout",
           title="best exponent/mantissa split per width")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _report(state, cfg, c) -> str:
    runs = list(state["runs"].values())
    lines = [f"# Floating-point quantized training at CPU scale ({len(runs)} runs, {cfg.data})",
             "", "Every run trains from the same seed with the GEMM inputs "
             f"{', '.join(cfg.targets)}"
             f" rounded to its format with blocks of B along the reduction dimension "
             f"(`qaft.fp_train`). Training {state['seconds']['train'] / 60:.1f} min, measuring "
             f"{state['seconds']['measure'] / 60:.1f} min (this machine).", "",
             "## Fitted constants", ""]
    if state.get("fit_error"):
        lines += [f"The fit of {', '.join(cfg.fit_free)} failed: {state['fit_error']}.", ""]
        if state.get("fit"):
            lines += [f"Fallback: {', '.join(state['fit']['fitted'])} fitted, the other "
                      "constants at their published values.", ""]
    if state.get("fit"):
        f = state["fit"]
        lines += ["| constant | fitted here | published |", "|---|---|---|"]
        for k, v in f["constants"].items():
            mark = "" if k in f["fitted"] else " (fixed)"
            mark += " (at its bound)" if k in f.get("at_bounds", ()) else ""
            lines.append(f"| {k} | {v:.4g}{mark} | {state['published'][k]:.4g} |")
        lines += ["", f"RMSE of the fit: {f['rmse']:.4f} nats over {f['n_runs']} runs."]
    else:
        lines.append("No fit.")
    lines += ["", "## Findings", ""]
    groups = {}
    for r in runs:
        groups.setdefault((r["size"], r["D"], r["B"]), []).append(r)
    spread = [max(x["loss"] for x in g) - min(x["loss"] for x in g) for g in groups.values()]
    law = [float(max(predict(x["N"], x["D"], x["E"], x["M"], x["B"]) for x in g)
                 - min(predict(x["N"], x["D"], x["E"], x["M"], x["B"]) for x in g))
           for g in groups.values()]
    best = {}
    for g in groups.values():
        winner = min(g, key=lambda x: x["loss"])["format"]
        best[winner] = best.get(winner, 0) + 1
    lines.append(f"- **Format effect**: within each (size, D, B) group the {len(cfg.formats)} "
                 f"formats' losses span {sum(spread) / len(spread):.4f} nats on average (largest "
                 f"{max(spread):.4f}); the published law predicts spans of "
                 f"{sum(law) / len(law):.2g} nats at these N and D. Lowest loss per group: "
                 + ", ".join(f"{f} {k}x" for f, k in sorted(best.items())) + ".")
    if c is not None and {"dl", "nu"} & set(state["fit"]["fitted"]):
        widths = {P: (best_layout(P, c), best_layout(P, PUBLISHED)) for P in (4, 6, 8)}
        same = sum(a == b for a, b in widths.values())
        lines.append("- **Best exponent/mantissa split** (fitted vs published): " + ", ".join(
            f"{P} bits E{a[0]}M{a[1]} vs E{b[0]}M{b[1]}" for P, (a, b) in widths.items())
            + f" ({same} of {len(widths)} agree).")
        N = max(r["N"] for r in runs)
        crit = {f: critical_data(N, *next((r["E"], r["M"]) for r in runs if r["format"] == f),
                                 cfg.blocks[0], c) for f in cfg.formats}
        lines.append(f"- **Critical data size** at N = {N:,} and B = {cfg.blocks[0]} under the "
                     "fitted law: " + ", ".join(f"{f} {v:.3g} tokens" if math.isfinite(v)
                                                else f"{f} none" for f, v in crit.items())
                     + f" (the grid spans {min(cfg.tokens):,} to {max(cfg.tokens):,}).")
    by_fmt = {}
    for r in runs:
        by_fmt.setdefault(r["format"], []).append(r["loss"])
    lines.append("- **Mean held-out loss per training format**: " + ", ".join(
        f"{f} {sum(v) / len(v):.4f}" for f, v in by_fmt.items()) + ".")
    widths = {}
    for f in cfg.formats:
        widths.setdefault(parse_spec(f).bits, []).append(f)
    for P, fmts in sorted(widths.items()):
        if len(fmts) > 1:
            wins = {f: sum(min(fmts, key=lambda x: next(
                r["loss"] for r in g if r["format"] == x)) == f for g in groups.values())
                for f in fmts}
            lines.append(f"- **Best {P}-bit split per group**: " + ", ".join(
                f"{f} lowest in {k} of {len(groups)}" for f, k in wins.items()) + ".")
    worst = max(abs(v) for r in runs for v in r["ptq"]["qerr"].values())
    lines.append(f"- **PTQ of the trained models** ({', '.join(cfg.ptq_settings)}) changes "
                 f"their held-out loss by at most {100 * worst:.3f}%.")
    lines += ["", "## PTQ of the trained models (plain weights, held-out NLL)", "",
              "| run | loss as trained | plain weights | " + " | ".join(cfg.ptq_settings) + " |",
              "|---|---|---|" + "---|" * len(cfg.ptq_settings)]
    for rid, r in state["runs"].items():
        lines.append(f"| {rid} | {r['loss']:.4f} | {r['loss_plain']:.4f} | " + " | ".join(
            f"{r['ptq']['ptq'][s]:.4f}" for s in cfg.ptq_settings) + " |")
    if c is not None:
        lines += ["", "![predicted vs actual](predicted_vs_actual.png)", "",
                  "![loss vs tokens](loss_vs_tokens.png)", "", "![best split](best_split.png)"]
    return "\n".join(lines) + "\n"


def write_outputs(state: dict, cfg, out: Path) -> None:
    write_json(out / "results.json", state)
    rows = [{"run": rid, **{k: v for k, v in r.items() if k != "ptq"},
             **{f"ptq {s}": v for s, v in r["ptq"]["ptq"].items()}}
            for rid, r in state["runs"].items()]
    write_csv(out / "runs.csv", rows)
    c = _fitted(state)
    if c is not None:
        _plot_predicted(state, c, out / "predicted_vs_actual.png")
        _plot_loss_vs_tokens(state, cfg, c, out / "loss_vs_tokens.png")
        _plot_best_split(c, out / "best_split.png")
    text = _report(state, cfg, c)
    atomic_write_text(out / "report.md", text)
    print(text)

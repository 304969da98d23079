"""The training-dynamics recipe's outputs: points.csv, three plots and report.md, whose findings
are computed from the measured points (never written by hand).

Findings, each for the focus setting (default GPTQ int3):
  cooldown   quantization error at the end of each WSD cooldown minus at its branch point (the
             constant run's checkpoint it started from), beside the change of the FP loss
  peak LR    the final quantization error of the cosine run and of the latest cooldown per
             peak learning rate
  averaging  LAWA minus the raw constant-run checkpoint at the same step
"""

from __future__ import annotations

import statistics
from pathlib import Path

from compare.io import atomic_write_text, write_csv, write_json
from compare.plots import new_figure, save_figure

__all__ = ["findings", "write_outputs"]


def _points(state, **match) -> list[dict]:
    rows = [p for p in state["points"].values() if all(p[k] == v for k, v in match.items())]
    return sorted(rows, key=lambda p: p["step"])


def _point(state, run: str, step: int, averaged: bool = False) -> dict | None:
    found = _points(state, run=run, step=step, averaged=averaged)
    return found[0] if found else None


def findings(state: dict, focus: str) -> dict:
    """The three comparisons of the module docstring, as numbers."""
    cooldowns = []
    for rid, r in state["runs"].items():
        if r["kind"] != "wsd":
            continue
        start = _point(state, r["parent"], r["branch_step"])
        ends = _points(state, run=rid)
        if start is None or not ends:
            continue
        end = ends[-1]
        cooldowns.append({"run": rid, "peak_lr": r["peak_lr"], "branch_step": r["branch_step"],
                          "qerr_before": start["qerr"][focus], "qerr_after": end["qerr"][focus],
                          "fp_before": start["fp_nll"], "fp_after": end["fp_nll"]})
    by_lr = {}
    for rid, r in state["runs"].items():
        pts = _points(state, run=rid, averaged=False)
        if not pts or r["kind"] == "constant":
            continue
        entry = by_lr.setdefault(r["peak_lr"], {})
        if r["kind"] == "cosine":
            entry["cosine"] = (pts[-1]["fp_nll"], pts[-1]["qerr"][focus])
        elif r["branch_step"] == max(x["branch_step"] for x in state["runs"].values()
                                     if x["kind"] == "wsd" and x["peak_lr"] == r["peak_lr"]):
            entry["wsd"] = (pts[-1]["fp_nll"], pts[-1]["qerr"][focus])
    averaging = []
    for p in state["points"].values():
        if p["averaged"]:
            raw = _point(state, p["run"], p["step"])
            if raw is not None:
                averaging.append({"peak_lr": p["peak_lr"], "step": p["step"],
                                  "d_qerr": p["qerr"][focus] - raw["qerr"][focus],
                                  "d_fp": p["fp_nll"] - raw["fp_nll"]})
    # the noise floor: how much the error moves between consecutive constant-LR checkpoints
    steps = []
    for rid, r in state["runs"].items():
        if r["kind"] == "constant":
            q = [p["qerr"][focus] for p in _points(state, run=rid, averaged=False)]
            steps += [b - a for a, b in zip(q, q[1:])]
    noise = statistics.pstdev(steps) if len(steps) > 1 else 0.0
    return {"cooldowns": cooldowns, "by_lr": {str(k): v for k, v in sorted(by_lr.items())},
            "averaging": averaging, "noise": noise}


def _verdict(agree: int, against: int, n: int) -> str:
    """From the cases that moved beyond the noise floor in the paper's direction or against it."""
    if n == 0:
        return "not measured"
    if agree == against:
        return ("not resolved: every change is within the noise" if agree == 0
                else "not resolved")
    if against == 0 and 2 * agree >= n:
        return "shows up"
    return "shows up partly" if agree > against else "does not show up"


def _report(state: dict, cfg, f: dict) -> str:
    focus = cfg.focus
    cd, avg = f["cooldowns"], f["averaging"]
    noise = f["noise"]
    up = sum(c["qerr_after"] - c["qerr_before"] > noise for c in cd)
    down = sum(c["qerr_after"] - c["qerr_before"] < -noise for c in cd)
    lines = [f"# Training dynamics and PTQ robustness ({cfg.size} model, {cfg.data})", "",
             f"Quantization error = CE(Wq)/CE(W) - 1 on {cfg.eval_tokens:,} held-out tokens; "
             f"focus setting {focus}. Runs: {len(state['runs'])}; measured points: "
             f"{len(state['points'])}; training {state['seconds']['train'] / 60:.1f} min, "
             f"measuring {state['seconds']['measure'] / 60:.1f} min (this machine, summed over "
             "invocations).", "", "## Findings", "",
             f"A change counts only beyond the noise floor {noise:.4f}: the standard deviation of "
             f"the {focus} error between consecutive constant-LR checkpoints.", ""]
    lines.append(f"- **Error rises when the learning rate decays** "
                 f"({_verdict(up, down, len(cd))}): the {focus} error rose beyond the noise "
                 f"during {up} of {len(cd)} WSD cooldowns and fell beyond it during {down}"
                 + (f" (mean change {sum(c['qerr_after'] - c['qerr_before'] for c in cd) / len(cd):+.4f}"
                    f", while the FP loss changed by "
                    f"{sum(c['fp_after'] - c['fp_before'] for c in cd) / len(cd):+.4f} nats)."
                    if cd else "."))
    lrs = sorted(f["by_lr"], key=float)
    if len(lrs) > 1:
        for family in ("cosine", "wsd"):
            vals = [(lr, f["by_lr"][lr][family][1]) for lr in lrs if family in f["by_lr"][lr]]
            if len(vals) > 1:
                best = min(vals, key=lambda v: v[1])[0]
                order = ", ".join(f"{lr}: {q:+.4f}" for lr, q in vals)
                span = max(q for _, q in vals) - min(q for _, q in vals)
                verdict = ("not resolved" if span <= noise else
                           "shows up" if best == lrs[-1] else "does not show up")
                lines.append(f"- **Higher peak LR, lower error** ({family}, {verdict}): final "
                             f"{focus} error per peak LR {order}; lowest at {best}.")
    lower = sum(a["d_qerr"] < -noise for a in avg)
    higher = sum(a["d_qerr"] > noise for a in avg)
    if avg:
        lines.append(f"- **Averaging (LAWA, last {cfg.lawa_window} checkpoints) lowers the error**"
                     f" ({_verdict(lower, higher, len(avg))}): lower beyond the noise at {lower} "
                     f"and higher at {higher} of {len(avg)} constant-LR checkpoints, mean change "
                     f"{sum(a['d_qerr'] for a in avg) / len(avg):+.4f} (FP loss "
                     f"{sum(a['d_fp'] for a in avg) / len(avg):+.4f} nats).")
    lines += ["", "## Every setting", "",
              "The same three comparisons for each PTQ setting (mean change in the error; "
              "cooldowns: end minus branch point; LAWA: averaged minus raw at the same step).",
              "", "| setting | error over all checkpoints | error rose during cooldowns | "
              "mean change | LAWA lowered it | mean change | final cosine error per peak LR |",
              "|---|---|---|---|---|---|---|"]
    for s in cfg.settings:
        g = findings(state, s)
        cds, avs = g["cooldowns"], g["averaging"]
        up = sum(c["qerr_after"] > c["qerr_before"] for c in cds)
        down = sum(a["d_qerr"] < 0 for a in avs)
        cos = ", ".join(f"{lr}: {v['cosine'][1]:+.4f}" for lr, v in g["by_lr"].items()
                        if "cosine" in v)
        mean_cd = sum(c["qerr_after"] - c["qerr_before"] for c in cds) / max(len(cds), 1)
        mean_av = sum(a["d_qerr"] for a in avs) / max(len(avs), 1)
        errs = [p["qerr"][s] for p in state["points"].values() if not p["averaged"]]
        lines.append(f"| {s} | {min(errs):+.4f} to {max(errs):+.4f} | {up} of {len(cds)} | "
                     f"{mean_cd:+.4f} | {down} of {len(avs)} | "
                     f"{mean_av:+.4f} | {cos} |")
    lines += ["", "## Final point of every run", "",
              "| run | tokens | FP NLL | " + " | ".join(f"{s} error" for s in cfg.settings) + " |",
              "|---|---|---|" + "---|" * len(cfg.settings)]
    for rid in state["runs"]:
        pts = _points(state, run=rid, averaged=False)
        if pts:
            p = pts[-1]
            lines.append(f"| {rid} | {p['tokens']:,} | {p['fp_nll']:.4f} | "
                         + " | ".join(f"{p['qerr'][s]:+.4f}" for s in cfg.settings) + " |")
    lines += ["", "![trajectories](trajectories.png)", "",
              "![quantized vs FP](quantized_vs_fp.png)", "", "![averaging](averaging.png)", ""]
    return "\n".join(lines)


def _plot_trajectories(state, cfg, path: Path) -> None:
    lrs = list(cfg.peak_lrs)
    fig, axes = new_figure(4.2 * len(lrs), 6.4, ncols=len(lrs), nrows=2)
    step_tokens = cfg.batch_size * cfg.seq_len
    for col, lr in enumerate(lrs):
        for row, (key, label) in enumerate([("fp_nll", "FP held-out NLL"),
                                            ("qerr", f"{cfg.focus} error")]):
            ax = axes[row][col]
            twin = ax.twinx()
            for rid, r in state["runs"].items():
                if r["peak_lr"] != lr:
                    continue
                pts = _points(state, run=rid, averaged=False)
                if r["kind"] == "wsd":
                    start = _point(state, r["parent"], r["branch_step"])
                    pts = ([start] if start else []) + pts
                ys = [p[key] if key == "fp_nll" else p[key][cfg.focus] for p in pts]
                style = {"constant": "-", "cosine": "--", "wsd": "-"}[r["kind"]]
                ax.plot([p["tokens"] for p in pts], ys, style, marker=".", label=rid)
                first = r["branch_step"] or 0  # a branch's own rates, after its parent's
                steps = sorted(int(s) for s in r["lr"] if int(s) >= first)
                twin.plot([s * step_tokens for s in steps], [r["lr"][str(s)] for s in steps],
                          color="grey", lw=0.6, alpha=0.4)
            twin.set_ylabel("learning rate", color="grey", fontsize=7)
            twin.tick_params(labelsize=6, colors="grey")
            ax.set(xlabel="tokens", ylabel=label, title=f"peak LR {lr:g}" if row == 0 else None)
            if row == 0:
                ax.legend(fontsize=6)
    save_figure(fig, path)


def _plot_quantized_vs_fp(state, cfg, path: Path) -> None:
    fig, ax = new_figure(5.5, 4.4)
    lo, hi = float("inf"), float("-inf")
    for lr in cfg.peak_lrs:
        pts = [p for p in state["points"].values() if p["peak_lr"] == lr and not p["averaged"]]
        xs = [p["fp_nll"] for p in pts]
        ys = [p["ptq"][cfg.focus] for p in pts]
        ax.scatter(xs, ys, s=10, label=f"peak LR {lr:g}")
        lo, hi = min([lo, *xs, *ys]), max([hi, *xs, *ys])
    if lo < hi:
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="x = y")
    ax.set(xlabel="FP held-out NLL", ylabel=f"{cfg.focus} held-out NLL",
           title="quantized against FP loss, every checkpoint")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _plot_averaging(state, cfg, path: Path) -> None:
    fig, ax = new_figure(5.5, 3.8)
    for lr in cfg.peak_lrs:
        rid = f"constant-lr{lr:g}"
        for averaged, style in ((False, "-"), (True, "--")):
            pts = _points(state, run=rid, averaged=averaged)
            if pts:
                ax.plot([p["tokens"] for p in pts], [p["qerr"][cfg.focus] for p in pts], style,
                        marker=".", label=f"{lr:g} {'LAWA' if averaged else 'raw'}")
    ax.set(xlabel="tokens", ylabel=f"{cfg.focus} error",
           title=f"constant LR: raw vs LAWA-{cfg.lawa_window} checkpoints")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_outputs(state: dict, cfg, out: Path) -> None:
    f = findings(state, cfg.focus)
    state["findings"] = f
    write_json(out / "results.json", state)
    rows = [{k: v for k, v in p.items() if k not in ("ptq", "qerr", "gap")}
            | {f"qerr {s}": p["qerr"][s] for s in p["qerr"]}
            | {f"nll {s}": p["ptq"][s] for s in p["ptq"]} for p in state["points"].values()]
    write_csv(out / "points.csv", rows)
    _plot_trajectories(state, cfg, out / "trajectories.png")
    _plot_quantized_vs_fp(state, cfg, out / "quantized_vs_fp.png")
    _plot_averaging(state, cfg, out / "averaging.png")
    text = _report(state, cfg, f)
    atomic_write_text(out / "report.md", text)
    print(text)

"""The optimizer-choices recipe's outputs: runs.csv, two plots and report.md, whose findings are
computed from the measured runs (never written by hand).

Every effect of a variant is its final degradation minus the baseline's of the same seed, and it
counts as beyond noise only when the variant's degradation lies outside the 95% prediction
interval of one more baseline seed, mean +- t(0.975, n-1) std sqrt(1 + 1/n) over the n baseline
seeds (with one seed nothing is resolved). Paper D's directions checked: lower weight decay degrades more, fp16
degrades more than bf16; dropout and clipping effects are reported with their measured sign.
"""

from __future__ import annotations

from pathlib import Path

from compare.io import atomic_write_text, write_csv, write_json
from compare.plots import new_figure, save_figure
from scipy import stats as sps

from compare.stats import correlation_interval, seed_spread

__all__ = ["findings", "write_outputs"]


def _baselines(state) -> list[dict]:
    return [r for r in state["runs"].values() if r["changed"] is None]


def noise_band(floor: dict, level: float = 0.95) -> tuple[float, float] | None:
    """The prediction interval of one more baseline seed, or None with fewer than two seeds."""
    if floor["std"] is None:
        return None
    n = floor["n"]
    half = float(sps.t.ppf((1 + level) / 2, n - 1)) * floor["std"] * (1 + 1 / n) ** 0.5
    return floor["mean"] - half, floor["mean"] + half


def findings(state: dict, cfg) -> dict:
    settings = list(cfg.settings)
    base = _baselines(state)
    first = next((r for r in base if r["seed"] == cfg.baseline_seeds[0]), None)
    floor = {s: seed_spread([r["final"]["degradation"][s] for r in base]) for s in settings} \
        if base else {}
    effects = []
    for rid, r in state["runs"].items():
        if r["changed"] is None or first is None:
            continue
        for s in settings:
            d = r["final"]["degradation"][s]
            band = noise_band(floor[s])
            effects.append({"run": rid, "changed": r["changed"], "setting": s,
                            "degradation": d, "delta": d - first["final"]["degradation"][s],
                            "noise_band": band,
                            "beyond_noise": band is not None and not band[0] <= d <= band[1]})
    runs = list(state["runs"].values())
    early_final = {s: correlation_interval([r["early"]["degradation"][s] for r in runs],
                                           [r["final"]["degradation"][s] for r in runs])
                   for s in settings}
    outliers = {s: correlation_interval([r["final"]["outliers"]["max_abs"] for r in runs],
                                        [r["final"]["degradation"][s] for r in runs])
                for s in settings}
    return {"floor": floor, "effects": effects, "early_vs_final": early_final,
            "outliers_vs_degradation": outliers}


def _rho(c: dict) -> str:
    if c["value"] is None:
        return "undefined"
    ci = f" [{c['low']:+.2f}, {c['high']:+.2f}]" if c["low"] is not None else ""
    return (f"{c['value']:+.2f}{ci} (n = {c['n']}, "
            f"{'significant' if c['significant'] else 'not significant'})")


def _paper_claims(state, cfg, f) -> list[str]:
    """Paper D's two stated directions, checked on the variants that test them."""
    lines = []
    by_change = {}
    for e in f["effects"]:
        by_change.setdefault(e["changed"], []).append(e)
    for changed, effects in by_change.items():
        key, value = changed.split("=")
        if key == "weight_decay" and float(value) < cfg.weight_decay:
            claim, worse = f"higher weight decay ({cfg.weight_decay} vs {value}) helps", True
        elif key == "precision" and {value, cfg.precision} == {"bf16", "fp16"}:
            claim, worse = "bf16 training helps (vs fp16)", value == "fp16"
        else:
            continue
        agree = [e for e in effects if (e["delta"] > 0) == worse and e["beyond_noise"]]
        verdict = ("shows up" if len(agree) == len(effects) else
                   "does not show up" if not agree else "shows up partly")
        detail = "; ".join(f"{e['setting']} {e['delta']:+.3f} points"
                           f"{' (beyond the seed noise)' if e['beyond_noise'] else ''}"
                           for e in effects)
        lines.append(f"- **{claim}** ({verdict}): {changed} changes the degradation by "
                     f"{detail}.")
    return lines


def _report(state, cfg, f) -> str:
    settings = list(cfg.settings)
    lines = [f"# Optimization choices and PTQ robustness ({cfg.size} model, {cfg.data})", "",
             f"Degradation = 100 x (CE(Wq)/CE(W) - 1) on {cfg.eval_tokens:,} held-out tokens, at "
             f"the early checkpoint (step {cfg.early_step}) and the end (step {cfg.steps}). "
             f"Training {state['seconds']['train'] / 60:.1f} min, measuring "
             f"{state['seconds']['measure'] / 60:.1f} min (this machine, summed over invocations)."
             , "", "## Findings", ""]
    spread = ", ".join(
        f"{s} {v['mean']:+.3f} [{v['min']:+.3f}, {v['max']:+.3f}]"
        + (f", one more seed within [{b[0]:+.3f}, {b[1]:+.3f}]" if (b := noise_band(v)) else "")
        for s, v in f["floor"].items())
    lines.append(f"- **Seed-to-seed spread of the baseline** ({len(_baselines(state))} seeds; "
                 f"mean [min, max] in percent, and the 95% prediction interval of one more "
                 f"seed): {spread}. A variant inside that interval is not resolved.")
    lines += _paper_claims(state, cfg, f)
    for s in settings:
        lines.append(f"- **Early checkpoint predicts final degradation** ({s}): Spearman "
                     f"{_rho(f['early_vs_final'][s])}.")
    w = settings[0]
    lines.append(f"- **Outliers go with degradation** ({w}): Spearman of final max |x| and "
                 f"degradation {_rho(f['outliers_vs_degradation'][w])}.")
    lines += ["", "## Every run (final checkpoint)", "",
              "| run | FP NLL | " + " | ".join(f"{s} %" for s in settings)
              + " | max abs x | outlier dims | mean kurtosis |",
              "|---|---|" + "---|" * (len(settings) + 3)]
    for rid, r in state["runs"].items():
        fin = r["final"]
        o = fin["outliers"]
        lines.append(f"| {rid} | {fin['fp_nll']:.4f} | "
                     + " | ".join(f"{fin['degradation'][s]:+.2f}" for s in settings)
                     + f" | {o['max_abs']:.2f} | {o['outlier_dims']} | {o['mean_kurtosis']:.1f} |")
    lines += ["", "![degradation](degradation.png)", "", "![early vs final](early_vs_final.png)",
              ""]
    return "\n".join(lines)


def _plot_degradation(state, cfg, f, path: Path) -> None:
    settings = list(cfg.settings)
    fig, axes = new_figure(4.0 * len(settings), 4.2, ncols=len(settings))
    axes = axes if isinstance(axes, list) else [axes]
    names = list(state["runs"])
    for ax, s in zip(axes, settings):
        ax.bar(range(len(names)), [state["runs"][n]["final"]["degradation"][s] for n in names])
        fl = f["floor"].get(s)
        if fl:
            ax.axhspan(fl["min"], fl["max"], color="grey", alpha=0.25, label="baseline seeds")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="degradation (%)", title=s)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _plot_early_vs_final(state, cfg, f, path: Path) -> None:
    settings = list(cfg.settings)
    fig, axes = new_figure(3.8 * len(settings), 3.8, ncols=len(settings))
    axes = axes if isinstance(axes, list) else [axes]
    for ax, s in zip(axes, settings):
        for rid, r in state["runs"].items():
            ax.scatter(r["early"]["degradation"][s], r["final"]["degradation"][s], s=14)
            ax.annotate(rid, (r["early"]["degradation"][s], r["final"]["degradation"][s]),
                        fontsize=5)
        c = f["early_vs_final"][s]
        rho = "undefined" if c["value"] is None else f"{c['value']:+.2f}"
        ax.set(xlabel=f"early (step {cfg.early_step}) degradation %",
               ylabel="final degradation %", title=f"{s}: Spearman {rho}")
    save_figure(fig, path)


def write_outputs(state: dict, cfg, out: Path) -> None:
    f = findings(state, cfg)
    state["findings"] = f
    write_json(out / "results.json", state)
    rows = []
    for rid, r in state["runs"].items():
        row = {"run": rid, "seed": r["seed"], **r["factors"]}
        for when in ("early", "final"):
            row[f"{when}_fp_nll"] = r[when]["fp_nll"]
            row.update({f"{when} {s} %": v for s, v in r[when]["degradation"].items()})
            row.update({f"{when} {k}": v for k, v in r[when]["outliers"].items()})
        rows.append(row)
    write_csv(out / "runs.csv", rows)
    _plot_degradation(state, cfg, f, out / "degradation.png")
    _plot_early_vs_final(state, cfg, f, out / "early_vs_final.png")
    text = _report(state, cfg, f)
    atomic_write_text(out / "report.md", text)
    print(text)

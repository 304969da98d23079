"""Plots and report of the misalignment recipe, from its results.json state alone.

SCHEMA_DOC below documents results.json; `write_outputs` adds the `alignment` summary
(compare.alignment.summarize_alignment) and writes
results.json, layers.csv, the PNG plots and report.md, all atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

from compare.alignment import runs_at, summarize_alignment
from compare.io import atomic_write_text, write_csv, write_json
from compare.plots import new_figure, save_figure

__all__ = ["SCHEMA", "SCHEMA_DOC", "write_outputs"]

SCHEMA = "qalign.misalignment/3"

SCHEMA_DOC = """results.json (schema "qalign.misalignment/3"):
  config          the MisalignmentConfig (recipes.misalignment_config), every field
  versions        python, torch, transformers, accelerate, peft, qalign, cpu threads
  budget          n_samples, seq_len, seed (the first), seeds, unique_tokens, val_samples: the
                  one data budget of every method (per seed), and its validation slice
  search_spaces   {method: {field: [values]}} the spaces tuning drew its trials from
  heldout         eval_windows, probe_windows, seq_len, bos (probe windows = first eval windows)
  fp_probe_nll    FP model's mean NLL on the probe windows (nats/token)
  runs            {id: run}, id "METHOD/SPEC", "gptq[VARIANT]/SPEC", "fp", "fp-ft", with
                  "@SEED" appended when the study has several seeds; a run is
    method, level ("layer", "block" or "global": where the method's objective sits on the
                  locality ladder; null for fp), variant, bits (null for fp/fp-ft), spec, seed
    metrics       nll, perplexity, kl (KL(FP || run), nats/token), scored_tokens, window_nll
                  (per held-out window, for paired comparisons); probe_nll, local_fp_mean /
                  local_prop_mean (mean over layers of the relative output error with FP /
                  propagated inputs), block_fp_mean (mean over decoder blocks of the block's
                  relative output error on FP inputs, ptq.metrics), distance (||W_hat - W|| /
                  ||W||), val_nll (validation slice; null without tuning)
    chosen        the options the winning trial overrode ({} = pinned values)
    trials        every trial: {trial, options, val_nll, seconds, tokens_processed, best_step}
    budget        unique_tokens, tokens_processed, steps
    seconds       solve (all trials), measure (everything after); peak_rss_bytes
    start         QAFT from GPTQ: {method "gptq", options, from}: the GPTQ solution it starts
                  at, the one the GPTQ arm chose (from "gptq arm") or GPTQ's defaults when the
                  study has no GPTQ arm (from "defaults"); its solve seconds leave that GPTQ
                  run out (the GPTQ arm's row has it); null for the other runs
    trajectory    GPTQ: per probed block {block, calib_rel_sum, nll, local_fp_mean, ...};
                  QAFT / fp-ft: per checkpoint {step, tokens_processed, unique_tokens, loss,
                  seconds, nll, local_fp_mean, local_prop_mean, distance, val_nll} (step 0 =
                  start), of the chosen trial
    layers        per layer {name, block, kind, rel_err_fp, rel_err_prop, distance,
                  grad_cosine (main solutions), proxy_loss and calib_rel_err (GPTQ-style)}
    blocks        per decoder block: its relative output error on FP inputs
    landscape     main PTQ/QAFT solutions: {t, nll_solution, nll_random, radius_solution,
                  radius_random_same_norm} (probe NLL at W + t D; radii relative to ||W||)
  sensitivity     {bits: {spec, method "rtn", seconds, layers [{name, block, kind, rel_err_fp,
                  proxy_loss, delta_nll}]}}: one layer quantized at a time, the rest FP
  radius          {radius, points [[r, nll]], limit_nll, seconds}: random direction, ||D_l||
                  proportional to ||W_l||, NLL reaching FP + log(radius_ppl_ratio)
  alignment       {bits: {per_layer (rel_err_fp vs delta_nll), per_layer_proxy (proxy_loss vs
                  delta_nll), across_solutions (local_fp_mean vs probe_nll over runs and QAFT
                  checkpoints), qaft_trajectory, gptq_trajectory (per probed block: increase
                  of local_fp_mean vs increase of NLL): each {spearman, kendall, n,
                  spearman_ci / kendall_ci {low, high, fisher_low, fisher_high, significant}};
                  ladder {methods {method: {level, perplexity (seed spread), layer_local,
                  block_local}}, layer_alignment / block_alignment (local_fp_mean /
                  block_fp_mean vs probe_nll across the same solutions, as across_solutions)};
                  grad_cosine {method: {mean, median}}; landscape {method: {distance,
                  radius_solution, radius_random_same_norm}}; perplexity {method: mean ppl};
                  methods {method: {perplexity, nll: {mean, min, max, std, low, high, n} over
                  seeds, chosen}}; comparisons {"A vs B": {per_seed [{seed, diff (mean
                  window NLL of B - A), low, high, ratio (ppl B / A), ratio_low, ratio_high,
                  excludes_zero}], holds ("a", "b" or null), seeds}}}}
  timings         setup_s, this_invocation_s
  extended        (when a rerun grew the study) per growth: the bits, methods and seeds it
                  added, and the versions it ran with
Correlations are null where undefined (fewer than 3 points or a constant side)."""

MAIN = ("rtn", "gptq", "qaft", "qaft-gptq")
COLORS = {"rtn": "tab:red", "gptq": "tab:blue", "qaft": "tab:green", "qaft-mse": "tab:cyan",
          "qaft-gptq": "tab:olive", "fp-ft": "tab:gray", "block-ap": "tab:brown",
          "hqq": "tab:pink"}
QAFT_METHODS = ("qaft", "qaft-mse", "qaft-gptq")


def _fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _corr(c) -> str:
    return "n/a" if not c else f"{_fmt(c['spearman'])} / {_fmt(c['kendall'])} (n={c['n']})"


def layer_rows(state: dict) -> list[dict]:
    rows = []
    for r in state["runs"].values():
        for layer in r["layers"]:
            rows.append({"run": r["id"], "method": r["method"], "bits": r["bits"], **layer})
    for b, sens in state["sensitivity"].items():
        for layer in sens["layers"]:
            rows.append({"run": f"sensitivity/{sens['spec']}", "method": "rtn-one-layer",
                         "bits": int(b), **layer})
    return rows


# ---------------------------------------------------------------------------------- plots

def _bits(state) -> list[int]:
    return list(state["config"]["bits"])


def _panels(state, height: float):
    """A figure with one panel per bit width: (figure, [(axes, bits), ...])."""
    bits = _bits(state)
    fig, axes = new_figure(4.2 * len(bits), height, len(bits))
    return fig, list(zip(axes if isinstance(axes, list) else [axes], bits))


def plot_nll_vs_bits(state, path):
    fig, ax = new_figure()
    for method in dict.fromkeys(r["method"] for r in state["runs"].values() if r["bits"]):
        pts = sorted((r["bits"], r["metrics"]["perplexity"]) for r in state["runs"].values()
                     if r["method"] == method and not r["variant"] and r["bits"])
        ax.plot(*zip(*pts), marker="o", label=method, color=COLORS.get(method))
    var = [(r["bits"], r["metrics"]["perplexity"]) for r in state["runs"].values() if r["variant"]]
    if var:
        ax.scatter(*zip(*var), marker="x", color="tab:blue", alpha=0.6, label="gptq variants")
    for rid, style in (("fp", "--"), ("fp-ft", ":")):
        if rid in state["runs"]:
            ax.axhline(state["runs"][rid]["metrics"]["perplexity"], color="k", ls=style, lw=1,
                       label=rid)
    ax.set(yscale="log", xlabel="bits", ylabel="held-out perplexity",
           title=f"{state['config']['model']}, {state['config']['granularity']}")
    ax.set_xticks(_bits(state))
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_sensitivity(state, path, summary):
    fig, panels = _panels(state, 3.6)
    for ax, b in panels:
        sens = state["sensitivity"].get(str(b))
        if not sens:
            continue
        for kind in dict.fromkeys(x["kind"] for x in sens["layers"]):
            pts = [(x["rel_err_fp"], x["delta_nll"]) for x in sens["layers"] if x["kind"] == kind]
            ax.scatter(*zip(*pts), s=14, label=kind)
        c = summary[str(b)]["per_layer"]
        ax.set(xscale="log", xlabel="local loss of the layer (rel. output error)",
               ylabel="global NLL increase (nats)",
               title=f"{sens['spec']} one layer: rho {_fmt(c['spearman'])}, "
                     f"tau {_fmt(c['kendall'])}")
        ax.title.set_fontsize(9)
    panels[0][0].legend(fontsize=7)
    save_figure(fig, path)


def plot_solutions(state, path, summary):
    fig, panels = _panels(state, 3.6)
    for ax, b in panels:
        for r in runs_at(state, b):
            m = r["metrics"]
            color = COLORS.get(r["method"], "tab:purple")
            ax.scatter(m["local_fp_mean"], m["probe_nll"], color=color,
                       marker="x" if r["variant"] else "o", zorder=3)
            ax.annotate(r["id"].split("/")[0], (m["local_fp_mean"], m["probe_nll"]), fontsize=6)
            if r["method"] in QAFT_METHODS:
                traj = r["trajectory"]
                ax.plot([p["local_fp_mean"] for p in traj], [p["nll"] for p in traj],
                        color=color, lw=1, marker=".", alpha=0.7)
        c = summary[str(b)]["across_solutions"]
        ax.set(xlabel="mean local loss (rel. output error, FP inputs)", ylabel="probe NLL",
               title=f"int{b}: across solutions rho {_fmt(c['spearman'])}, "
                     f"tau {_fmt(c['kendall'])}")
        ax.title.set_fontsize(9)
    save_figure(fig, path)


def plot_ladder(state, path, summary):
    """Per width: each solution's block-level local loss against its probe NLL (QAFT's
    checkpoints joined by a line), marker by level; the title gives both levels' alignment."""
    markers = {"layer": "o", "block": "s", "global": "^"}
    fig, panels = _panels(state, 3.6)
    for ax, b in panels:
        for r in runs_at(state, b):
            m = r["metrics"]
            if r["variant"] or m.get("block_fp_mean") is None:
                continue
            color = COLORS.get(r["method"], "tab:purple")
            ax.scatter(m["block_fp_mean"], m["probe_nll"], color=color, zorder=3,
                       marker=markers.get(r.get("level"), "o"), label=r["method"])
            if r["method"] in QAFT_METHODS:
                traj = [p for p in r["trajectory"] if p.get("block_fp_mean") is not None]
                ax.plot([p["block_fp_mean"] for p in traj], [p["nll"] for p in traj],
                        color=color, lw=1, marker=".", alpha=0.7)
        lad = summary[str(b)]["ladder"]
        ax.set(xscale="log", xlabel="mean block-level local loss (FP inputs)", ylabel="probe NLL",
               title=f"int{b}: rho layer {_fmt(lad['layer_alignment']['spearman'])}, "
                     f"block {_fmt(lad['block_alignment']['spearman'])}")
        ax.title.set_fontsize(9)
    panels[0][0].legend(fontsize=7)
    save_figure(fig, path)


def plot_trajectories(state, path):
    fig, panels = _panels(state, 3.6)
    control = next(iter(_first_seed([r for r in state["runs"].values()
                                     if r["method"] == "fp-ft"])), None)
    for ax, b in panels:
        twin = ax.twinx()
        for r in _first_seed(runs_at(state, b)):
            if r["method"] in QAFT_METHODS and r["trajectory"]:
                t = r["trajectory"]
                x = [p["tokens_processed"] for p in t]
                color = COLORS[r["method"]]
                ax.plot(x, [p["nll"] for p in t], color=color, marker="o",
                        label=f"{r['method']} NLL")
                twin.plot(x, [p["local_fp_mean"] for p in t], color=color, ls="--",
                          marker=".", label=f"{r['method']} local")
            elif r["method"] in ("rtn", "gptq") and not r["variant"]:
                ax.axhline(r["metrics"]["probe_nll"], color=COLORS[r["method"]], lw=1,
                           ls="-.", label=f"{r['method']} NLL")
        if control:
            t = control["trajectory"]
            ax.plot([p["tokens_processed"] for p in t], [p["nll"] for p in t], color="k",
                    ls=":", label="FP fine-tuned NLL")
        ax.set(xlabel="tokens processed", ylabel="probe NLL", title=f"int{b}")
        twin.set_ylabel("mean local loss (dashed)")
        twin.ticklabel_format(axis="y", useOffset=False)
        ax.legend(fontsize=7, loc="best")
    save_figure(fig, path)


def plot_gptq_trajectory(state, path):
    fig, ax = new_figure()
    for r in state["runs"].values():
        if r["method"] == "gptq" and not r["variant"] and r["trajectory"]:
            t = r["trajectory"]
            ax.plot([p["local_fp_mean"] for p in t], [p["nll"] for p in t], marker="o",
                    label=r["spec"])
    ax.axhline(state["fp_probe_nll"], color="k", ls="--", lw=1, label="FP")
    ax.set(xlabel="accumulated local loss (mean over all layers)", ylabel="probe NLL",
           title="GPTQ, block by block")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_landscape(state, path):
    fig, panels = _panels(state, 3.6)
    for ax, b in panels:
        for r in runs_at(state, b):
            land = r["landscape"]
            if not land:
                continue
            color = COLORS.get(r["method"], "tab:purple")
            t = [0.0] + land["t"]
            ax.plot(t, [state["fp_probe_nll"]] + land["nll_solution"], color=color, marker="o",
                    label=r["method"])
            ax.plot(t, [state["fp_probe_nll"]] + land["nll_random"], color=color, ls="--",
                    label=f"{r['method']}: random, same norms")
        if state["radius"]:
            ax.axhline(state["radius"]["limit_nll"], color="k", lw=0.8, ls=":",
                       label="radius threshold")
        ax.set(yscale="log", xlabel="t in W + t (W_hat - W)", ylabel="probe NLL", title=f"int{b}")
        ax.legend(fontsize=6)
    save_figure(fig, path)


def plot_grad_cosine(state, path):
    fig, panels = _panels(state, 3.4)
    for ax, b in panels:
        for r in runs_at(state, b):
            cos = [x.get("grad_cosine") for x in r["layers"]]
            if any(c is not None for c in cos):
                ax.plot(range(len(cos)), [math.nan if c is None else c for c in cos], lw=0.8,
                        color=COLORS.get(r["method"]), label=r["method"])
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xlabel="layer (model order)", ylabel="cos(grad local, grad NLL)",
               title=f"int{b}", ylim=(-1, 1))
        ax.legend(fontsize=7)
    save_figure(fig, path)


def _first_seed(runs: list[dict]) -> list[dict]:
    seeds = sorted({r.get("seed", 0) for r in runs})
    return [r for r in runs if r.get("seed", 0) == (seeds[0] if seeds else 0)]


def plot_pareto(state, path):
    """Paper B's picture, per width: probe NLL against tokens processed (the unique tokens are
    the budget's for every method): QAFT runs as curves over their checkpoints, RTN and GPTQ as
    points, the FP fine-tuning control as a curve (first seed)."""
    fig, panels = _panels(state, 3.6)
    control = _first_seed([r for r in state["runs"].values() if r["method"] == "fp-ft"])
    for ax, b in panels:
        for r in _first_seed(runs_at(state, b)):
            color = COLORS.get(r["method"], "tab:purple")
            if r["method"] in QAFT_METHODS and r["trajectory"]:
                t = r["trajectory"]
                ax.plot([max(p["tokens_processed"], 1) for p in t], [p["nll"] for p in t],
                        color=color, marker=".", label=r["method"])
                ax.scatter([max(r["budget"]["tokens_processed"], 1)],
                           [r["metrics"]["probe_nll"]], color=color, marker="*", s=80,
                           zorder=4)
            elif not r["variant"]:
                x = max(r["budget"]["tokens_processed"], 1)
                ax.scatter([x], [r["metrics"]["probe_nll"]], color=color, marker="o", s=40,
                           label=r["method"], zorder=4)
        for r in control:
            t = r["trajectory"]
            ax.plot([max(p["tokens_processed"], 1) for p in t], [p["nll"] for p in t],
                    color="k", ls=":", label="FP fine-tuned")
        ax.axhline(state["fp_probe_nll"], color="k", ls="--", lw=0.8, label="FP")
        ax.set(xscale="log", yscale="log", xlabel="tokens processed (log; 1 = no data)",
               ylabel="probe NLL", title=f"int{b}: same unique tokens for all")
        ax.legend(fontsize=6)
    save_figure(fig, path)


def plot_pareto_summary(state, path):
    """Every width on one axes: final probe NLL of each method against its tokens processed."""
    fig, ax = new_figure()
    markers = dict(zip(state["config"]["bits"], "os^vD"))
    for r in state["runs"].values():
        if r["variant"] or not r["bits"]:
            continue
        ax.scatter(max(r["budget"]["tokens_processed"], 1), r["metrics"]["probe_nll"],
                   color=COLORS.get(r["method"], "tab:purple"), marker=markers[r["bits"]],
                   s=30, alpha=0.8)
    for method, color in COLORS.items():
        if any(r["method"] == method for r in state["runs"].values()):
            ax.scatter([], [], color=color, label=method)
    for b, m in markers.items():
        ax.scatter([], [], color="k", marker=m, label=f"int{b}")
    ax.axhline(state["fp_probe_nll"], color="k", ls="--", lw=0.8, label="FP")
    ax.set(xscale="log", yscale="log", xlabel="tokens processed (log)", ylabel="probe NLL",
           title="all widths: global loss against tokens processed")
    ax.legend(fontsize=6, ncol=2)
    save_figure(fig, path)


PLOTS = {"nll_vs_bits.png": "held-out perplexity against bits, per method",
         "sensitivity.png": "one layer quantized at a time: its local loss against the NLL it "
                            "costs",
         "solutions.png": "across solutions: mean local loss against probe NLL (QAFT's "
                          "checkpoints joined by a line)",
         "trajectories.png": "QAFT: probe NLL (solid) and mean local loss (dashed) against "
                             "tokens processed; the FP fine-tuning control dotted",
         "gptq_trajectory.png": "GPTQ: probe NLL after each probed block against the local loss "
                                "accumulated so far",
         "landscape.png": "NLL along W + t (W_hat - W) (solid) and a random direction with the "
                          "same per-layer norms (dashed)",
         "grad_cosine.png": "per layer: cosine between the local-loss and the NLL gradients at "
                            "the solution",
         "pareto.png": "per width: probe NLL against tokens processed (QAFT curves over its "
                       "checkpoints, its chosen checkpoint starred; RTN and GPTQ points; the FP "
                       "control dotted)",
         "pareto_summary.png": "all widths: final probe NLL against tokens processed",
         "ladder.png": "locality ladder: block-level local loss against probe NLL (circles: "
                       "layer methods, squares: block methods, triangles: fine-tuning)"}


def _ci(c: dict, key: str) -> str:
    ci = c.get(f"{key}_ci") or {}
    if c.get(key) is None:
        return "n/a"
    if ci.get("low") is None:
        return f"{c[key]:.2f}"
    mark = "" if ci.get("significant") else " (n.s.)"
    return f"{c[key]:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]{mark}"


def _ppl(spread: dict) -> str:
    if spread["n"] < 2:
        return f"{spread['mean']:,.2f}"
    return f"{spread['mean']:,.2f} ({spread['min']:,.2f}-{spread['max']:,.2f})"


NAMES = {"rtn": "RTN", "gptq": "GPTQ", "qaft": "QAFT from RTN", "qaft-mse": "QAFT from MSE",
         "qaft-gptq": "QAFT from GPTQ", "fp-ft": "the FP fine-tuned control"}


def _claim(key: str, cmp: dict) -> str:
    """One sentence per comparison, stated only when every seed's interval supports it."""
    a, b = key.split(" vs ")
    name_a, name_b = NAMES.get(a, a), NAMES.get(b, b)
    ratios = ", ".join(f"{c['ratio']:.3g}x [{c['ratio_low']:.3g}, {c['ratio_high']:.3g}]"
                       for c in cmp["per_seed"])
    if not cmp["per_seed"]:
        return ""
    seeds = f"{cmp['seeds']} seed{'s' if cmp['seeds'] > 1 else ''}"
    if cmp["holds"] == "b":
        return (f"{name_b} beats {name_a} (perplexity ratio {ratios}, 95% paired bootstrap "
                f"over held-out windows; {seeds})")
    if cmp["holds"] == "a":
        return (f"{name_a} beats {name_b} (perplexity ratio {name_b}/{name_a} {ratios}; "
                f"{seeds})")
    return f"{name_b} vs {name_a}: not resolved on this budget (ratio {ratios}; {seeds})"


def _findings(bits: int, s: dict) -> str:
    """One paragraph for one bit width, generated from the intervals: a claim is stated only
    when it holds on every seed with an interval that excludes zero."""
    ppl = ", ".join(f"{NAMES.get(m, m)} {_ppl(v['perplexity'])}" for m, v in s["methods"].items())
    out = [f"**int{bits}**: perplexity {ppl}"]
    out += [c for c in (_claim(k, v) for k, v in s["comparisons"].items()) if c]
    c = s["per_layer"]
    if c["spearman"] is not None:
        verdict = ("significant" if c["spearman_ci"]["significant"] else
                   "not significant on this sample")
        out.append(f"one layer at a time, the local loss ranks the NLL cost with Spearman "
                   f"{_ci(c, 'spearman')} ({verdict})")
    if s["grad_cosine"]:
        cos = ", ".join(f"{m} {v['mean']:.3f}" for m, v in s["grad_cosine"].items())
        out.append(f"mean cosine of the local and global gradients: {cos}")
    return "; ".join(out) + "."


def _trials_run(runs: dict, asked: int) -> str:
    """How many trials the tuned runs had: `asked`, or fewer where a space has fewer points."""
    counts = sorted({len(r["trials"]) for rid, r in runs.items()
                     if rid != "fp" and r.get("trials")})
    if not counts or counts == [asked]:
        return f"{asked} trial(s)"
    shown = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{shown} trial(s) (as many as the space has points, at most {asked})"


def report(state: dict, summary: dict) -> str:
    cfg = state["config"]
    runs = state["runs"]
    seeds = cfg.get("seeds", [cfg.get("seed", 0)])
    tuning = (f"matched tuning: {_trials_run(runs, cfg['trials'])} per method from its search "
              f"space, chosen by NLL on {cfg['val_samples']} validation blocks of the train split "
              "(disjoint from the budget and the held-out text)" if cfg.get("tune")
              else f"no tuning (QAFT and control: lr {cfg['lr']}, {cfg.get('schedule')})")
    lines = [f"# Local vs global loss: {cfg['model']} on {cfg['data']}", "",
             f"Budget {cfg['samples']} x {cfg['seq_len']} = {state['budget']['unique_tokens']:,} "
             f"unique tokens for every method, seeds {', '.join(map(str, seeds))}; QAFT and the "
             f"FP control {cfg['epochs']} epoch(s); {tuning}. Held-out: "
             f"{state['heldout']['eval_windows']} x {state['heldout']['seq_len']} tokens for "
             f"NLL/KL, the first {state['heldout']['probe_windows']} windows for the probes.", "",
             "| run | perplexity | KL(FP‖Q) | probe NLL | val NLL | mean local (FP in) | mean local "
             "(propagated) | distance | tokens processed | chosen | solve s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs.values():
        m = r["metrics"]
        chosen = ", ".join(f"{k}={v}" for k, v in (r.get("chosen") or {}).items()) or "-"
        lines.append(f"| {r['id']} | {m['perplexity']:,.2f} | {_fmt(m['kl'], 4)} | "
                     f"{m['probe_nll']:.4f} | {_fmt(m.get('val_nll'), 4)} | "
                     f"{m['local_fp_mean']:.4g} | {m['local_prop_mean']:.4g} | "
                     f"{m['distance']:.4f} | {r['budget']['tokens_processed']:,} | {chosen} | "
                     f"{r['seconds']['solve']:.0f} |")
    starts = sorted({r["id"] for r in runs.values()
                     if (r.get("start") or {}).get("from") == "gptq arm"})
    if starts:
        lines += ["", f"{', '.join(starts)}: QAFT from the solution the GPTQ run of the same "
                  "width and seed chose (`start` in results.json); its solve seconds leave that "
                  "GPTQ run out."]
    lines += ["", "## Comparisons (held-out perplexity ratio B / A, 95% paired bootstrap over "
              "windows, per seed)", "", "| bits | A vs B | ratio per seed | verdict |",
              "|---|---|---|---|"]
    for b, s in summary.items():
        for key, cmp in s["comparisons"].items():
            ratios = "; ".join(f"{c['ratio']:.3g} [{c['ratio_low']:.3g}, {c['ratio_high']:.3g}]"
                               for c in cmp["per_seed"])
            a, bb = key.split(" vs ")
            verdict = {"a": f"{a} better", "b": f"{bb} better"}.get(cmp["holds"], "not resolved")
            lines.append(f"| {b} | {key} | {ratios or 'n/a'} | {verdict} |")
    lines += ["", "## Alignment (Spearman rho / Kendall tau with 95% bootstrap intervals; "
              "n.s.: an interval spans zero)", "",
              "| bits | per layer (one at a time) | per layer, absolute proxy | across solutions | "
              "QAFT trajectory | GPTQ per-block increments | grad cosine mean (" +
              " / ".join(MAIN) + ") |", "|---|---|---|---|---|---|---|"]
    for b, s in summary.items():
        cos = " / ".join(_fmt(s["grad_cosine"].get(m, {}).get("mean"), 3) for m in MAIN)
        cells = [f"{_ci(s[k], 'spearman')} / {_ci(s[k], 'kendall')} (n={s[k]['n']})"
                 for k in ("per_layer", "per_layer_proxy", "across_solutions",
                           "qaft_trajectory", "gptq_trajectory")]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {cos} |")
    lines += ["", "## Locality ladder (layer-local, block-local, global objectives)", "",
              "Local losses on the probe windows with FP inputs: the layer level is the mean "
              "relative output error over layers, the block level the mean over decoder blocks "
              "of ||B_hat(X) - B(X)||² / ||B(X) - X||²; alignment is each level's Spearman rho "
              "with the probe NLL across the same solutions (runs and QAFT checkpoints).", "",
              "| bits | method | level | perplexity | layer-local | block-local |",
              "|---|---|---|---|---|---|"]
    for b, s in summary.items():
        for m, row in s["ladder"]["methods"].items():
            lines.append(f"| {b} | {m} | {row['level']} | {_ppl(row['perplexity'])} | "
                         f"{row['layer_local']:.4g} | {_fmt(row['block_local'], 4)} |")
    lines += ["", "| bits | layer-local vs NLL | block-local vs NLL |", "|---|---|---|"]
    for b, s in summary.items():
        lad = s["ladder"]
        lines.append(f"| {b} | {_ci(lad['layer_alignment'], 'spearman')} "
                     f"(n={lad['layer_alignment']['n']}) | "
                     f"{_ci(lad['block_alignment'], 'spearman')} "
                     f"(n={lad['block_alignment']['n']}) |")
    rad = state.get("radius") or {}
    lines += ["", "## Landscape", "",
              f"Random-direction radius (||D_l|| proportional to ||W_l||) at which perplexity "
              f"reaches FP x {cfg['radius_ppl_ratio']}: "
              f"{_fmt(rad.get('radius'), 4)} (relative to ||W||).", "",
              "| bits | method | distance | radius along the solution | radius along a random "
              "direction of the same norms |", "|---|---|---|---|---|"]
    for b, s in summary.items():
        for method, land in s["landscape"].items():
            lines.append(f"| {b} | {method} | {land['distance']:.4f} | "
                         f"{_fmt(land['radius_solution'], 4)} | "
                         f"{_fmt(land['radius_random_same_norm'], 4)} |")
    lines += ["", "## Findings", "", "Generated from the intervals above: a comparison is "
              "stated only when it holds on every seed with a 95% interval that excludes zero.",
              ""]
    for b, s in summary.items():
        lines += [_findings(int(b), s), ""]
    lines += ["## Plots", ""]
    for name, caption in PLOTS.items():
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def write_outputs(state: dict, out: Path) -> None:
    out = Path(out)
    summary = summarize_alignment(state)
    state["alignment"] = summary
    write_json(out / "results.json", state)
    write_csv(out / "layers.csv", layer_rows(state))
    plot_nll_vs_bits(state, out / "nll_vs_bits.png")
    plot_sensitivity(state, out / "sensitivity.png", summary)
    plot_solutions(state, out / "solutions.png", summary)
    plot_trajectories(state, out / "trajectories.png")
    plot_gptq_trajectory(state, out / "gptq_trajectory.png")
    plot_landscape(state, out / "landscape.png")
    plot_grad_cosine(state, out / "grad_cosine.png")
    plot_pareto(state, out / "pareto.png")
    plot_pareto_summary(state, out / "pareto_summary.png")
    plot_ladder(state, out / "ladder.png", summary)
    atomic_write_text(out / "report.md", report(state, summary))

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

SCHEMA = "qalign.misalignment/1"

SCHEMA_DOC = """results.json (schema "qalign.misalignment/1"):
  config          the MisalignmentConfig (recipes.misalignment_config), every field
  versions        python, torch, transformers, accelerate, peft, qalign, cpu threads
  budget          n_samples, seq_len, seed, unique_tokens: the one data budget of every method
  heldout         eval_windows, probe_windows, seq_len (probe windows = the first eval windows)
  fp_probe_nll    FP model's mean NLL on the probe windows (nats/token)
  runs            {id: run}, id "METHOD/SPEC", "gptq[VARIANT]/SPEC", "fp", "fp-ft"; a run is
    method, variant, bits (null for fp/fp-ft), spec
    metrics       nll, perplexity, kl (KL(FP || run), nats/token), scored_tokens (eval windows);
                  probe_nll, local_fp_mean / local_prop_mean (mean over layers of the relative
                  output error with FP / propagated inputs), distance (||W_hat - W|| / ||W||)
    budget        unique_tokens, tokens_processed, steps
    seconds       solve (quantize or train), measure (everything after); peak_rss_bytes
    trajectory    GPTQ: per probed block {block, calib_rel_sum, nll, local_fp_mean, ...};
                  QAFT / fp-ft: per checkpoint {step, tokens_processed, unique_tokens, loss,
                  seconds, nll, local_fp_mean, local_prop_mean, distance} (step 0 = start)
    layers        per layer {name, block, kind, rel_err_fp, rel_err_prop, distance,
                  grad_cosine (main solutions), proxy_loss and calib_rel_err (GPTQ-style)}
    landscape     main PTQ/QAFT solutions: {t, nll_solution, nll_random, radius_solution,
                  radius_random_same_norm} (probe NLL at W + t D; radii relative to ||W||)
  sensitivity     {bits: {spec, method "rtn", seconds, layers [{name, block, kind, rel_err_fp,
                  proxy_loss, delta_nll}]}}: one layer quantized at a time, the rest FP
  radius          {radius, points [[r, nll]], limit_nll, seconds}: random direction, ||D_l||
                  proportional to ||W_l||, NLL reaching FP + log(radius_ppl_ratio)
  alignment       {bits: {per_layer (rel_err_fp vs delta_nll), per_layer_proxy (proxy_loss vs
                  delta_nll), across_solutions (local_fp_mean vs probe_nll over runs and QAFT
                  checkpoints), qaft_trajectory, gptq_trajectory (per probed block: increase
                  of local_fp_mean vs increase of NLL): each {spearman, kendall, n}; grad_cosine {method: {mean, median}}; landscape
                  {method: {distance, radius_solution, radius_random_same_norm}};
                  perplexity {method: ppl}}}
  timings         setup_s, this_invocation_s
Correlations are null where undefined (fewer than 3 points or a constant side)."""

MAIN = ("rtn", "gptq", "qaft")
COLORS = {"rtn": "tab:red", "gptq": "tab:blue", "qaft": "tab:green", "fp-ft": "tab:gray"}


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
            if r["method"] == "qaft":
                traj = r["trajectory"]
                ax.plot([p["local_fp_mean"] for p in traj], [p["nll"] for p in traj],
                        color=color, lw=1, marker=".", alpha=0.7)
        c = summary[str(b)]["across_solutions"]
        ax.set(xlabel="mean local loss (rel. output error, FP inputs)", ylabel="probe NLL",
               title=f"int{b}: across solutions rho {_fmt(c['spearman'])}, "
                     f"tau {_fmt(c['kendall'])}")
        ax.title.set_fontsize(9)
    save_figure(fig, path)


def plot_trajectories(state, path):
    fig, panels = _panels(state, 3.6)
    control = state["runs"].get("fp-ft")
    for ax, b in panels:
        twin = ax.twinx()
        for r in runs_at(state, b):
            if r["method"] == "qaft":
                t = r["trajectory"]
                x = [p["tokens_processed"] for p in t]
                ax.plot(x, [p["nll"] for p in t], color="tab:green", marker="o", label="QAFT NLL")
                twin.plot(x, [p["local_fp_mean"] for p in t], color="tab:green", ls="--",
                          marker=".", label="QAFT local")
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
                            "the solution"}


def _findings(bits: int, s: dict, runs: list[dict], fp: dict | None, ft: dict | None) -> str:
    """One paragraph of numbers for one bit width."""
    by = {r["method"]: r for r in runs if not r["variant"]}
    ppl = ", ".join(f"{k} {v:,.2f}" for k, v in s["perplexity"].items())
    out = [f"**int{bits}**: perplexity {ppl}"]
    if fp and ft:
        out[-1] += (f" (FP {fp['metrics']['perplexity']:,.2f}; the FP model fine-tuned on the same "
                    f"tokens with the same schedule {ft['metrics']['perplexity']:,.2f})")
    if "rtn" in by and "gptq" in by:
        r, g = by["rtn"]["metrics"], by["gptq"]["metrics"]
        out.append(f"GPTQ takes the mean local loss from {r['local_fp_mean']:.4g} (RTN) to "
                   f"{g['local_fp_mean']:.4g} and the probe NLL from {r['probe_nll']:.3f} to "
                   f"{g['probe_nll']:.3f}")
    if "qaft" in by and by["qaft"]["trajectory"]:
        t0, q = by["qaft"]["trajectory"][0], by["qaft"]["metrics"]
        out.append(f"QAFT moves the probe NLL from {t0['nll']:.3f} to {q['probe_nll']:.3f} while "
                   f"its mean local loss goes from {t0['local_fp_mean']:.4g} to "
                   f"{q['local_fp_mean']:.4g}")
    c = s["per_layer"]
    if c and c["spearman"] is not None:
        out.append(f"one layer at a time, the local loss ranks the NLL cost with Spearman "
                   f"{c['spearman']:.2f} (absolute proxy loss "
                   f"{_fmt(s['per_layer_proxy']['spearman'])})")
    if s["across_solutions"]["spearman"] is not None:
        out.append(f"across solutions {s['across_solutions']['spearman']:.2f}")
    if s["grad_cosine"]:
        cos = ", ".join(f"{m} {v['mean']:.3f}" for m, v in s["grad_cosine"].items())
        out.append(f"mean cosine of the local and global gradients: {cos}")
    return "; ".join(out) + "."


def report(state: dict, summary: dict) -> str:
    cfg = state["config"]
    runs = state["runs"]
    fp, ft = runs.get("fp"), runs.get("fp-ft")
    lines = [f"# Local vs global loss: {cfg['model']} on {cfg['data']}", "",
             f"Budget {cfg['samples']} x {cfg['seq_len']} = {state['budget']['unique_tokens']:,} "
             f"unique tokens for every method (QAFT and the FP control: {cfg['epochs']} epoch(s), "
             f"lr {cfg['lr']}); held-out: {state['heldout']['eval_windows']} x "
             f"{state['heldout']['seq_len']} tokens for NLL/KL, the first "
             f"{state['heldout']['probe_windows']} windows for the probes.", "",
             "| run | perplexity | KL(FP‖Q) | probe NLL | mean local (FP in) | mean local "
             "(propagated) | distance | tokens processed | solve s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs.values():
        m = r["metrics"]
        lines.append(f"| {r['id']} | {m['perplexity']:,.2f} | {_fmt(m['kl'], 4)} | "
                     f"{m['probe_nll']:.4f} | {m['local_fp_mean']:.4g} | "
                     f"{m['local_prop_mean']:.4g} | {m['distance']:.4f} | "
                     f"{r['budget']['tokens_processed']:,} | {r['seconds']['solve']:.0f} |")
    lines += ["", "## Alignment (Spearman rho / Kendall tau)", "",
              "| bits | per layer (one at a time) | per layer, absolute proxy | across solutions | "
              "QAFT trajectory | GPTQ per-block increments | grad cosine mean (rtn / gptq / qaft) |",
              "|---|---|---|---|---|---|---|"]
    for b, s in summary.items():
        cos = " / ".join(_fmt(s["grad_cosine"].get(m, {}).get("mean"), 3) for m in MAIN)
        lines.append(f"| {b} | {_corr(s['per_layer'])} | {_corr(s['per_layer_proxy'])} | "
                     f"{_corr(s['across_solutions'])} | "
                     f"{_corr(s['qaft_trajectory'])} | {_corr(s['gptq_trajectory'])} | {cos} |")
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
    lines += ["", "## Findings", ""]
    for b, s in summary.items():
        lines += [_findings(int(b), s, runs_at(state, int(b)), fp, ft), ""]
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
    atomic_write_text(out / "report.md", report(state, summary))

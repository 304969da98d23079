"""The misalignment recipe's plots, drawn from its results.json state alone (`write_plots`);
`PLOTS` names each file with its caption, which the report repeats."""

from __future__ import annotations

import math
from pathlib import Path

from compare.alignment import runs_at
from compare.plots import new_figure, save_figure

__all__ = ["PLOTS", "COLORS", "fmt", "write_plots"]

COLORS = {"rtn": "tab:red", "gptq": "tab:blue", "qaft": "tab:green", "qaft-mse": "tab:cyan",
          "qaft-gptq": "tab:olive", "fp-ft": "tab:gray", "block-ap": "tab:brown",
          "hqq": "tab:pink"}
QAFT_METHODS = ("qaft", "qaft-mse", "qaft-gptq")




def fmt(x, digits=2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


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
               title=f"{sens['spec']} one layer: rho {fmt(c['spearman'])}, "
                     f"tau {fmt(c['kendall'])}")
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
               title=f"int{b}: across solutions rho {fmt(c['spearman'])}, "
                     f"tau {fmt(c['kendall'])}")
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
               title=f"int{b}: rho layer {fmt(lad['layer_alignment']['spearman'])}, "
                     f"block {fmt(lad['block_alignment']['spearman'])}")
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


def write_plots(state: dict, out: Path, summary: dict) -> None:
    """Every plot of PLOTS into the folder `out`."""
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

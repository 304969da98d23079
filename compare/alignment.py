"""How well local reconstruction loss predicts global loss: the statistics, defined once.

Local loss of layer l at a solution W_hat (ptq.metrics): the relative output error
    e_l = ||X dW^T||^2 / ||X W^T||^2 = tr(dW H dW^T) / tr(W H W^T),   dW = W_hat - W, H = 2/m X^T X,
on held-out inputs X. Its gradient with respect to the solution is
    d e_l / d W_hat = 2 dW H / tr(W H W^T)                                              (out, in),
the direction a layer-wise PTQ method descends. The global loss is the mean token NLL on held-out
text (compare.evaluate). Alignment is measured as
  - rank correlation (Spearman's rho, Kendall's tau-b, scipy.stats) between local and global loss
    across layers (one layer quantized at a time) or across solutions (methods, checkpoints);
  - the cosine between d e_l / d W_hat (ptq.metrics.relative_output_error_grad) and
    d NLL / d W_hat, layer by layer;
  - the radius: how far from W the NLL stays below a threshold, along a path t -> W + t D.
"""

from __future__ import annotations

import math
from statistics import mean, median

import torch

__all__ = ["rank_correlation", "cosine", "first_crossing", "relative_norm", "runs_at",
           "qaft_points", "ladder", "summarize_alignment"]


def rank_correlation(local: list[float], glob: list[float]) -> dict:
    """{"spearman", "kendall", "n"} between paired values. A coefficient is None where it is
    undefined (fewer than 3 pairs, a constant side, or non-finite values), never NaN."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(local, glob, strict=True)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    out = {"spearman": None, "kendall": None, "n": len(pairs)}
    if len(pairs) < 3:
        return out
    x, y = zip(*pairs)
    if len(set(x)) < 2 or len(set(y)) < 2:
        return out
    out["spearman"] = float(stats.spearmanr(x, y).statistic)
    out["kendall"] = float(stats.kendalltau(x, y).statistic)
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine similarity of two tensors as flat vectors, float64; None when either is zero."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    return float(a @ b / (na * nb))


def relative_norm(deltas: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> float:
    """sqrt(sum_l ||D_l||^2 / sum_l ||W_l||^2): the size of a whole-model step, relative to W."""
    num = sum(float(d.double().pow(2).sum()) for d in deltas.values())
    den = sum(float(weights[n].double().pow(2).sum()) for n in deltas)
    return math.sqrt(num / den) if den > 0 else 0.0


def first_crossing(ts: list[float], values: list[float], limit: float) -> float | None:
    """The smallest t at which the curve (ts increasing, values[0] <= limit) reaches `limit`,
    linearly interpolated between grid points; None if it stays below on the whole grid."""
    if values[0] > limit:
        raise ValueError(f"the curve starts above the limit ({values[0]} > {limit})")
    for (t0, v0), (t1, v1) in zip(zip(ts, values), zip(ts[1:], values[1:])):
        if v1 >= limit:
            return t0 + (t1 - t0) * (limit - v0) / (v1 - v0) if v1 != v0 else t1
    return None


# ----------------------------------------------------- the statistics of one alignment study

def runs_at(state: dict, bits: int) -> list[dict]:
    return [r for r in state["runs"].values() if r["bits"] == bits]


def qaft_points(run: dict) -> list[dict]:
    """QAFT checkpoints other than the start (= RTN) and the end (= the run itself)."""
    return [p for p in run["trajectory"] if 0 < p["step"] < run["budget"]["steps"]]


def _correlation(local: list, glob: list, seed: int) -> dict:
    """Spearman and Kendall with bootstrap (and Fisher-z) intervals; `significant` only when
    every interval excludes zero (compare.stats.correlation_interval)."""
    from .stats import correlation_interval

    out = rank_correlation(local, glob)
    for method in ("spearman", "kendall"):
        ci = correlation_interval(local, glob, method=method, seed=seed)
        out[f"{method}_ci"] = {k: ci[k] for k in ("low", "high", "fisher_low", "fisher_high",
                                                   "significant")}
    return out


def _by_method(runs: list[dict]) -> dict[str, list[dict]]:
    """{method: [run per seed, in seed order]} of the main (non-variant) runs."""
    out: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: r.get("seed", 0)):
        if not r["variant"]:
            out.setdefault(r["method"], []).append(r)
    return out


COMPARED = (("rtn", "gptq"), ("rtn", "hqq"), ("gptq", "block-ap"), ("gptq", "qaft"),
            ("gptq", "qaft-mse"), ("gptq", "qaft-gptq"), ("block-ap", "qaft"),
            ("block-ap", "qaft-gptq"), ("qaft", "qaft-gptq"), ("fp-ft", "qaft"),
            ("fp-ft", "qaft-gptq"), ("fp-ft", "gptq"))
LEVELS = ("layer", "block", "global")  # the locality ladder, most local first


def _solutions(runs: list[dict], key: str) -> tuple[list, list]:
    """(local, probe NLL) over the runs and the QAFT checkpoints between start and end; `key`
    is the local loss: local_fp_mean (layer level) or block_fp_mean (block level)."""
    local = [r["metrics"].get(key) for r in runs]
    glob = [r["metrics"]["probe_nll"] for r in runs]
    for r in runs:
        if r["method"].startswith("qaft"):
            local += [p.get(key) for p in qaft_points(r)]
            glob += [p["nll"] for p in qaft_points(r)]
    return local, glob


def ladder(runs: list[dict], by: dict[str, list[dict]], seed: int) -> dict:
    """The locality ladder at one width: each method's level (layer, block or global objective),
    perplexity and its local losses at the layer and the block level (means over seeds); and,
    across the same solutions, how well each level's local loss ranks the global loss."""
    from .stats import seed_spread

    rows = {}
    for m, rs in by.items():
        if rs[0]["bits"] is None or not rs[0].get("level"):
            continue
        rows[m] = {"level": rs[0]["level"],
                   "perplexity": seed_spread([r["metrics"]["perplexity"] for r in rs]),
                   "layer_local": mean(r["metrics"]["local_fp_mean"] for r in rs),
                   "block_local": (mean(r["metrics"]["block_fp_mean"] for r in rs)
                                   if all(r["metrics"].get("block_fp_mean") is not None
                                          for r in rs) else None)}
    order = sorted(rows, key=lambda m: (LEVELS.index(rows[m]["level"]),
                                        rows[m]["perplexity"]["mean"]))
    return {"methods": {m: rows[m] for m in order},
            "layer_alignment": _correlation(*_solutions(runs, "local_fp_mean"), seed),
            "block_alignment": _correlation(*_solutions(runs, "block_fp_mean"), seed)}


def compare_methods(a_runs: list[dict], b_runs: list[dict], seed: int = 0) -> dict:
    """B against A on the held-out windows, seed by seed: the paired bootstrap of the per-window
    NLL difference (B - A; negative: B is better) and the perplexity ratio B / A. `holds` is
    "b" ("a") when B (A) is better on every seed with an interval excluding zero, else None."""
    from .stats import perplexity_ratio

    a = {r.get("seed", 0): r for r in a_runs}
    b = {r.get("seed", 0): r for r in b_runs}
    per_seed = []
    for s in sorted(set(a) & set(b)):
        wa, wb = a[s]["metrics"].get("window_nll"), b[s]["metrics"].get("window_nll")
        if not wa or not wb or len(wa) < 2:
            continue
        ci = perplexity_ratio(wa, wb, seed=seed)
        per_seed.append({"seed": s, **{k: ci[k] for k in ("diff", "low", "high", "ratio",
                                                            "ratio_low", "ratio_high",
                                                            "excludes_zero")}})
    holds = None
    if per_seed and all(c["excludes_zero"] for c in per_seed):
        signs = {c["diff"] < 0 for c in per_seed}
        if len(signs) == 1:
            holds = "b" if signs.pop() else "a"
    return {"per_seed": per_seed, "holds": holds, "seeds": len(per_seed)}


def summarize_alignment(state: dict) -> dict:
    """Every alignment statistic of one study (the misalignment recipe's results.json state:
    runs, sensitivity, fp_probe_nll, config.bits), per bit width, each with its uncertainty:
    perplexities as mean and spread over seeds, method comparisons as paired bootstrap
    intervals over the held-out windows per seed, rank correlations with bootstrap / Fisher-z
    intervals. The report draws these and states only what they support."""
    from .stats import seed_spread

    seed = min(state["config"].get("seeds", [state["config"].get("seed", 0)]))
    fp_ft = _by_method([r for r in state["runs"].values() if r["method"] == "fp-ft"])
    out = {}
    for b in state["config"]["bits"]:
        runs = runs_at(state, b)
        by = {**_by_method(runs), **fp_ft}
        first = {m: rs[0] for m, rs in by.items()}
        sens = state["sensitivity"].get(str(b))
        layers = sens["layers"] if sens else []
        s = {"per_layer": _correlation([r["rel_err_fp"] for r in layers],
                                       [r["delta_nll"] for r in layers], seed),
             "per_layer_proxy": _correlation([r["proxy_loss"] for r in layers],
                                             [r["delta_nll"] for r in layers], seed)}
        s["across_solutions"] = _correlation(*_solutions(runs, "local_fp_mean"), seed)
        s["ladder"] = ladder(runs, by, seed)
        qaft = first["qaft"]["trajectory"] if "qaft" in first else []
        s["qaft_trajectory"] = _correlation([p["local_fp_mean"] for p in qaft],
                                            [p["nll"] for p in qaft], seed)
        # both only grow as GPTQ goes down the blocks; what each block adds is what can disagree
        gptq = [{"local_fp_mean": 0.0, "nll": state["fp_probe_nll"]}] + (
            first["gptq"]["trajectory"] if "gptq" in first else [])
        s["gptq_trajectory"] = _correlation(
            [y["local_fp_mean"] - x["local_fp_mean"] for x, y in zip(gptq, gptq[1:])],
            [y["nll"] - x["nll"] for x, y in zip(gptq, gptq[1:])], seed)
        s["grad_cosine"] = {}
        s["landscape"] = {}
        for m, r in first.items():
            cos = [x["grad_cosine"] for x in r["layers"] if x.get("grad_cosine") is not None]
            if cos and r["bits"] is not None:
                s["grad_cosine"][m] = {"mean": mean(cos), "median": median(cos)}
            if r["landscape"]:
                s["landscape"][m] = {
                    "distance": r["metrics"]["distance"],
                    "radius_solution": r["landscape"]["radius_solution"],
                    "radius_random_same_norm": r["landscape"]["radius_random_same_norm"]}
        s["perplexity"] = {m: mean(r["metrics"]["perplexity"] for r in rs)
                           for m, rs in by.items() if rs[0]["bits"] is not None}
        s["methods"] = {m: {"perplexity": seed_spread([r["metrics"]["perplexity"] for r in rs]),
                            "nll": seed_spread([r["metrics"]["nll"] for r in rs]),
                            "chosen": [r.get("chosen") for r in rs]}
                        for m, rs in by.items()}
        s["comparisons"] = {f"{x} vs {y}": compare_methods(by[x], by[y], seed)
                            for x, y in COMPARED if x in by and y in by}
        out[str(b)] = s
    return out

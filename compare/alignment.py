"""How well local reconstruction loss predicts global loss: the statistics, defined once.

Local loss of layer l at a solution W_hat (ptq.metrics): the relative output error
    e_l = ||X dW^T||^2 / ||X W^T||^2 = tr(dW H dW^T) / tr(W H W^T),   dW = W_hat - W, H = 2/m X^T X,
on held-out inputs X. Its gradient with respect to the solution is
    d e_l / d W_hat = 2 dW H / tr(W H W^T)                                              (out, in),
the direction a layer-wise PTQ method descends. The global loss is the mean token NLL on held-out
text (compare.evaluate). Alignment is measured as
  - rank correlation (Spearman's rho, Kendall's tau-b, scipy.stats) between local and global loss
    across layers (one layer quantized at a time) or across solutions (methods, checkpoints);
  - the cosine between d e_l / d W_hat and d NLL / d W_hat, layer by layer;
  - the radius: how far from W the NLL stays below a threshold, along a path t -> W + t D.
"""

from __future__ import annotations

import math

import torch

__all__ = ["rank_correlation", "local_loss_grad", "cosine", "first_crossing", "relative_norm"]


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


def local_loss_grad(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """d e / d W_hat = 2 (W_hat - W) H / tr(W H W^T), float32 (out, in) (module docstring)."""
    dW = W_hat.detach().float() - W.detach().float()
    Hf = H.float()
    energy = float(((W.detach().float() @ Hf).double() * W.detach().double()).sum())
    return 2.0 * (dW @ Hf) / max(energy, 1e-300)


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

"""HQQ, half-quadratic quantization (Badri & Shaji 2023, "Half-Quadratic Quantization of Large
Machine Learning Models", mobiusml.github.io/hqq_blog): a calibration-free method that fits each
block's scale and zero point to a sparsity-promoting l_p error (p < 1), so that a few outlying
weights do not drag the whole block's grid, by alternating a closed-form shrinkage of the error
with closed-form parameter updates.

Per block of the spec (row, group, channel or tensor), starting from the min/max grid:
    q   = codes of W on the current grid                          (round to nearest)
    W_e = shrink_p(W - (q - z) s, beta)                            (the outliers the grid gives up)
    z   = round(mean(q - (W - W_e) / s))                           (asymmetric int grids)
    s   = <W - W_e, q - z> / ||q - z||^2                           (least squares, with fit_scale)
    beta <- kappa * beta
where shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta). Each block keeps the parameters
of the iteration with its lowest sum |W - W_hat|^p (the first is the min/max grid).

Departures from the reference implementation, both from this toolkit's grid: zero points are
integers (`ptq.formats`; the reference keeps them in floating point), so each zero update is
rounded; and the scale is fitted too (the reference keeps the min/max scale), which gives the
method back the continuous degree of freedom the integer zero takes away and also covers the
symmetric and floating-point grids, which have no zero point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import OptionsError
from .formats import (QParams, QuantSpec, _as_blocked_params, _blocked, _from_grid, _on_grid,
                      _qparams, check_finite, dequantize, quantize)
from .metrics import layer_loss
from .registry import LayerStats, QuantResult, register_method

__all__ = ["HQQOptions", "HQQ_SEARCH_SPACE", "hqq_quantize"]


@dataclass(frozen=True)
class HQQOptions:
    iters: int = field(default=20, metadata={"help": "half-quadratic iterations"})
    lp_norm: float = field(default=0.7, metadata={"help": "p of the l_p error (p <= 1)"})
    beta: float = field(default=10.0, metadata={"help": "initial penalty of the splitting"})
    kappa: float = field(default=1.01, metadata={"help": "growth of beta per iteration"})
    fit_scale: bool = field(default=True, metadata={"help": "also fit each block's scale"})

    def __post_init__(self):
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 0:
            raise OptionsError(f"hqq iters={self.iters!r}: give an integer >= 0, e.g. 20")
        if not 0 < self.lp_norm <= 1:
            raise OptionsError(f"hqq lp_norm={self.lp_norm}: give p in (0, 1], e.g. 0.7")
        if not (self.beta > 0 and self.kappa >= 1):
            raise OptionsError(f"hqq beta={self.beta}, kappa={self.kappa}: need beta > 0 and "
                               "kappa >= 1 (e.g. 10 and 1.01)")


HQQ_SEARCH_SPACE = {"lp_norm": (0.7, 1.0), "beta": (10.0, 1.0)}


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal step of the l_p penalty: generalized soft thresholding."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


@torch.no_grad()
def _fit(wb: torch.Tensor, p: QParams, spec: QuantSpec, options: HQQOptions) -> QParams:
    """The HQQ iterations on blocked weights wb (rows, n_blocks, block) from blocked params p."""
    s, z = p.scale, p.zero
    best_s, best_z = s, z
    best_err = torch.full_like(s, float("inf"))
    beta = options.beta
    for it in range(options.iters + 1):
        q = _on_grid(wb, QParams(s, z), spec)
        err = (wb - _from_grid(q, QParams(s, z))).abs().pow(options.lp_norm).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = None if z is None else torch.where(better, z, best_z)
        if it == options.iters:
            break
        target = wb - _shrink(wb - _from_grid(q, QParams(s, z)), beta, options.lp_norm)
        if z is not None:
            z = torch.round((q - target / s).mean(-1, keepdim=True)).clamp(spec.qmin, spec.qmax)
        if options.fit_scale:
            c = q - z if z is not None else q
            fitted = (target * c).sum(-1, keepdim=True) / (c * c).sum(-1, keepdim=True)
            s = torch.where(torch.isfinite(fitted) & (fitted > 0), fitted, s)
        beta *= options.kappa
    return QParams(best_s.squeeze(-1), None if best_z is None else best_z.squeeze(-1))


@register_method("hqq", options=HQQOptions, search_space=HQQ_SEARCH_SPACE)
def hqq_quantize(W: torch.Tensor, stats: LayerStats | None, spec: QuantSpec,
                 options: HQQOptions = HQQOptions()) -> QuantResult:
    """HQQ of W (out, in) (module docstring); with a Hessian in `stats`, also reports
    tr(dW H dW^T) as its loss."""
    check_finite(W)
    p = _fit(_blocked(W, spec), _as_blocked_params(_qparams(W, spec, None)), spec, options)
    qt = quantize(W, spec, qparams=p)
    Wq = dequantize(qt)
    loss = layer_loss(W, Wq, stats.H) if stats is not None and stats.H is not None else None
    return QuantResult(Wq, qt, loss)

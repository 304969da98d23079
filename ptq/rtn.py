"""Round-to-nearest (RTN): each weight goes to its nearest grid point, with scales from each
block's min/max or, with `clip_search`, from the MSE-optimal shrink of that range."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .formats import ClipSearch, QuantSpec, dequantize, quantize
from .metrics import layer_loss
from .registry import LayerStats, QuantResult, register_method

__all__ = ["RTNOptions", "RTN_SEARCH_SPACE", "rtn_quantize"]


@dataclass(frozen=True)
class RTNOptions:
    clip_search: bool = field(default=False, metadata={
        "help": "MSE search of each group's / row's clipping range"})
    clip_grid: int = field(default=20, metadata={"help": "shrink factors tried by clip_search"})
    clip_max_shrink: float = field(default=0.2, metadata={
        "help": "largest fraction of the range clip_search may cut"})

    def __post_init__(self):
        if self.clip_search:
            ClipSearch(self.clip_grid, self.clip_max_shrink)  # validates the numbers

    def clip(self) -> ClipSearch | None:
        return ClipSearch(self.clip_grid, self.clip_max_shrink) if self.clip_search else None


RTN_SEARCH_SPACE = {"clip_search": (False, True)}


@register_method("rtn", options=RTNOptions, search_space=RTN_SEARCH_SPACE)
def rtn_quantize(W: torch.Tensor, stats: LayerStats | None, spec: QuantSpec,
                 options: RTNOptions = RTNOptions()) -> QuantResult:
    """RTN of W (out, in); with a Hessian in `stats`, also reports tr(dW H dW^T) as its loss."""
    qt = quantize(W, spec, clip=options.clip())
    Wq = dequantize(qt)
    loss = layer_loss(W, Wq, stats.H) if stats is not None and stats.H is not None else None
    return QuantResult(Wq, qt, loss)

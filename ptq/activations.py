"""Fake quantization of activations for W8A8-style evaluation (paper D, Ahmadian et al. 2023,
arXiv 2305.19268; LLM.int8 and SmoothQuant use the same scheme).

Each selected linear layer's input X (..., in) is rounded per token, symmetrically:
    s_t = max_j |X_tj| / q,  X̂_tj = clamp(round(X_tj / s_t), -q, q) * s_t,  q = 2^(b-1) - 1,
so every token (row) gets its own scale from its largest entry; one outlier feature therefore
coarsens the grid of every other feature of that token, which is why outliers matter for W8A8.
Weights are quantized separately (per output channel: spec int8-sym-ch). The rounding is done in
float32 and cast back to the input's dtype; a token of zeros stays zero.

`quantized_inputs(model, bits)` installs the rounding as forward pre-hooks on the layers the one
tree walker selects and removes them on exit; the weights are untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import OptionsError
from .layers import FilterFn, select_linears

__all__ = ["quantize_per_token", "quantized_inputs"]


def quantize_per_token(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x rounded to a symmetric `bits`-bit grid with one scale per row of the last dimension."""
    if not 2 <= bits <= 16:
        raise OptionsError(f"activation bits={bits}: use 2 to 16 (8 for W8A8)")
    q = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / q
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows stay zero
    return (torch.clamp(torch.round(xf / scale), -q, q) * scale).to(x.dtype)


@contextmanager
def quantized_inputs(model: nn.Module, bits: int = 8,
                     filter_fn: FilterFn | None = None) -> Iterator[list[str]]:
    """Within the block, every selected linear layer sees its input fake-quantized per token;
    yields the names of those layers."""
    quantize_per_token(torch.zeros(1), bits)  # check bits before installing anything

    def hook(module, args):
        return (quantize_per_token(args[0], bits), *args[1:])

    layers = select_linears(model, filter_fn)
    handles = [module.register_forward_pre_hook(hook) for _, module in layers]
    try:
        yield [name for name, _ in layers]
    finally:
        for h in handles:
            h.remove()

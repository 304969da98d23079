"""The one tree walker: which linear layers a method (PTQ, QAFT, LoRA, probes) touches.

`quantizable_linears` yields the layers, by default every linear layer inside the decoder blocks
(embeddings and lm_head stay in full precision); a `filter_fn(module, name)` replaces that
default. GPT-2's `Conv1D` stores its weight transposed, (in, out); `linear_weight` and
`set_linear_weight` hide that, so every method sees (out_features, in_features).
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from .arch import block_prefix
from .errors import QalignError

__all__ = ["FilterFn", "is_linear", "linear_weight", "set_linear_weight", "in_decoder_blocks",
           "quantizable_linears", "select_linears"]

FilterFn = Callable[[nn.Module, str], bool]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2), which is a linear layer stored transposed."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features); a view, no copy."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@torch.no_grad()
def set_linear_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an (out, in) weight back in place (keeps the Parameter, so tied views stay tied)."""
    target = module.weight if isinstance(module, nn.Linear) else module.weight.t()
    target.copy_(weight.to(target.dtype))


def in_decoder_blocks(model: nn.Module) -> FilterFn:
    """The default filter: linear layers whose name lies under the model's decoder blocks."""
    prefix = block_prefix(model) + "."
    return lambda module, name: name.startswith(prefix)


def quantizable_linears(model: nn.Module, filter_fn: FilterFn | None = None
                        ) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every plain linear layer (nn.Linear or Conv1D) the filter keeps, in
    module order. A module that wraps a linear layer (class attribute `wraps_linear = True`, as
    QAFT's FakeQuantLinear) is not descended into, so a layer is never selected twice."""
    keep = filter_fn if filter_fn is not None else in_decoder_blocks(model)

    def walk(module: nn.Module, prefix: str):
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if is_linear(child):
                if keep(child, name):
                    yield name, child
            elif not getattr(child, "wraps_linear", False):
                yield from walk(child, name)

    yield from walk(model, "")


def select_linears(model: nn.Module, filter_fn: FilterFn | None = None
                   ) -> list[tuple[str, nn.Module]]:
    """`quantizable_linears` as a list; a selection that matches nothing is an error, since
    quantizing nothing silently would report an FP model as quantized."""
    layers = list(quantizable_linears(model, filter_fn))
    if not layers:
        raise QalignError(f"no linear layer of {type(model).__name__} matched the filter; "
                          "check filter_fn (it receives (module, name)) or leave it out to take "
                          "every linear layer of the decoder blocks")
    return layers

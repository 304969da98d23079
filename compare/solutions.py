"""A *solution* and how to hold it in a model: the (out, in) weights W_hat a method gives the
selected linear layers (`solution_weights`), swapped into a model for a measurement and put back
after (`swapped_weights`), and the model's mean NLL on probe windows (`_nll`).

Shared by the probes (`compare.probes`), the one-layer sensitivity (`compare.sensitivity`) and
the loss landscape (`compare.landscape`); it imports none of them, so each can import it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ptq.layers import linear_weight, set_linear_weight
from qaft.fake_quant import FakeQuantLinear

from .evaluate import evaluate_nll

__all__ = ["solution_weights", "swapped_weights"]


def _weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight the module computes with: the fake-quantized one under QAFT."""
    if isinstance(module, FakeQuantLinear):
        return module.quantized_weight()
    return linear_weight(module)


@torch.no_grad()
def solution_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """{name: (out, in) weight the layer computes with}, detached copies."""
    return {n: _weight(model.get_submodule(n)).detach().clone() for n in names}


@contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Hold `weights` in the named plain linear layers inside the block, then put the old back."""
    modules = {n: model.get_submodule(n) for n in weights}
    saved = {n: linear_weight(m).detach().clone() for n, m in modules.items()}
    try:
        for n, m in modules.items():
            set_linear_weight(m, weights[n])
        yield model
    finally:
        for n, m in modules.items():
            set_linear_weight(m, saved[n])


def _nll(model, windows, batch_size) -> float:
    return evaluate_nll(model, windows, batch_size=batch_size, progress=False).nll

"""Inputs of linear layers on given token blocks, for local-loss measurements."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["capture_linear_inputs"]


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, blocks: torch.Tensor, names: list[str],
                          max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """{name: X (m, in_features)}: the inputs each named layer receives when `model` reads
    `blocks` (n, seq_len), the first max_tokens token positions of them, on the CPU."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: store[n].append(args[0].reshape(-1, args[0].shape[-1]).cpu()))
        for n in names]
    device = next(model.parameters()).device
    try:
        for block in blocks:
            model(input_ids=block[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(x)[:max_tokens] for n, x in store.items()}

"""Running Hessian of a linear layer's reconstruction loss, H = 2/n sum_t x_t x_t^T.

Each batch's X^T X is a float32 GEMM (the fast part), also for the inputs of a bfloat16 or
float16 model, which are upcast first (a 16-bit GEMM would round every sum to 8 or 11 bits);
the running mean is kept in float64, so many batches add up without drift: after batches of
m_1, m_2, ... tokens, H = 2 / (m_1 + m_2 + ...) * sum_b X_b^T X_b, the Hessian of the
concatenated batch."""

from __future__ import annotations

import torch

__all__ = ["HessianAccumulator"]


class HessianAccumulator:
    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add inputs x of shape (..., in_features); every leading position is one token."""
        x = x.reshape(-1, x.shape[-1])
        m = x.shape[0]
        if m == 0:
            return
        x = x.float()  # a bf16/fp16 model's inputs: X^T X must not be summed in 16 bits
        xtx = x.T @ x  # (in, in), float32 GEMM
        total = self.n_tokens + m
        self.H.mul_(self.n_tokens / total).add_(xtx.to(torch.float64), alpha=2.0 / total)
        self.n_tokens = total

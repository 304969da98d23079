"""Running Hessian of a linear layer's reconstruction loss, H = 2/n sum_t x_t x_t^T.

Each batch's X^T X is a GEMM with float32 products and float32 sums, also for the inputs of a
bfloat16 or float16 model (a 16-bit GEMM would round every sum to 8 or 11 bits); the running
mean is kept in float64, so many batches add up without drift: after batches of m_1, m_2, ...
tokens, H = 2 / (m_1 + m_2 + ...) * sum_b X_b^T X_b, the Hessian of the concatenated batch.

Inputs of a bfloat16 model on a CPU take oneDNN's bf16 path for that float32 GEMM
(`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`, set for the one GEMM and restored):
it rounds the operands to bfloat16, which leaves values that already are bfloat16 unchanged,
multiplies them exactly (two 8-bit significands fit in float32's 24) and sums in float32, so it
computes the same X^T X as the plain float32 GEMM up to the order of the sums, 2.7x faster on a
CPU with AMX/AVX512-BF16 (benchmarks/gptq_breakdown.py; the values are the same on any CPU, the
speed was not measured on one without bf16 units). Any other input (float32, float16, on another
device, or a build without oneDNN) takes the plain float32 GEMM."""

from __future__ import annotations

from contextlib import contextmanager

import torch

__all__ = ["HessianAccumulator", "gram"]


@contextmanager
def _cpu_fp32_matmul_precision(precision: str):
    """oneDNN's float32 matmul precision ("ieee", "bf16", ...) inside the block, restored after."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = precision
    try:
        yield
    finally:
        matmul.fp32_precision = before


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X of x (m, n) as float32 (n, n): float32 products and sums (module docstring)."""
    exact_bf16 = (x.dtype == torch.bfloat16 and x.device.type == "cpu"
                  and torch.backends.mkldnn.is_available())
    x = x.float()
    if not exact_bf16:
        return x.T @ x
    with _cpu_fp32_matmul_precision("bf16"):
        return x.T @ x


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
        xtx = gram(x)  # (in, in) float32
        total = self.n_tokens + m
        self.H.mul_(self.n_tokens / total).add_(xtx.to(torch.float64), alpha=2.0 / total)
        self.n_tokens = total

"""The local loss of a linear layer, defined once for the whole toolkit.

relative output error = ||X W^T - X W_hat^T||_F^2 / ||X W^T||_F^2  for inputs X (m, in),
which equals tr(dW H dW^T) / tr(W H W^T) with H = 2/m X^T X (dW = W - W_hat), so it can be
computed from a Hessian without keeping X.
"""

from __future__ import annotations

import torch

__all__ = ["relative_output_error", "relative_output_error_from_hessian", "layer_loss"]


def layer_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): GPTQ's proxy loss, 2/m ||X dW^T||^2. The (rows x n x n) GEMM
    runs in float32 (a float64 one would cost as much as GPTQ itself on large layers); the
    difference and the final sum are float64."""
    dW = W.detach().to(torch.float64) - Wq.detach().to(torch.float64)
    return float(((dW.float() @ H.float()).double() * dW).sum())


@torch.no_grad()
def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||^2 / ||X W^T||^2, in float64."""
    X = X.detach().reshape(-1, X.shape[-1]).to(torch.float64)
    y = X @ W.detach().to(torch.float64).T
    err = y - X @ W_hat.detach().to(torch.float64).T
    return float(err.pow(2).sum() / y.pow(2).sum().clamp_min(1e-300))


def relative_output_error_from_hessian(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor,
                                       loss: float | None = None) -> float:
    """The same ratio from H; `loss` = layer_loss(W, W_hat, H) when the caller already has it."""
    loss = layer_loss(W, W_hat, H) if loss is None else loss
    energy = float(((W.detach().float() @ H.float()).double() * W.detach().double()).sum())
    return loss / energy if energy > 0 else 0.0

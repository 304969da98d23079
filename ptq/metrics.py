"""The local loss of a linear layer, defined once for the whole toolkit.

relative output error = ||X W^T - X W_hat^T||_F^2 / ||X W^T||_F^2  for inputs X (m, in),
which equals tr(dW H dW^T) / tr(W H W^T) with H = 2/m X^T X (dW = W - W_hat), so it can be
computed from a Hessian without keeping X. Its gradient with respect to the solution is
    d e / d W_hat = 2 (W_hat - W) H / tr(W H W^T)                                   (out, in),
the direction a layer-wise PTQ method descends. Every module that reports a local loss (the PTQ
driver, QAFT's training record, the probes of `compare`) calls these functions; W is always the
FP weight.

The local loss of a decoder block, one level less local, is its relative output error
    ||B_hat(X) - B(X)||^2 / ||B(X) - X||^2
on the same inputs X: the quantized block's output against the FP block's, relative to what the
FP block adds to the residual stream X (relative to the stream itself every block would look
nearly exact). `block_error_sums` gives the two sums, to accumulate over batches.
"""

from __future__ import annotations

import math

import torch

__all__ = ["layer_loss", "output_energy", "relative_output_error",
           "relative_output_error_from_hessian", "relative_output_error_grad",
           "output_error_sums", "block_error_sums", "ratio", "weight_relative_error"]


def _pow2(x: torch.Tensor) -> float:
    """The power of two nearest above |x|'s largest entry (1 for zero or non-finite): dividing
    by it is exact, so a scaled product rounds exactly like the unscaled one."""
    m = x.detach().abs().max().double()
    return 1.0 if not 0 < m < math.inf else 2.0 ** int(torch.frexp(m).exponent)


def _quadratic(A: torch.Tensor, H: torch.Tensor) -> float:
    """tr(A H A^T) with A float64: the (rows x n x n) GEMM runs in float32 on A and H scaled by
    powers of two, so entries near float32's limits neither overflow nor flush to zero (for
    ordinary entries the result is the unscaled float32 computation, bit for bit)."""
    a, h = _pow2(A), _pow2(H)
    As = A / a
    return float(((As.float() @ (H.float() / h)).double() * As).sum()) * (a * a * h)


def layer_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Wq) H (W - Wq)^T): GPTQ's proxy loss, 2/m ||X dW^T||^2. The (rows x n x n) GEMM
    runs in float32 (a float64 one would cost as much as GPTQ itself on large layers); the
    difference and the final sum are float64."""
    return _quadratic(W.detach().to(torch.float64) - Wq.detach().to(torch.float64), H.detach())


def output_energy(W: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H W^T) = 2/m ||X W^T||^2, the denominator of the relative output error."""
    return _quadratic(W.detach().to(torch.float64), H.detach())


@torch.no_grad()
def relative_output_error(W: torch.Tensor, W_hat: torch.Tensor, X: torch.Tensor) -> float:
    """||X W^T - X W_hat^T||^2 / ||X W^T||^2, in float64."""
    X = X.detach().reshape(-1, X.shape[-1]).to(torch.float64)
    y = X @ W.detach().to(torch.float64).T
    err = y - X @ W_hat.detach().to(torch.float64).T
    return float(err.pow(2).sum() / y.pow(2).sum().clamp_min(1e-300))


def relative_output_error_from_hessian(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor,
                                       loss: float | None = None, energy: float | None = None
                                       ) -> float:
    """The same ratio from H; `loss` = layer_loss(W, W_hat, H) and `energy` =
    output_energy(W, H) when the caller already has them."""
    loss = layer_loss(W, W_hat, H) if loss is None else loss
    energy = output_energy(W, H) if energy is None else energy
    return loss / energy if energy > 0 else 0.0


def relative_output_error_grad(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor,
                               energy: float | None = None) -> torch.Tensor:
    """d e / d W_hat = 2 (W_hat - W) H / tr(W H W^T), float32 (out, in) (module docstring);
    `energy` = output_energy(W, H) when the caller already has it."""
    dW = W_hat.detach().float() - W.detach().float()
    energy = output_energy(W, H) if energy is None else energy
    return 2.0 * (dW @ H.float()) / max(energy, 1e-300)


@torch.no_grad()
def output_error_sums(X: torch.Tensor, W: torch.Tensor, *, dW: torch.Tensor | None = None,
                      Y_hat: torch.Tensor | None = None) -> tuple[float, float]:
    """(||X W_hat^T - X W^T||^2, ||X W^T||^2) as float64 sums, float32 GEMMs, for accumulating
    the relative output error over batches of inputs X (m, in). Give either dW = W_hat - W, or
    Y_hat = X W_hat^T when the caller already has the layer's own float32 output (bias removed):
    then one GEMM, X W^T, gives both terms."""
    X = X.detach().reshape(-1, X.shape[-1]).float()
    y = X @ W.detach().float().T
    if Y_hat is not None:
        diff = Y_hat.detach().reshape(y.shape).float() - y
    elif dW is not None:
        diff = X @ dW.detach().float().T
    else:
        raise TypeError("output_error_sums needs dW or Y_hat")
    return float(diff.pow(2).sum(dtype=torch.float64)), float(y.pow(2).sum(dtype=torch.float64))


@torch.no_grad()
def block_error_sums(X: torch.Tensor, Y: torch.Tensor, Y_hat: torch.Tensor
                     ) -> tuple[float, float]:
    """(||Y_hat - Y||^2, ||Y - X||^2) as float64 sums of float32 differences, for a block's
    relative output error (module docstring): X its input, Y the FP block's output, Y_hat the
    quantized block's, all (..., hidden)."""
    Y = Y.detach().float()
    num = (Y_hat.detach().float() - Y).pow(2).sum(dtype=torch.float64)
    den = (Y - X.detach().float()).pow(2).sum(dtype=torch.float64)
    return float(num), float(den)


def ratio(num: float, den: float) -> float:
    """num / den of accumulated error sums: 0 for 0 / 0, inf for x / 0."""
    return num / den if den > 0 else (float("inf") if num > 0 else 0.0)


def weight_relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """||W - W_hat||_F^2 / ||W||_F^2, the data-free error of a solution."""
    W, W_hat = W.detach().float(), W_hat.detach().float()
    return float((W - W_hat).pow(2).sum() / W.pow(2).sum().clamp_min(1e-30))

"""The STE's fake quantization in one pass each way, compiled for the CPU with numba.

The eager STE (`qaft.fake_quant`) makes W_hat = (clamp(round(W/s) + z, qmin, qmax) - z) * s in
six weight-sized passes, the clipping mask lo <= W <= hi in three more, and its backward in two
to five, each over all of the model's linear weights; that made a fake-quant training step of
SmolLM2-135M cost 1.57x an FP step under bfloat16 autocast. These kernels run the same float32
arithmetic per element, in the same order, in one pass forward (W -> W_hat) and one backward
(W, dL/dW_hat -> dL/dW and the per-block sums of the scale's and zero point's gradients, with
the mask recomputed from W instead of stored), and the step costs 1.20x (benchmarks/README.md):
  forward   q = rint(w / s) [+ z]; q clamped to [qmin, qmax]; w_hat = (q [- z]) * s, written as
            float32 or, under bfloat16 autocast, rounded to bfloat16 as the cast would round it
  backward  inside = (qmin - z) s <= w <= (qmax - z) s;  dL/dW = dL/dW_hat where inside, else 0
            (or everywhere, unclipped); per block sum(g w_hat - g_in w) and sum(g - g_in),
            g_in = g where inside (qaft.fake_quant gives the formulas); g float32 or bfloat16
So W_hat and dL/dW equal the eager path's bit for bit (tested); the per-element terms of the
block sums are the eager path's float32 values, summed in float64 in another order.

Taken for float32 CPU weights on integer grids when numba is installed (a core dependency);
float (ExMy) grids, other dtypes and devices keep the eager path. The first call compiles the
kernels (a few seconds, then cached on disk by numba where it can write).
"""

from __future__ import annotations

import numpy as np
import torch

from ptq.formats import QParams, QuantSpec

try:
    import numba
except ImportError:  # the eager path serves
    numba = None

__all__ = ["available", "usable", "fake_quantize", "ste_backward"]


def available() -> bool:
    """Whether numba imports here."""
    return numba is not None


def usable(weight: torch.Tensor, spec: QuantSpec) -> bool:
    """Whether the fused kernels serve this weight: float32, on the CPU, contiguous, an integer
    grid, numba installed."""
    return (numba is not None and spec.kind == "int" and weight.device.type == "cpu"
            and weight.dtype == torch.float32 and weight.is_contiguous())


_CHUNK = 64  # blocks per parallel task; each task owns its scratch rows


def _njit(**options):
    """numba.njit, cached on disk where numba finds a writable place for its cache (next to this
    file, or the user's cache folder); elsewhere each process compiles again."""
    def wrap(fn):
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(**options)(fn)
    return wrap


if numba is not None:
    @_njit(inline="always")
    def _w_hat(x, sb, zb, qmin, qmax, has_zero):
        """One element of W_hat, float32: ptq.formats' integer grid, operation for operation."""
        q = np.rint(x / sb)
        if has_zero:
            q = q + zb
        if q < qmin:  # NaN stays NaN, as in torch.clamp
            q = qmin
        elif q > qmax:
            q = qmax
        if has_zero:
            q = q - zb
        return q * sb

    @_njit(inline="always")
    def _to_bf16(u):
        """Bit pattern of the bfloat16 nearest to the float32 with bits u (ties to even, as
        PyTorch rounds; a NaN stays a NaN, 0x7FC0)."""
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            return np.int16(0x7FC0)
        bias = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
        return np.int16(np.uint16((u + bias) >> np.uint32(16)))

    @_njit(parallel=True, nogil=True)
    def _forward(w, s, z, qmin, qmax, has_zero, out, out_bf16):
        """w (B, G) float32; s, z (B,) float32: one row per block. W_hat goes to out (B, G)
        float32, or, when out_bf16 is true, rounded to bfloat16 into out (B, G) int16."""
        n_blocks, size = w.shape
        for c in numba.prange((n_blocks + _CHUNK - 1) // _CHUNK):
            row = np.empty(size, dtype=np.float32)
            bits = row.view(np.uint32)
            for b in range(c * _CHUNK, min((c + 1) * _CHUNK, n_blocks)):
                sb, zb = s[b], z[b]
                if out_bf16:
                    for j in range(size):
                        row[j] = _w_hat(w[b, j], sb, zb, qmin, qmax, has_zero)
                    for j in range(size):
                        out[b, j] = _to_bf16(bits[j])
                else:
                    for j in range(size):
                        out[b, j] = _w_hat(w[b, j], sb, zb, qmin, qmax, has_zero)

    @_njit(fastmath={"reassoc"}, nogil=True)
    def _sum(buf):
        """Sum of a float32 row in float64, in any order (so that it vectorizes)."""
        acc = 0.0
        for v in buf:
            acc += v
        return acc

    @_njit(parallel=True, nogil=True)
    def _backward(g, g_bf16, w, s, z, qmin, qmax, has_zero, clipped, lsq, learn_zero, grad_w,
                  sum_s, sum_z):
        """g (B, G): float32, or (g_bf16) bfloat16 bit patterns as int16; w, grad_w (B, G)
        float32; s, z (B,) float32; sum_s, sum_z (B,) float64 written."""
        n_blocks, size = w.shape
        for c in numba.prange((n_blocks + _CHUNK - 1) // _CHUNK):
            d_s = np.zeros(size, dtype=np.float32)  # per element: g w_hat - g_in w
            d_z = np.zeros(size, dtype=np.float32)  # per element: g - g_in
            g_row = np.empty(size, dtype=np.float32)
            g_bits = g_row.view(np.uint32)
            for b in range(c * _CHUNK, min((c + 1) * _CHUNK, n_blocks)):
                sb, zb = s[b], z[b]
                lo, hi = (qmin - zb) * sb, (qmax - zb) * sb
                if g_bf16:  # exact: a bfloat16 is the top half of a float32
                    for j in range(size):
                        g_bits[j] = np.uint32(np.uint16(g[b, j])) << np.uint32(16)
                else:
                    for j in range(size):
                        g_row[j] = g[b, j]
                for j in range(size):
                    x, gj = w[b, j], g_row[j]
                    g_in = gj if x >= lo and x <= hi else np.float32(0.0)
                    grad_w[b, j] = g_in if clipped else gj
                    if lsq:
                        d_s[j] = gj * _w_hat(x, sb, zb, qmin, qmax, has_zero) - g_in * x
                        d_z[j] = gj - g_in
                sum_s[b] = _sum(d_s) if lsq else 0.0
                sum_z[b] = _sum(d_z) if learn_zero else 0.0


def _rows(t: torch.Tensor, n_blocks: int) -> np.ndarray:
    """A tensor viewed as (n_blocks, block) numpy, sharing memory."""
    return t.detach().reshape(n_blocks, -1).numpy()


def _match_torch_threads() -> None:
    """Run the kernels on as many threads as PyTorch's own ops (numba would take every core, too
    many when several processes share a machine, as under accelerate launch)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _params(p: QParams) -> tuple[np.ndarray, np.ndarray, bool]:
    s = p.scale.detach().reshape(-1).to(torch.float32).contiguous().numpy()
    if p.zero is None:
        return s, np.zeros_like(s), False
    return s, p.zero.detach().reshape(-1).to(torch.float32).contiguous().numpy(), True


def fake_quantize(weight: torch.Tensor, p: QParams, spec: QuantSpec,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_hat of `weight` (out, in, float32) with scales p (rows, n_blocks); equals
    ptq.formats.fake_quantize_with(weight, p, spec) bit for bit, and with dtype bfloat16 its
    cast to bfloat16 (what autocast multiplies by), made in the same pass."""
    _match_torch_threads()
    dtype = dtype or torch.float32
    s, z, has_zero = _params(p)
    out = torch.empty(weight.shape, dtype=dtype)
    bits = out.view(torch.int16) if dtype == torch.bfloat16 else out
    _forward(_rows(weight, s.size), s, z, np.float32(spec.qmin), np.float32(spec.qmax),
             has_zero, _rows(bits, s.size), dtype == torch.bfloat16)
    return out


def ste_backward(grad: torch.Tensor, weight: torch.Tensor, p: QParams, spec: QuantSpec,
                 clipped: bool, lsq: bool, learn_zero: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dL/dW (float32; grad may be float32 or bfloat16), and with `lsq` the per-block sums
    sum(g W_hat - g_in W) and (learn_zero) sum(g - g_in), shaped like the scales (float64); see
    the module docstring."""
    _match_torch_threads()
    s, z, has_zero = _params(p)
    g_bf16 = grad.dtype == torch.bfloat16
    grad = grad.contiguous() if g_bf16 else grad.to(torch.float32).contiguous()
    grad_w = torch.empty_like(weight)
    sum_s = np.empty(s.size, dtype=np.float64)
    sum_z = np.empty(s.size, dtype=np.float64)
    _backward(_rows(grad.view(torch.int16) if g_bf16 else grad, s.size), g_bf16,
              _rows(weight, s.size), s, z, np.float32(spec.qmin), np.float32(spec.qmax),
              has_zero, clipped, lsq, learn_zero, _rows(grad_w, s.size), sum_s, sum_z)
    shape = p.scale.shape
    as_tensor = (lambda a: torch.from_numpy(a).reshape(shape))
    return (grad_w, as_tensor(sum_s) if lsq else None,
            as_tensor(sum_z) if lsq and learn_zero else None)

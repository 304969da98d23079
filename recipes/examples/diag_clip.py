"""A new layer method in under 40 lines: RTN whose clipping range is chosen, block by block, to
minimize the calibration-weighted error sum_j H_jj (w_ij - w_hat_ij)^2, the diagonal part of
GPTQ's proxy loss tr(dW H dW^T). Run it with `qalign --plugin recipes/examples/diag_clip.py ...`
or import this file; it then works wherever a method name does."""

from dataclasses import dataclass

import torch

import ptq
from ptq.formats import sum_blocks


@dataclass(frozen=True)
class DiagClipOptions:
    grid: int = 20  # shrink factors tried: 1, 1 - max_shrink / grid, ..., 1 - max_shrink
    max_shrink: float = 0.3


@ptq.register_method("diag-clip", options=DiagClipOptions, needs_hessian=True,
                     search_space={"max_shrink": (0.2, 0.4)})
def diag_clip(W, stats, spec, options):
    d = stats.H.diagonal().float().clamp_min(0)  # how much each input column matters
    best, best_err = None, None
    for i in range(options.grid + 1):
        p = ptq.compute_qparams(W * (1 - options.max_shrink * i / options.grid), spec)
        err = sum_blocks((ptq.fake_quantize_with(W, p, spec) - W).float() ** 2 * d, spec)
        if best is None:
            best, best_err = p, err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best.scale = torch.where(better, p.scale, best.scale)
        if best.zero is not None:
            best.zero = torch.where(better, p.zero, best.zero)
    codes = ptq.quantize(W, spec, qparams=best)
    return ptq.QuantResult(ptq.dequantize(codes), codes)

"""GPTQ: Hessian-aware rounding, one column at a time (Frantar et al. 2022, arXiv 2210.17323).

Minimizes the layer's output error tr(dW H dW^T), H = 2/n X^T X, by quantizing the columns of W in
turn and spreading each column's rounding error over the columns not yet quantized, with the
upper Cholesky factor U of H^-1 (Algorithm 1 of the paper):

    for each column i:  q_i = quant(w_i);  err = (w_i - q_i) / U_ii;  W[:, i:] -= err U[i, i:]

Updates are applied lazily in blocks of `block_size` columns: within a block column by column
(in sub-blocks of 16 columns, each closed by one small GEMM), to the rest of W once per block
(one GEMM). `act_order` visits columns by decreasing H_ii.

Group scales (-gG) are set when the first column of a group is reached, from that group's
weights *as updated so far*, with every pending in-block update applied, so the result does not
depend on `block_size` and equals a plain column-by-column loop. Groups always stay G consecutive
input columns of the original order (also with act_order), so the result lies on the spec's grid.
`static_groups` instead fixes all group scales from the original W before any update.

Dead inputs (H_ii = 0) get H_ii = 1 and a zero weight column, as in the reference; when the
damped Cholesky fails, damping grows tenfold until it succeeds, and the damping used is reported.
The Hessian and its factorization are float64, the column updates float32. W or H holding NaN/Inf
is refused (NonFiniteError), and so is a result whose updates overflowed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from numbers import Integral, Real

import torch

from .errors import OptionsError, QalignError
from .formats import (ClipSearch, QParams, QuantSpec, _qparams, check_finite, dequantize,
                      fake_quantize_broadcast, parse_spec, quantize)
from .metrics import layer_loss
from .registry import LayerStats, QuantResult, register_method

__all__ = ["GPTQ_SEARCH_SPACE", "GPTQOptions", "GPTQResult", "gptq_quantize", "inverse_cholesky"]

SUB_BLOCK = 16  # columns per inner sub-block of the in-block updates


@dataclass(frozen=True)
class GPTQOptions:
    block_size: int = field(default=128, metadata={"help": "columns per lazy batch update"})
    damp: float = field(default=0.01, metadata={
        "help": "percdamp: this fraction of mean(diag H) is added to diag H"})
    act_order: bool = field(default=True, metadata={
        "help": "quantize columns by decreasing H_ii"})
    static_groups: bool = field(default=False, metadata={
        "help": "fix group scales from the original W before any update"})
    clip_search: bool = field(default=True, metadata={
        "help": "MSE search of each group's / row's clipping range"})
    # The method's defaults (act_order, clip_search on) differ from gptq_quantize's plain-paper
    # defaults; on SmolLM2 int3-g64 they take perplexity from 73 to 45 (README, PTQ section).

    def __post_init__(self):
        _check_options(self.block_size, self.damp)


def _check_options(block_size, damp, clip=None) -> None:
    """OptionsError naming the fix for GPTQ numbers that would run but give garbage."""
    if isinstance(block_size, bool) or not isinstance(block_size, Integral) or block_size < 1:
        raise OptionsError(f"GPTQ block_size={block_size!r} must be an integer >= 1; 128 is usual")
    if isinstance(damp, bool) or not isinstance(damp, Real) or not 0.0 <= damp < 10.0:  # NaN too
        raise OptionsError(f"GPTQ damp={damp} must be in [0, 10); 0.01 is usual")
    if clip is not None and not isinstance(clip, ClipSearch):
        raise OptionsError(f"GPTQ clip={clip!r} must be a ClipSearch (e.g. ClipSearch()) or None")


def _check_inputs(W, H, spec: QuantSpec) -> None:
    """One-line QalignErrors for W and H that do not fit together, then the NaN/Inf checks."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.numel() == 0:
        raise QalignError(f"GPTQ needs W as a non-empty (out, in) tensor, got "
                          f"{tuple(W.shape) if isinstance(W, torch.Tensor) else type(W)}; "
                          "reshape it to (out_features, in_features)")
    n = W.shape[1]
    if not isinstance(H, torch.Tensor) or tuple(H.shape) != (n, n):
        raise QalignError(f"GPTQ needs H of shape (in, in) = ({n}, {n}) for W of shape "
                          f"{tuple(W.shape)}, got {tuple(getattr(H, 'shape', ())) or type(H)}; "
                          "accumulate H over the inputs of this very layer")
    if H.device != W.device:
        raise QalignError(f"GPTQ got W on {W.device} and H on {H.device}; move H to W's "
                          "device with H.to(W.device)")
    spec.check_shape(n, f"a weight of shape {tuple(W.shape)}")
    check_finite(W, "GPTQ's weight W")
    check_finite(H, "GPTQ's Hessian H", "the calibration activations overflowed: calibrate "
                 "the model in float32 (not float16), or on fewer tokens")


@dataclass
class GPTQResult(QuantResult):
    damp: float = 0.0  # damping actually used (fraction of mean diag H)
    dead_columns: int = 0  # inputs that were always zero in calibration
    seconds: float = 0.0


def inverse_cholesky(H: torch.Tensor, damp: float, max_tries: int = 8
                     ) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float64, and the damping used.
    A failed factorization multiplies the damping by 10 (starting at 1e-4 when damp is 0)."""
    H = H.to(torch.float64)
    mean_diag = float(torch.diagonal(H).mean())
    d = damp
    for _ in range(max_tries):
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, d
        d = d * 10 if d > 0 else 1e-4
    raise torch.linalg.LinAlgError(
        f"Hessian not positive definite even with damping {d / 10:g} x mean(diag H); the "
        "calibration inputs are degenerate (check for NaN/inf activations or use more samples)")


def _group_params_at_start(Wc: torch.Tensor, spec: QuantSpec, clip, pos_of_group, out_dtype):
    """All group scales from the current W (static groups), in original group order."""
    n_groups = len(pos_of_group)
    scales, zeros = [], []
    for g in range(n_groups):
        p = _qparams(Wc[:, pos_of_group[g]], spec.per_channel(), clip, out_dtype)
        scales.append(p.scale)
        zeros.append(p.zero)
    zero = None if zeros[0] is None else torch.cat(zeros, 1)
    return torch.cat(scales, 1), zero


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec | str, *,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, clip: ClipSearch | None = None) -> GPTQResult:
    """Quantize W (out, in) with Hessian H (in, in) onto the grid of `spec` (module docstring)."""
    t0 = time.perf_counter()
    spec = parse_spec(spec)
    _check_options(block_size, damp, clip)
    _check_inputs(W, H, spec)
    rows, n = W.shape
    dt = spec.compute_dtype
    H0 = H.to(torch.float64)
    Wc = W.detach().to(dt).clone()
    H = H0.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    Wc[:, dead] = 0.0

    perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
            else torch.arange(n, device=W.device))
    inv = torch.argsort(perm)
    if act_order:
        Wc, H = Wc[:, perm], H[perm][:, perm]
    U, damp_used = inverse_cholesky(H, damp)
    U = U.to(dt)

    grouped = spec.granularity == "group"
    if grouped:
        G = spec.group_size
        n_groups = n // G
        # processing positions of each original group, and the group of each position
        pos_of_group = [inv[g * G:(g + 1) * G] for g in range(n_groups)]
        group_at = (perm // G).tolist()
        scale = torch.zeros(rows, n_groups, dtype=dt, device=W.device)
        zero = None if spec.kind != "int" or spec.symmetric else torch.zeros_like(scale)
        ready = [False] * n_groups
        if static_groups:
            scale, zero = _group_params_at_start(Wc, spec, clip, pos_of_group, W.dtype)
            ready = [True] * n_groups
    else:
        p = _qparams(Wc, spec, clip, W.dtype)  # one scale per row (or per tensor), from W
        scale, zero = p.scale, p.zero

    # Work on W^T, (n, rows): each column of W is a contiguous row, so the per-column steps
    # below touch contiguous memory.
    WT = Wc.T.contiguous()
    QT = torch.empty_like(WT)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = WT[i1:i2].clone()  # (b, rows)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped:
                g = group_at[col]
                if not ready[g]:
                    S = pos_of_group[g]  # all >= col; current values incl. pending updates
                    cur = WT[S] - U[i1:col, S].T @ Err1[:i]  # (G, rows)
                    # W and H were checked finite; an overflow here is caught on Q below
                    pg = _qparams(cur.T, spec.per_channel(), clip, W.dtype)
                    scale[:, g] = pg.scale[:, 0]
                    if zero is not None:
                        zero[:, g] = pg.zero[:, 0]
                    ready[g] = True
                p = QParams(scale[:, g], None if zero is None else zero[:, g])
            else:
                p = QParams(scale[:, 0], None if zero is None else zero[:, 0])
            w = W1[i]
            q = fake_quantize_broadcast(w, p, spec)
            QT[col] = q
            err = (w - q) / U1[i, i]
            Err1[i] = err
            # rank-1 update inside the current sub-block only; the rest of the block gets the
            # sub-block's updates as one GEMM when it ends (same result, less memory traffic)
            j2 = min((i // SUB_BLOCK + 1) * SUB_BLOCK, i2 - i1)
            W1[i + 1:j2] -= U1[i, i + 1:j2, None] * err
            if i + 1 == j2 and j2 < i2 - i1:
                j1 = j2 - SUB_BLOCK
                W1[j2:] -= U1[j1:j2, j2:].T @ Err1[j1:j2]
        WT[i2:] -= U[i1:i2, i2:].T @ Err1

    Q = QT.T[:, inv] if act_order else QT.T
    if not bool(torch.isfinite(Q).all()):  # the hint's max(|W|) is computed only then
        check_finite(Q, "GPTQ's result", f"its error updates overflowed on weights up to "
                     f"{float(W.abs().max()):.3g}; quantize this layer with rtn, or rescale it")
    qt = quantize(Q, spec, qparams=QParams(scale, zero))  # Q is on the grid: exact codes
    qt.dtype = W.dtype
    Wq = dequantize(qt)
    return GPTQResult(weight=Wq, quantized=qt, loss=layer_loss(W, Wq, H0), damp=damp_used,
                      dead_columns=int(dead.sum()), seconds=time.perf_counter() - t0)


# what matched tuning may try (recipes.tuning): damping, column order, clipping, group scales
GPTQ_SEARCH_SPACE = {"damp": (0.01, 0.1), "act_order": (True, False),
                     "clip_search": (True, False), "static_groups": (False, True)}


@register_method("gptq", options=GPTQOptions, needs_hessian=True,
                 search_space=GPTQ_SEARCH_SPACE)
def _gptq_method(W: torch.Tensor, stats: LayerStats, spec: QuantSpec,
                 options: GPTQOptions = GPTQOptions()) -> GPTQResult:
    clip = ClipSearch() if options.clip_search else None
    return gptq_quantize(W, stats.H, spec, block_size=options.block_size, damp=options.damp,
                         act_order=options.act_order, static_groups=options.static_groups,
                         clip=clip)

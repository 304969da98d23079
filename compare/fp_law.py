"""The scaling law of floating-point quantized training (paper C, Sun et al. 2025, arXiv
2501.02423), as code: prediction, its derived quantities, and a fit to a table of runs.

    L(N, D, E, M, B) = n / N^a + d / D^b + eps + (D^b / N^a) * log2(B) / (g (E+0.5)^dl (M+0.5)^nu)

N parameters, D training tokens, E exponent and M mantissa bits of the training format, B the
block size of its scaling factors. The published constants are `PUBLISHED`.

Derived:
  best_layout(P)    the E/M split of a P-bit format (1 sign bit + E + M = P, E >= 1) with the
                    lowest loss: the one that maximizes (E+0.5)^dl (M+0.5)^nu
  critical_data(..) D_crit, where dL/dD = 0: beyond it more data raises the loss,
                    D_crit = (d N^a / K)^(1 / 2b) with K = log2(B) / (g (E+0.5)^dl (M+0.5)^nu)
  cost_optimal(C)   the precision P minimizing the loss at a compute cost C = N D P (the paper's
                    cost, in parameter x token x bit units), over N (D = C / (N P)) and each
                    P's best layout
  fit(runs)         least squares of the loss over a table of runs (scipy), with bounds (every
                    constant positive, exponents below 5); constants the bounds stop are
                    reported (`at_bounds`); a table that cannot identify the others is an error
                    naming what to vary
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from ptq.errors import OptionsError

__all__ = ["LawConstants", "PUBLISHED", "predict", "best_layout", "critical_data",
           "cost_optimal", "fit", "FitResult"]


@dataclass(frozen=True)
class LawConstants:
    n: float
    a: float
    d: float
    b: float
    eps: float
    g: float
    dl: float
    nu: float


PUBLISHED = LawConstants(n=69.2343, a=0.2368, d=68973.0621, b=0.5162, eps=1.9061,
                         g=11334.5197, dl=3.1926, nu=2.9543)


def _precision_term(E, M, B, c: LawConstants):
    return np.log2(B) / (c.g * (np.asarray(E) + 0.5) ** c.dl * (np.asarray(M) + 0.5) ** c.nu)


def predict(N, D, E, M, B, c: LawConstants = PUBLISHED):
    """The law's loss; arguments broadcast (numpy)."""
    N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
    return (c.n / N ** c.a + c.d / D ** c.b + c.eps
            + D ** c.b / N ** c.a * _precision_term(E, M, B, c))


def best_layout(bits: int, c: LawConstants = PUBLISHED) -> tuple[int, int]:
    """(E, M) of the P-bit format with the lowest predicted loss."""
    if bits < 3:
        raise OptionsError(f"bits={bits}: a floating-point format needs a sign, at least one "
                           "exponent bit and a mantissa or more exponent bits; give 3 or more")
    options = [(E, bits - 1 - E) for E in range(1, bits)]
    return max(options, key=lambda em: c.dl * math.log(em[0] + 0.5) + c.nu * math.log(em[1] + 0.5))


def critical_data(N: float, E: int, M: int, B: float, c: LawConstants = PUBLISHED) -> float:
    """D_crit in tokens (module docstring); infinite when B = 1 (no precision penalty)."""
    K = float(_precision_term(E, M, B, c))
    if K <= 0:
        return math.inf
    return (c.d * N ** c.a / K) ** (1 / (2 * c.b))


def cost_optimal(C: float, B: float = 128, bits=range(3, 17), c: LawConstants = PUBLISHED,
                 n_grid: int = 400) -> dict:
    """The precision P with the lowest loss at cost C = N D P, with its layout, N and D."""
    best = None
    Ns = np.logspace(5, math.log10(C) / 2 + 3, n_grid)
    for P in bits:
        E, M = best_layout(P, c)
        D = C / (Ns * P)
        loss = predict(Ns, D, E, M, B, c)
        i = int(np.nanargmin(loss))
        if best is None or loss[i] < best["loss"]:
            best = {"bits": P, "E": E, "M": M, "N": float(Ns[i]), "D": float(D[i]),
                    "loss": float(loss[i])}
    return best


@dataclass
class FitResult:
    constants: LawConstants
    fitted: tuple[str, ...]
    rmse: float  # nats
    n_runs: int
    at_bounds: tuple[str, ...] = ()  # fitted constants the bounds stopped (e.g. eps at 0)

    def to_dict(self) -> dict:
        return {"constants": asdict(self.constants), "fitted": list(self.fitted),
                "rmse": self.rmse, "n_runs": self.n_runs, "at_bounds": list(self.at_bounds)}


_NAMES = tuple(f.name for f in fields(LawConstants))
# what a table must vary for a constant to be identifiable
_NEEDS = {"n": "model size N", "a": "model size N", "d": "tokens D", "b": "tokens D",
          "eps": "N and D", "g": "formats (E, M) or block sizes B",
          "dl": "exponent bits E", "nu": "mantissa bits M"}


def fit(runs: list[dict], *, free: tuple[str, ...] = _NAMES,
        start: LawConstants = PUBLISHED) -> FitResult:
    """Least-squares fit of the constants in `free` (the rest stay at `start`) to runs, each a
    mapping with N, D, E, M, B and loss. Bounds: every constant positive, exponents below 5."""
    from scipy.optimize import least_squares

    unknown = [f for f in free if f not in _NAMES]
    if unknown:
        raise OptionsError(f"free constants {unknown}: choose from {list(_NAMES)}")
    if len(runs) <= len(free):
        raise OptionsError(f"{len(runs)} runs cannot fit {len(free)} constants; give more "
                           f"runs than constants, or fit fewer (free=...) and keep the others "
                           "at the published values")
    cols = {k: np.array([float(r[k]) for r in runs]) for k in ("N", "D", "E", "M", "B", "loss")}
    if not np.all(np.isfinite(cols["loss"])):
        raise OptionsError("a run's loss is not finite; drop diverged runs before fitting")
    base = asdict(start)
    x0 = np.array([base[f] for f in free])
    upper = np.array([5.0 if f in ("a", "b", "dl", "nu") else np.inf for f in free])

    def consts(x):
        return LawConstants(**{**base, **dict(zip(free, x))})

    def residual(x):
        c = consts(x)
        return predict(cols["N"], cols["D"], cols["E"], cols["M"], cols["B"], c) - cols["loss"]

    lower = np.full(len(free), 1e-12)
    res = least_squares(residual, x0, bounds=(lower, upper), x_scale="jac", max_nfev=20000)
    # a constant the bounds stopped is set by them (eps at 0: the runs ask for less than 0)
    tol = 1e-8 * np.maximum(np.abs(x0), 1.0)
    bound = (res.x - lower <= tol) | (upper - res.x <= tol)
    at_bounds = tuple(f for f, b in zip(free, bound) if b)
    inner = [i for i in range(len(free)) if not bound[i]]
    # identifiability of the rest: a direction of the constants that leaves every prediction
    # unchanged
    J = (res.jac * np.maximum(np.abs(res.x), 1e-12))[:, inner]  # relative sensitivities
    sv = np.linalg.svd(J, compute_uv=False) if inner else np.ones(1)
    if sv[-1] < 1e-8 * max(sv[0], 1e-300):
        _, _, vt = np.linalg.svd(J)
        weak = [free[inner[i]] for i in np.argsort(-np.abs(vt[-1]))[:2]]
        raise OptionsError(f"the runs cannot identify {' and '.join(weak)}: vary "
                           f"{' and '.join(dict.fromkeys(_NEEDS[w] for w in weak))} across the "
                           "runs, or keep them fixed (leave them out of free)")
    rmse = float(np.sqrt(np.mean(res.fun ** 2)))
    return FitResult(consts(res.x), tuple(free), rmse, len(runs), at_bounds)

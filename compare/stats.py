"""Uncertainty of the comparison's numbers: bootstrap intervals, rank-correlation intervals, and
the spread across seeds. Pure functions of plain sequences (numpy, scipy), deterministic given
`seed` (their own numpy Generator; global RNG state is never touched).

Held-out NLL (compare.evaluate): the evaluation windows are the sampling unit. Two solutions
evaluated on the same windows are compared pairwise: resample windows with replacement, B times,
and take the mean of d_i = b_i - a_i (per-window mean NLL, nats/token) on each resample; the
percentile interval of those B means is the interval of the difference (Efron & Tibshirani 1993,
ch. 13), their standard deviation its standard error. Every window scores seq_len - 1 tokens, so
the mean of window NLLs is the token NLL and exp(diff) is the perplexity ratio ppl_b / ppl_a.

Rank correlation (compare.alignment): resample (x_i, y_i) pairs and recompute the coefficient;
resamples with a constant side have none and are dropped (`n_boot_used` counts the rest). With
n >= FISHER_MIN_N pairs, the Fisher-z interval tanh(atanh(r) -+ q se) is given too, with
se = 1.06 / sqrt(n - 3) for Spearman and sqrt(0.437 / (n - 4)) for Kendall (Fieller, Hartley &
Pearson 1957, Biometrika 44:470).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as sps

from ptq.errors import OptionsError

__all__ = ["paired_bootstrap", "perplexity_ratio", "bootstrap_mean", "perplexity_interval",
           "correlation_interval", "seed_spread", "FISHER_MIN_N", "MIN_SIGNIFICANT_N"]

FISHER_MIN_N = 10  # the smallest n at which Fieller et al. checked their variances
# Below 6 pairs a rank correlation takes so few values that a near-perfect order is common under
# independence (|rho| >= 0.9 in 10 of the 120 orders of 5 points): a bootstrap or Fisher interval
# at a nominal 95% then excludes 0 for about 8-12% of independent samples, so it is never called
# significant.
MIN_SIGNIFICANT_N = 6
_METHODS = ("spearman", "kendall")
_CHUNK = 1 << 22  # elements per block of Kendall pair signs (32 MB of float64)


# ------------------------------------------------------------------------------ input checks

def _check_options(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise OptionsError(f"level={level} is not a confidence level; give one in (0, 1), "
                           "such as 0.95")
    if n_boot < 100:
        raise OptionsError(f"n_boot={n_boot} resamples are too few for a percentile interval; "
                           "use at least 100 (default 2000)")


def _values(values: Sequence[float], name: str, least: int, unit: str) -> np.ndarray:
    """values as a finite 1-D float64 array of at least `least` entries (one per `unit`), or an
    OptionsError naming the arm and the first bad index."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise OptionsError(f"{name} has shape {v.shape}; give one value per {unit} (1-D)")
    if v.size < least:
        raise OptionsError(f"{name} has {v.size} value(s); need at least {least}, one per "
                           f"{unit}" + (": evaluate on more held-out windows"
                                        if unit == "window" else ""))
    bad = np.flatnonzero(~np.isfinite(v))
    if bad.size:
        raise OptionsError(f"{name}[{bad[0]}] = {v[bad[0]]} is not finite ({bad.size} such "
                           f"value(s)); a diverged {unit} has no interval: leave it out or "
                           "report it on its own")
    return v


def _interval(boot: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval (linear interpolation between order statistics) of replicates."""
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _resample(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot,) means of `values` over n_boot resamples of its n entries with replacement:
    the indices are rng.integers(0, n, size=(n_boot, n)) of default_rng(seed), one call
    (8 n_boot n bytes)."""
    idx = np.random.default_rng(seed).integers(0, values.size, size=(n_boot, values.size))
    return values[idx].mean(axis=1)


# -------------------------------------------------------------------------- NLL over windows

def bootstrap_mean(values: Sequence[float], *, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> dict:
    """Mean of one arm's per-window values with its bootstrap percentile interval.

    Returns {"mean", "low", "high", "se", "n", "level", "n_boot"}: se is the standard deviation
    (ddof=1) of the n_boot resampled means."""
    _check_options(level, n_boot)
    v = _values(values, "values", 2, "window")
    boot = _resample(v, n_boot, seed)
    low, high = _interval(boot, level)
    return {"mean": float(v.mean()), "low": low, "high": high, "se": float(boot.std(ddof=1)),
            "n": int(v.size), "level": level, "n_boot": n_boot}


def perplexity_interval(window_nll: Sequence[float], **kw) -> dict:
    """bootstrap_mean of per-window NLLs (EvalResult.window_nll), plus "perplexity",
    "perplexity_low", "perplexity_high": exp of the mean and of its interval ends."""
    r = bootstrap_mean(window_nll, **kw)
    return {**r, "perplexity": math.exp(r["mean"]), "perplexity_low": math.exp(r["low"]),
            "perplexity_high": math.exp(r["high"])}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Mean difference b - a of two arms' per-window values on the same windows, with its paired
    bootstrap percentile interval. With per-window NLLs, a positive diff means b is worse.

    Returns {"diff", "low", "high", "se", "n", "level", "n_boot", "excludes_zero"}: diff is
    mean(b - a), se the standard deviation (ddof=1) of the resampled means, excludes_zero whether
    0 lies outside [low, high]. Identical arms give exactly diff = low = high = 0."""
    _check_options(level, n_boot)
    a_, b_ = _values(a, "a", 2, "window"), _values(b, "b", 2, "window")
    if a_.size != b_.size:
        raise OptionsError(f"a has {a_.size} windows and b has {b_.size}; a paired comparison "
                           "needs both arms evaluated on the same windows")
    d = b_ - a_
    boot = _resample(d, n_boot, seed)
    low, high = _interval(boot, level)
    return {"diff": float(d.mean()), "low": low, "high": high, "se": float(boot.std(ddof=1)),
            "n": int(d.size), "level": level, "n_boot": n_boot,
            "excludes_zero": bool(low > 0 or high < 0)}


def perplexity_ratio(nll_a: Sequence[float], nll_b: Sequence[float], **kw) -> dict:
    """paired_bootstrap of per-window NLLs, plus "ratio", "ratio_low", "ratio_high":
    exp(diff) = ppl_b / ppl_a and exp of the interval ends (the bootstrap of the difference of
    mean NLL, i.e. of the log perplexity ratio)."""
    r = paired_bootstrap(nll_a, nll_b, **kw)
    return {**r, "ratio": math.exp(r["diff"]), "ratio_low": math.exp(r["low"]),
            "ratio_high": math.exp(r["high"])}


# ----------------------------------------------------------------------- rank correlations

def _coefficient(x: np.ndarray, y: np.ndarray, method: str) -> float:
    """Spearman's rho or Kendall's tau-b, as in compare.alignment.rank_correlation."""
    f = sps.spearmanr if method == "spearman" else sps.kendalltau
    return float(f(x, y).statistic)


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of each row pair (n_rows, n): with s_ij = sign(x_i - x_j) over the pairs
    i < j, pairs tied in x drop out of sum sx^2, so tau_b = sum sx sy / sqrt(sum sx^2 sum sy^2)."""
    i, j = np.triu_indices(x.shape[1], 1)
    out = np.empty(x.shape[0])
    rows = max(1, _CHUNK // i.size)
    for r in range(0, x.shape[0], rows):
        sx = np.sign(x[r:r + rows, i] - x[r:r + rows, j])  # (rows, n (n - 1) / 2)
        sy = np.sign(y[r:r + rows, i] - y[r:r + rows, j])
        out[r:r + rows] = (sx * sy).sum(1) / np.sqrt((sx * sx).sum(1) * (sy * sy).sum(1))
    return out


def _bootstrap_coefficients(x: np.ndarray, y: np.ndarray, method: str, n_boot: int,
                            seed: int) -> np.ndarray:
    """The coefficient on each resample of the pairs whose two sides both vary: the indices are
    rng.integers(0, n, size=(n_boot, n)) of default_rng(seed), like the window bootstrap."""
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    xs, ys = x[idx], y[idx]
    keep = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
    xs, ys = xs[keep], ys[keep]
    if method == "spearman":  # Pearson of average ranks, as scipy.stats.spearmanr
        return _pearson_rows(sps.rankdata(xs, axis=1), sps.rankdata(ys, axis=1))
    return _kendall_rows(xs, ys)


def _fisher_interval(r: float, n: int, method: str, level: float) -> tuple[float, float]:
    if abs(r) >= 1:  # atanh(+-1) is infinite: the interval shrinks to the point
        return r, r
    se = 1.06 / math.sqrt(n - 3) if method == "spearman" else math.sqrt(0.437 / (n - 4))
    q = float(sps.norm.ppf((1 + level) / 2))
    z = math.atanh(r)
    return math.tanh(z - q * se), math.tanh(z + q * se)


def correlation_interval(x: Sequence[float | None], y: Sequence[float | None], *,
                         method: str = "spearman", level: float = 0.95, n_boot: int = 2000,
                         seed: int = 0) -> dict:
    """A rank correlation (module docstring) with its bootstrap percentile interval over pairs,
    and with n >= FISHER_MIN_N its Fisher-z interval.

    Pairs with a None or non-finite side are dropped first, as in rank_correlation, so `value`
    is the coefficient it reports. Returns {"value", "low", "high", "fisher_low", "fisher_high",
    "n", "method", "level", "n_boot", "n_boot_used", "significant"}: value is None where the
    coefficient is undefined (fewer than 3 pairs, a constant side), low/high None there or with
    fewer than 100 usable resamples, fisher_* None below FISHER_MIN_N pairs; never NaN.
    significant: n >= MIN_SIGNIFICANT_N and every interval given excludes 0."""
    _check_options(level, n_boot)
    if method not in _METHODS:
        raise OptionsError(f"method={method!r} is not a rank correlation; use one of {_METHODS}")
    if len(x) != len(y):
        raise OptionsError(f"x has {len(x)} values and y has {len(y)}; give one (x, y) pair per "
                           "layer or solution")
    pairs = [(a, b) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    out = {"value": None, "low": None, "high": None, "fisher_low": None, "fisher_high": None,
           "n": len(pairs), "method": method, "level": level, "n_boot": n_boot,
           "n_boot_used": 0, "significant": False}
    if len(pairs) < 3:
        return out
    xv, yv = (np.array(v, dtype=np.float64) for v in zip(*pairs))
    if np.ptp(xv) == 0 or np.ptp(yv) == 0:
        return out
    n = len(pairs)
    out["value"] = r = _coefficient(xv, yv, method)
    boot = _bootstrap_coefficients(xv, yv, method, n_boot, seed)
    out["n_boot_used"] = int(boot.size)
    intervals = []
    if boot.size >= 100:
        out["low"], out["high"] = _interval(boot, level)
        intervals.append((out["low"], out["high"]))
    if n >= FISHER_MIN_N:
        out["fisher_low"], out["fisher_high"] = _fisher_interval(r, n, method, level)
        intervals.append((out["fisher_low"], out["fisher_high"]))
    out["significant"] = bool(n >= MIN_SIGNIFICANT_N and out["low"] is not None
                              and all(lo > 0 or hi < 0 for lo, hi in intervals))
    return out


# ---------------------------------------------------------------------------- across seeds

def seed_spread(values: Sequence[float], *, level: float = 0.95) -> dict:
    """One result across seeds: {"mean", "min", "max", "std", "low", "high", "n", "level"}.
    std is the sample standard deviation (ddof=1) and [low, high] the t interval of the mean,
    mean -+ t_{(1+level)/2, n-1} std / sqrt(n); with one seed std, low and high are None."""
    if not 0 < level < 1:
        raise OptionsError(f"level={level} is not a confidence level; give one in (0, 1), "
                           "such as 0.95")
    v = _values(values, "values", 1, "seed")
    out = {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max()), "std": None,
           "low": None, "high": None, "n": int(v.size), "level": level}
    if v.size >= 2:
        std = float(v.std(ddof=1))
        half = float(sps.t.ppf((1 + level) / 2, v.size - 1)) * std / math.sqrt(v.size)
        out.update(std=std, low=out["mean"] - half, high=out["mean"] + half)
    return out

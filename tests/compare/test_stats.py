import math

import numpy as np
import pytest
from scipy import stats

from compare.alignment import rank_correlation
from compare.stats import (FISHER_MIN_N, MIN_SIGNIFICANT_N, bootstrap_mean, correlation_interval,
                           paired_bootstrap, perplexity_interval, perplexity_ratio, seed_spread)
from ptq.errors import OptionsError


def _windows(n=40, seed=0):
    """Per-window NLLs of one arm: around 3 nats, windows differing far more than arms do."""
    return 3 + 0.4 * np.random.default_rng(seed).standard_normal(n)


def test_an_arm_compared_with_itself_has_exactly_zero_difference():
    a = _windows()
    r = paired_bootstrap(a, a)
    assert (r["diff"], r["low"], r["high"], r["se"]) == (0, 0, 0, 0)
    assert not r["excludes_zero"] and r["n"] == 40
    assert perplexity_ratio(a, a.tolist())["ratio_low"] == 1 == perplexity_ratio(a, a)["ratio_high"]


def test_two_draws_of_the_same_method_get_an_interval_containing_zero():
    a = _windows()
    b = a + 0.05 * np.random.default_rng(1).standard_normal(40)  # same method, eval noise only
    r = paired_bootstrap(a, b)
    assert r["low"] < 0 < r["high"] and not r["excludes_zero"]


def test_paired_bootstrap_matches_a_direct_resampling_loop():
    a = np.array([3.1, 2.7, 3.3, 2.9, 3.0])
    b = np.array([3.4, 2.8, 3.2, 3.3, 3.05])
    rng = np.random.default_rng(7)
    idx = rng.integers(0, 5, size=(500, 5))  # the documented draws, one call
    means = [sum(b[i] - a[i] for i in row) / 5 for row in idx]
    r = paired_bootstrap(a, b, n_boot=500, seed=7, level=0.9)
    assert r["diff"] == pytest.approx(np.mean(b - a), abs=1e-15)
    assert r["low"] == pytest.approx(np.percentile(means, 5), abs=1e-12)
    assert r["high"] == pytest.approx(np.percentile(means, 95), abs=1e-12)
    assert r["se"] == pytest.approx(np.std(means, ddof=1), abs=1e-12)


def test_bootstrap_mean_agrees_with_scipy_percentile_bootstrap():
    v = _windows(30, seed=3)
    ours = bootstrap_mean(v, n_boot=20_000, seed=1)
    ref = stats.bootstrap((v,), np.mean, n_resamples=20_000, method="percentile",
                          random_state=np.random.default_rng(2)).confidence_interval
    se = v.std(ddof=1) / math.sqrt(30)  # the Monte-Carlo error of an end is a few % of se
    assert ours["low"] == pytest.approx(ref.low, abs=0.1 * se)
    assert ours["high"] == pytest.approx(ref.high, abs=0.1 * se)
    assert ours["se"] == pytest.approx(v.std(ddof=0) / math.sqrt(30), rel=0.03)
    p = perplexity_interval(v, n_boot=20_000, seed=1)
    assert p["perplexity"] == pytest.approx(math.exp(v.mean()))
    assert p["perplexity_low"] == pytest.approx(math.exp(ours["low"]))


def test_a_shifted_arm_gets_an_interval_around_the_shift_excluding_zero():
    a = _windows(60)
    b = a + 0.5 + 0.02 * np.random.default_rng(5).standard_normal(60)
    r = perplexity_ratio(a, b)
    assert r["excludes_zero"] and 0.49 < r["low"] < 0.5 < r["high"] < 0.51
    assert r["diff"] == pytest.approx(0.5, abs=0.01)
    assert r["ratio"] == pytest.approx(math.exp(r["diff"]))
    assert r["ratio_low"] == pytest.approx(math.exp(r["low"]))
    # the windows differ by 0.4 nats: unpaired, the same shift is far less certain
    assert r["high"] - r["low"] < 0.1 * (bootstrap_mean(b)["high"] - bootstrap_mean(b)["low"])
    flipped = paired_bootstrap(b, a)
    assert flipped["diff"] == pytest.approx(-r["diff"]) and flipped["high"] < 0


def test_same_seed_same_interval_other_seed_other_interval():
    a, b = _windows(), _windows(seed=9)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    assert paired_bootstrap(a, b, seed=3)["low"] != paired_bootstrap(a, b, seed=4)["low"]
    x, y = _windows(20), _windows(20, seed=1)
    assert correlation_interval(x, y, seed=3) == correlation_interval(x, y, seed=3)
    state = np.random.get_state()[1].copy()
    paired_bootstrap(a, b)
    correlation_interval(x, y, method="kendall")
    assert np.array_equal(np.random.get_state()[1], state)  # the global RNG is left alone


@pytest.mark.parametrize("method", ["spearman", "kendall"])
def test_correlation_of_five_random_points_is_not_significant(method):
    x, y = np.random.default_rng(11).standard_normal((2, 5))
    r = correlation_interval(x, y, method=method)
    assert r["value"] == pytest.approx(rank_correlation(x, y)[method])
    assert r["n"] == 5 and r["fisher_low"] is None and not r["significant"]
    # even a perfect order of 5 points is within what independence gives 1 time in 12
    assert not correlation_interval(range(5), range(5), method=method)["significant"]


@pytest.mark.parametrize("method", ["spearman", "kendall"])
def test_perfectly_monotone_thirty_points_are_significant_with_value_one(method):
    x = np.linspace(0.1, 3, 30)
    r = correlation_interval(x, np.exp(x), method=method)
    assert r["value"] == pytest.approx(1) and r["significant"] and r["n"] == 30
    assert r["low"] == r["high"] == pytest.approx(1)  # every usable resample is monotone too
    assert r["fisher_low"] == r["fisher_high"] == pytest.approx(1)
    assert r["n_boot_used"] == 2000
    r = correlation_interval(x, -x, method=method)
    assert r["value"] == pytest.approx(-1) and r["significant"]


@pytest.mark.parametrize("method", ["spearman", "kendall"])
def test_bootstrap_coefficients_match_scipy_on_the_same_resamples(method):
    g = np.random.default_rng(4)
    x = np.round(g.standard_normal(12), 1)  # ties, in x and in resamples
    y = np.round(x + g.standard_normal(12), 1)
    idx = np.random.default_rng(8).integers(0, 12, size=(300, 12))
    f = stats.spearmanr if method == "spearman" else stats.kendalltau
    boot = [f(x[i], y[i]).statistic for i in idx if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0]
    r = correlation_interval(x, y, method=method, n_boot=300, seed=8)
    assert r["n_boot_used"] == len(boot)
    assert r["low"] == pytest.approx(np.percentile(boot, 2.5), abs=1e-12)
    assert r["high"] == pytest.approx(np.percentile(boot, 97.5), abs=1e-12)


def test_fisher_interval_matches_a_hand_computation():
    g = np.random.default_rng(6)
    x = g.standard_normal(25)
    y = x + g.standard_normal(25)
    rho, tau = stats.spearmanr(x, y).statistic, stats.kendalltau(x, y).statistic
    s = correlation_interval(x, y, method="spearman", level=0.9)
    k = correlation_interval(x, y, method="kendall", level=0.9)
    q = 1.6448536269514722  # the normal 95th percentile
    z, se = math.atanh(rho), 1.06 / math.sqrt(22)
    assert (s["fisher_low"], s["fisher_high"]) == pytest.approx(
        (math.tanh(z - q * se), math.tanh(z + q * se)), abs=1e-12)
    z, se = math.atanh(tau), math.sqrt(0.437 / 21)
    assert (k["fisher_low"], k["fisher_high"]) == pytest.approx(
        (math.tanh(z - q * se), math.tanh(z + q * se)), abs=1e-12)
    assert s["significant"] and k["significant"] and s["fisher_low"] > 0
    assert correlation_interval(x[:FISHER_MIN_N - 1], y[:FISHER_MIN_N - 1])["fisher_low"] is None


def test_correlation_is_none_never_nan_where_undefined():
    for x, y in [([1, 2], [3, 4]), ([1, 1, 1, 1], [1, 2, 3, 4]), ([1, 2, 3], [5, 5, 5]),
                 ([1, float("nan"), 2, None], [1, 2, 3, 4]), ([], [])]:
        r = correlation_interval(x, y)
        assert r["value"] is None and r["low"] is None and r["high"] is None
        assert r["significant"] is False and r["n_boot_used"] == 0
    # dropped like rank_correlation does: the coefficient is the one the study reports
    x, y = [1, 2, None, 3, float("nan"), 4], [1, 2, 5, 3, 4, 3.5]
    assert correlation_interval(x, y)["n"] == 4
    assert correlation_interval(x, y)["value"] == pytest.approx(rank_correlation(x, y)["spearman"])


def test_constant_resamples_are_dropped_and_counted():
    # 7 of 8 x values equal: a resample often draws only them; it has no coefficient
    x, y = [0.0] * 7 + [1.0], [0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.8, 1.0]
    r = correlation_interval(x, y, n_boot=1000)
    assert 0 < 1000 - r["n_boot_used"] < 1000
    assert (1 - 1 / 8) ** 8 == pytest.approx(1 - r["n_boot_used"] / 1000, abs=0.05)
    assert all(v is None or math.isfinite(v) for v in (r["low"], r["high"], r["value"]))


def test_significance_needs_enough_pairs():
    assert MIN_SIGNIFICANT_N == 6
    x = np.arange(6.0)
    assert correlation_interval(x, x ** 3)["significant"]
    assert not correlation_interval(x[:5], x[:5] ** 3)["significant"]


def test_independent_samples_are_not_significant_and_fisher_agrees_with_scipy_test():
    x, y = np.random.default_rng(12).standard_normal((2, 200))
    r = correlation_interval(x, y)
    assert r["low"] < 0 < r["high"] and r["fisher_low"] < 0 < r["fisher_high"]
    assert not r["significant"] and stats.spearmanr(x, y).pvalue > 0.05


def test_seed_spread():
    v = [3.10, 3.14, 3.08, 3.13]
    r = seed_spread(v)
    sd = math.sqrt(sum((x - 3.1125) ** 2 for x in v) / 3)
    half = 3.182446305284263 * sd / 2  # t_{0.975, 3} sqrt(4)
    assert r["mean"] == pytest.approx(3.1125) and r["std"] == pytest.approx(sd)
    assert (r["min"], r["max"], r["n"]) == (3.08, 3.14, 4)
    assert (r["low"], r["high"]) == pytest.approx((3.1125 - half, 3.1125 + half))
    one = seed_spread([2.5])
    assert one["mean"] == one["min"] == one["max"] == 2.5
    assert one["std"] is one["low"] is one["high"] is None


@pytest.mark.parametrize("call, match", [
    (lambda: paired_bootstrap([1, 2], [1, 2], level=1.0), "level=1.0"),
    (lambda: paired_bootstrap([1, 2], [1, 2], level=0), "level=0"),
    (lambda: paired_bootstrap([1.0], [2.0]), "a has 1 value"),
    (lambda: paired_bootstrap([1, 2, 3], [1, 2]), "a has 3 windows and b has 2"),
    (lambda: paired_bootstrap([1, 2], [1, 2], n_boot=99), "n_boot=99"),
    (lambda: paired_bootstrap([1, 2, 3], [1, float("inf"), 3]), r"b\[1\] = inf"),
    (lambda: bootstrap_mean([1, float("nan")]), r"values\[1\] = nan"),
    (lambda: bootstrap_mean([[1, 2], [3, 4]]), "1-D"),
    (lambda: correlation_interval([1, 2, 3], [1, 2]), "x has 3 values and y has 2"),
    (lambda: correlation_interval([1, 2, 3], [1, 2, 3], method="pearson"), "pearson"),
    (lambda: correlation_interval([1, 2, 3], [1, 2, 3], level=95), "level=95"),
    (lambda: seed_spread([]), "need at least 1"),
    (lambda: seed_spread([1.0, float("nan")]), r"values\[1\] = nan"),
    (lambda: seed_spread([1.0, 2.0], level=-0.5), "level=-0.5"),
])
def test_bad_input_is_an_options_error(call, match):
    with pytest.raises(OptionsError, match=match):
        call()
    assert issubclass(OptionsError, ValueError)

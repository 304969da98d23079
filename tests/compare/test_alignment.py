import math

import pytest
import torch
from scipy import stats

from compare.alignment import cosine, first_crossing, rank_correlation, relative_norm
from ptq.metrics import relative_output_error_grad as local_loss_grad
from ptq.metrics import relative_output_error


def test_rank_correlation_extremes_and_scipy():
    x = [0.1, 0.5, 0.2, 3.0, 1.0]
    r = rank_correlation(x, [2 * v + 1 for v in x])
    assert r["n"] == 5 and r["spearman"] == pytest.approx(1) and r["kendall"] == pytest.approx(1)
    r = rank_correlation(x, [-math.log(v) for v in x])
    assert r["spearman"] == pytest.approx(-1) and r["kendall"] == pytest.approx(-1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=g).tolist(), torch.randn(40, generator=g).tolist()
    r = rank_correlation(a, b)
    assert r["spearman"] == pytest.approx(stats.spearmanr(a, b).statistic)
    assert r["kendall"] == pytest.approx(stats.kendalltau(a, b).statistic)


def test_rank_correlation_is_none_where_undefined():
    assert rank_correlation([1, 2], [3, 4])["spearman"] is None
    assert rank_correlation([1, 1, 1, 1], [1, 2, 3, 4])["kendall"] is None
    r = rank_correlation([1, 2, None, 3, float("nan")], [1, 2, 5, 3, 4])
    assert r["n"] == 3 and r["spearman"] == pytest.approx(1)


def test_local_loss_grad_is_the_gradient_of_the_relative_output_error():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g,
                                                                          dtype=torch.float64)
    W = torch.randn(8, 16, generator=g, dtype=torch.float64)
    W_hat = (W + 0.1 * torch.randn(8, 16, generator=g, dtype=torch.float64)).requires_grad_()
    e = ((X @ (W_hat - W).T).pow(2).sum() / (X @ W.T).pow(2).sum())
    e.backward()
    H = 2 / X.shape[0] * X.T @ X
    ours = local_loss_grad(W, W_hat.detach(), H)
    assert torch.allclose(ours.double(), W_hat.grad, rtol=1e-4, atol=1e-7)
    assert float(e) == pytest.approx(relative_output_error(W, W_hat.detach(), X))


def test_cosine_and_relative_norm():
    a = torch.randn(5, 7)
    assert cosine(a, 3 * a) == pytest.approx(1) and cosine(a, -a) == pytest.approx(-1)
    assert cosine(torch.tensor([1.0, 0]), torch.tensor([0.0, 2])) == pytest.approx(0)
    assert cosine(a, torch.zeros(5, 7)) is None
    W = {"a": torch.full((2, 2), 2.0), "b": torch.zeros(3)}
    D = {"a": torch.full((2, 2), 1.0), "b": torch.ones(3)}
    assert relative_norm(D, W) == pytest.approx(math.sqrt(7 / 16))


def test_first_crossing_interpolates():
    ts, v = [0, 0.5, 1.0, 1.5], [1.0, 1.1, 1.5, 3.0]
    assert first_crossing(ts, v, 1.3) == pytest.approx(0.75)
    assert first_crossing(ts, v, 5.0) is None
    with pytest.raises(ValueError, match="starts above"):
        first_crossing(ts, v, 0.5)

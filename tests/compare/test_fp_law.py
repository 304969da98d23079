"""Paper C's scaling law: its published derived facts, and the fit."""

import dataclasses
import itertools

import pytest

from compare.fp_law import (PUBLISHED, LawConstants, best_layout, cost_optimal, critical_data,
                            fit, predict)
from ptq.errors import OptionsError


def test_optimal_layouts_are_e2m1_e4m3_e8m7():
    assert [best_layout(P) for P in (4, 8, 16)] == [(2, 1), (4, 3), (8, 7)]


@pytest.mark.parametrize("E,M,want", [(8, 7, 1730e12), (4, 3, 27e12), (2, 1, 0.4e12)])
def test_critical_data_sizes_at_1b_parameters_and_blocks_of_128(E, M, want):
    got = critical_data(1e9, E, M, 128)
    assert got == pytest.approx(want, rel=0.02)
    # it is the minimum of the loss over D
    assert predict(1e9, got, E, M, 128) < min(predict(1e9, got * 0.8, E, M, 128),
                                              predict(1e9, got * 1.25, E, M, 128))


def test_cost_optimal_precision_lies_between_4_and_8_bits():
    for C in (1e20, 1e22, 1e24, 1e26):
        assert 4 <= cost_optimal(C)["bits"] <= 8


def grid_runs(c=PUBLISHED):
    runs = []
    for N, D, (E, M), B in itertools.product((1e6, 1e7, 1e8), (1e8, 1e9, 1e10),
                                             ((2, 1), (4, 3), (3, 2), (1, 4)), (32, 256)):
        runs.append(dict(N=N, D=D, E=E, M=M, B=B, loss=float(predict(N, D, E, M, B, c))))
    return runs


def test_the_fit_recovers_constants_from_their_own_predictions():
    start = dataclasses.replace(PUBLISHED, n=50.0, a=0.3, d=50000.0, b=0.45, eps=2.2, g=8000.0,
                                dl=2.5, nu=3.5)
    res = fit(grid_runs(), start=start)
    for name in ("a", "b", "eps", "dl", "nu"):
        assert getattr(res.constants, name) == pytest.approx(getattr(PUBLISHED, name), rel=1e-3)
    assert res.rmse < 1e-6 and res.n_runs == 72


def test_a_table_that_cannot_identify_the_constants_is_refused():
    one_format = [r for r in grid_runs() if (r["E"], r["M"]) == (4, 3)]
    with pytest.raises(OptionsError, match="cannot identify .* vary"):
        fit(one_format)
    with pytest.raises(OptionsError, match="3 runs cannot fit 8 constants"):
        fit(grid_runs()[:3])
    # fixing what the table cannot see makes it fit
    res = fit(one_format, free=("n", "a", "d", "b", "eps"))
    assert res.constants.a == pytest.approx(PUBLISHED.a, rel=1e-3)
    with pytest.raises(OptionsError, match="choose from"):
        fit(one_format, free=("zeta",))
    assert isinstance(res.constants, LawConstants)


def test_the_command_names_the_layout_and_the_critical_data_size(capsys):
    from recipes import cli

    cli.main(["fp-law", "--bits", "8", "--params", "1e9", "--block", "128"])
    out = capsys.readouterr().out
    assert "E4M3" in out.splitlines()[0] and "27.3T tokens" in out
    cli.main(["fp-law", "--format", "bf16", "--params", "1e9", "--json"])
    import json

    r = json.loads(capsys.readouterr().out)
    assert r["format"] == "E8M7" and r["D_crit"] == pytest.approx(1730e12, rel=0.02)


def test_a_constant_the_runs_push_below_zero_stops_at_its_bound():
    runs = grid_runs()
    for r in runs:
        r["loss"] -= 2.5  # below what any eps >= 0 can reach
    res = fit(runs, free=("n", "d", "eps"))
    assert res.at_bounds == ("eps",) and res.constants.eps < 1e-6

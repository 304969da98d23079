"""Weights the grid cannot represent: NaN/Inf are refused with their count and position; finite
weights near the dtype's maximum quantize to finite values; GPTQ refuses bad options and inputs."""

import math

import pytest
import torch

import ptq
from ptq.errors import NonFiniteError, OptionsError, QalignError
from ptq.formats import (ClipSearch, SpecError, compute_qparams, dequantize, expand_blocks,
                         fake_quantize, parse_spec, quantize)

FMAX = torch.finfo(torch.float32).max
SPECS = [f"int{b}{s}-{g}" for b in (2, 3, 4, 8) for s in ("", "-sym") for g in ("ch", "t", "g8")]
SPECS += ["e2m1-ch", "e4m3-g8", "e5m2-t", "e8m7-ch", "e1m0-g8"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("spec", ["int4-g8", "int3-sym-ch", "e2m1-t"])
def test_non_finite_weights_are_refused_with_count_and_position(bad, spec):
    w = torch.randn(4, 16)
    w[2, 5] = bad
    w[3, 0] = bad
    for call in (lambda: quantize(w, spec), lambda: compute_qparams(w, spec),
                 lambda: fake_quantize(w, spec, clip=ClipSearch()),
                 lambda: ptq.rtn_quantize(w, None, parse_spec(spec))):
        with pytest.raises(NonFiniteError, match=r"\(4, 16\) holds 2 NaN/Inf value\(s\), the "
                                                 r"first at row 2, column 5; check the checkpoint"):
            call()
    assert issubclass(NonFiniteError, QalignError) and issubclass(NonFiniteError, ValueError)


def test_non_finite_position_is_read_as_rows_of_the_last_dim():
    w = torch.randn(2, 3, 8)
    w[1, 2, 6] = math.nan  # row 1 * 3 + 2 of the (6, 8) view
    with pytest.raises(NonFiniteError, match="row 5, column 6"):
        quantize(w, "int4-ch")


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("big", [3e38, FMAX])
def test_weights_near_the_float32_max_quantize_to_finite_values(spec, big):
    spec = parse_spec(spec)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g)
    w[0, :4] = torch.tensor([big, -big, big / 2, -big / 3])  # range and w_hat overflow today
    w[1] = (torch.rand(32, generator=g) * 2 - 1) * big
    w[2, 7], w[3, 1] = big, -big  # one-sided blocks
    qt = quantize(w, spec)
    assert torch.isfinite(qt.scale).all()
    w_hat = dequantize(qt)
    assert torch.isfinite(w_hat).all()
    assert torch.equal(w_hat, fake_quantize(w, spec))  # the round trip is still the fake quant
    assert torch.isfinite(fake_quantize(w, spec, clip=ClipSearch())).all()
    s = expand_blocks(qt.scale, w.shape, spec).double()
    err = (w_hat.double() - w.double()).abs()
    if spec.kind == "int":  # within a step and a half (saturated ends), as the docstring says
        assert (err <= 1.5 * s * (1 + 1e-6)).all()
    else:  # RTN's relative bound of ExMy, plus the 2^-10 margin of the top value
        sub = s * 2.0 ** (1 - spec.bias - spec.man_bits)
        bound = torch.maximum(w.double().abs() * 2.0 ** -(spec.man_bits + 1), sub / 2)
        assert (err <= bound * (1 + 1e-6) + 2.0**-9 * s * spec.float_max).all()


@pytest.mark.parametrize("spec", ["int4-ch", "int3-sym-ch", "e2m1-ch", "int8-ch"])
def test_only_the_blocks_near_the_maximum_change_their_scales(spec):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    huge = w.clone()
    huge[3, 10] = 3.3e38  # one row at the limit, the other rows untouched
    a, b = quantize(w, spec), quantize(huge, spec)
    keep = torch.arange(8) != 3
    assert torch.equal(a.scale[keep], b.scale[keep]) and torch.equal(a.codes[keep], b.codes[keep])
    assert torch.isfinite(dequantize(b)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["int2-sym-ch", "int4-ch", "e2m1-g4", "e5m10-ch", "e8m7-t"])
def test_half_precision_weights_near_their_max_stay_finite_in_their_dtype(dtype, spec):
    top = torch.finfo(dtype).max
    w = torch.tensor([[top, -top, 1.0, 0.0], [top / 3, -top / 2, 5.0, -7.0]], dtype=dtype)
    w_hat = dequantize(quantize(w, spec))
    assert w_hat.dtype == dtype and torch.isfinite(w_hat).all()
    assert torch.equal(w_hat, fake_quantize(w, spec))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(grid=0), "grid=0"), (dict(grid=2.5), "grid=2.5"), (dict(grid=True), "grid=True"),
    (dict(max_shrink=0.0), "max_shrink=0.0 is not in"), (dict(max_shrink=1.0), "max_shrink"),
    (dict(max_shrink=math.nan), "max_shrink"), (dict(norm=0.0), "norm"),
    (dict(norm=math.nan), "norm"), (dict(norm=math.inf), "norm")])
def test_clip_search_numbers_are_options_errors(kwargs, needle):
    with pytest.raises(OptionsError, match=needle):
        ClipSearch(**kwargs)


def correlated(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 8, generator=g) @ torch.randn(8, d, generator=g)
    X = X + 0.05 * torch.randn(n, d, generator=g)
    return torch.randn(32, d, generator=g), 2.0 / n * X.double().T @ X.double()


@pytest.mark.parametrize("kwargs,needle", [
    (dict(block_size=0), "block_size=0 must be an integer >= 1"),
    (dict(block_size=-1), "block_size=-1"), (dict(block_size=16.0), "block_size=16.0"),
    (dict(damp=-0.01), r"damp=-0.01 must be in \[0, 10\)"), (dict(damp=10.0), "damp=10.0"),
    (dict(damp=math.nan), "damp=nan"), (dict(clip="mse"), "must be a ClipSearch")])
def test_gptq_options_out_of_range_are_options_errors(kwargs, needle):
    W, H = correlated()
    with pytest.raises(OptionsError, match=needle):
        ptq.gptq_quantize(W, H, "int4-g16", **kwargs)
    if "clip" not in kwargs:
        with pytest.raises(OptionsError, match=needle):
            ptq.GPTQOptions(**kwargs)


def test_gptq_inputs_that_do_not_fit_are_one_line_errors():
    W, H = correlated()
    for bad_H in (H[:, :63], H[:63, :63], H[0]):
        with pytest.raises(QalignError, match=r"H of shape \(in, in\) = \(64, 64\)"):
            ptq.gptq_quantize(W, bad_H, "int4-ch")
    for bad_W in (W[0], W[:0], W.view(4, 8, 64)):
        with pytest.raises(QalignError, match="non-empty \\(out, in\\)"):
            ptq.gptq_quantize(bad_W, H, "int4-ch")
    with pytest.raises(QalignError, match=r"H.to\(W.device\)"):
        ptq.gptq_quantize(W, H.to("meta"), "int4-ch")
    with pytest.raises(SpecError, match="group_size=48 does not divide in_features=64"):
        ptq.gptq_quantize(W, H, "int4-g48")


def test_gptq_refuses_non_finite_weights_and_hessians():
    W, H = correlated()
    W[4, 9] = math.nan
    with pytest.raises(NonFiniteError, match="W of shape \\(32, 64\\) holds 1 .* row 4, column 9"):
        ptq.gptq_quantize(W, H, "int4-g16")
    W, H = correlated()
    H[3, 7] = H[7, 3] = math.inf
    with pytest.raises(NonFiniteError, match="Hessian H .* holds 2 .* row 3, column 7.*"
                                             "activations overflowed.*float32.*fewer tokens"):
        ptq.gptq_quantize(W, H, "int4-g16")


@pytest.mark.parametrize("spec", ["int2-g16", "int3-sym-ch", "e2m1-g16"])
def test_gptq_on_weights_near_the_maximum_is_rtn_or_a_clear_overflow_error(spec):
    W, _ = correlated()
    W[2, :3] = torch.tensor([1.1e38, 3e38, -3e38])
    res = ptq.gptq_quantize(W, torch.eye(64, dtype=torch.float64), spec)
    assert torch.equal(res.weight, fake_quantize(W, spec))  # identity H: GPTQ is RTN, finite
    # input 1 follows input 0 at 1/100 of its size: with no damping, an error in column 0 moves
    # column 1 by ~100x that error, past the float32 maximum
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g)
    X[:, 1] = 0.01 * X[:, 0] + 1e-5 * torch.randn(256, generator=g)
    H = 2.0 / 256 * X.double().T @ X.double()
    with pytest.raises(NonFiniteError, match="GPTQ's result .* updates overflowed on weights up "
                                             "to 3e\\+38; quantize this layer with rtn"):
        ptq.gptq_quantize(W, H, spec, damp=0.0)


@pytest.mark.parametrize("scale", [1.0, 1e37, 1e-30])
def test_the_proxy_loss_is_finite_and_exact_at_any_scale(scale):
    # 1e37: W H overflows float32 unless scaled; 1e-30: W W^T would flush to zero
    g = torch.Generator().manual_seed(0)
    X = 30 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    H = (2 / 64) * X.T @ X
    W = torch.randn(8, 16, generator=g, dtype=torch.float64) * scale
    Wq = W + 0.1 * scale * torch.randn(8, 16, generator=g, dtype=torch.float64)
    dW = W - Wq
    want = float(torch.trace(dW @ H @ dW.T))  # float64 throughout
    got = ptq.layer_loss(W.float(), Wq.float(), H.float())
    assert math.isfinite(got) and got == pytest.approx(want, rel=1e-5)
    energy = ptq.metrics.output_energy(W.float(), H.float())
    assert energy == pytest.approx(float(torch.trace(W.float().double() @ H @ W.float().double().T)),
                                   rel=1e-5)
    if scale == 1.0:  # ordinary magnitudes: the plain float32 GEMM, bit for bit
        d = W.float().double() - Wq.float().double()
        assert got == float(((d.float() @ H.float()).double() * d).sum())

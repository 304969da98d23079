import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ptq import formats
from ptq.formats import (ClipSearch, QuantSpec, SpecError, compute_qparams, dequantize,
                         fake_quantize, fake_quantize_with, parse_spec, quantize)


@pytest.mark.parametrize("text,canonical", [
    ("int4", "int4-ch"), ("int3-g128", "int3-g128"), ("int4-sym-ch", "int4-sym-ch"),
    ("int2-t", "int2-t"), ("e2m1-g32", "e2m1-g32"), ("fp4", "e2m1-ch"), ("fp8-t", "e4m3-t"),
    ("bf16", "e8m7-ch"), ("fp16-g64", "e5m10-g64"), ("e1m0", "e1m0-ch"), ("INT8-SYM-G16", "int8-sym-g16"),
])
def test_parse_gives_canonical_string_back(text, canonical):
    spec = parse_spec(text)
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec


@pytest.mark.parametrize("bad,needle", [
    ("int1", "2..8"), ("int9", "2..8"), ("e0m3", "1..8"), ("e9m1", "1..8"), ("e2m24", "0..23"),
    ("int4-g0", "positive"), ("int4-x", "cannot parse"), ("e2m1-sym", "cannot parse"),
    ("", "cannot parse"), ("int4-g64-ch", "cannot parse"), ("uint4", "cannot parse"),
])
def test_bad_specs_are_clear_errors(bad, needle):
    with pytest.raises(SpecError, match=needle):
        parse_spec(bad)


def test_float_spec_rejects_sym_flag_in_dataclass():
    with pytest.raises(SpecError, match="drop -sym"):
        QuantSpec("float", 4, True, 2, 1)


def test_e2m1_grid_is_exactly_the_fp4_values():
    w = torch.linspace(-6, 6, 1201).unsqueeze(0)  # absmax 6 -> scale 1
    values = set(fake_quantize(w, "e2m1-t").unique().tolist())
    grid = {0, .5, 1, 1.5, 2, 3, 4, 6}
    assert values == grid | {-v for v in grid}
    assert parse_spec("e2m1").float_max == 6.0 and parse_spec("e4m3").float_max == 480.0


@pytest.mark.parametrize("spec,dtype,fmt_max,ieee_max", [
    ("e5m10-t", torch.float16, 131008.0, 65504.0),
    ("e5m2-t", torch.float8_e5m2, 114688.0, 57344.0),
    ("e4m3-t", torch.float8_e4m3fn, 480.0, 448.0),
])
def test_exmy_rounding_matches_ieee_casts(spec, dtype, fmt_max, ieee_max):
    # With the format max in the tensor the scale is exactly 1, so the grid is the raw format,
    # which agrees with the IEEE type (round to nearest, ties to even) below the IEEE max.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * torch.logspace(-9, 3, 4096, base=2) * 7
    x = x.clamp(-ieee_max * 0.99, ieee_max * 0.99)
    x = torch.cat([x, torch.tensor([fmt_max])]).unsqueeze(0)
    got = fake_quantize(x, spec)
    want = x.to(dtype).float()
    assert torch.equal(got[0, :-1], want[0, :-1])
    assert got[0, -1] == fmt_max


@pytest.mark.parametrize("text", ["int2", "int3-g8", "int4-sym-g16", "int8-sym-t", "e2m1-g8",
                                  "e4m3-ch", "e3m2-t", "e8m7-g16"])
def test_codes_in_range_round_trip_exact_and_idempotent(text):
    spec = parse_spec(text)
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3))
    qt = quantize(w, spec)
    if spec.kind == "int":
        assert int(qt.codes.min()) >= spec.qmin and int(qt.codes.max()) <= spec.qmax
    else:
        assert int(qt.codes.min()) >= 0 and int(qt.codes.max()) < 2**spec.bits
    fq = fake_quantize(w, spec)
    assert torch.equal(dequantize(qt), fq)  # the round trip is the fake quantization
    p = compute_qparams(w, spec)
    assert torch.equal(fake_quantize_with(fq, p, spec), fq)  # on the grid: idempotent


def test_group_scales_are_per_group():
    w = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    w[:, 8:16] *= 100  # the second group of each row is much wider
    spec = parse_spec("int4-sym-g8")
    p = compute_qparams(w, spec)
    assert p.scale.shape == (3, 4) and p.zero is None
    want = w.view(3, 4, 8).abs().amax(-1) / 7.5
    assert torch.allclose(p.scale, want, rtol=0, atol=0)
    # the narrow groups keep their resolution: error well below the wide group's scale
    err = (fake_quantize(w, spec) - w).abs().view(3, 4, 8).amax(-1)
    assert (err[:, [0, 2, 3]] <= p.scale[:, [0, 2, 3]] / 2 + 1e-6).all()


def test_asymmetric_grid_has_integer_zero_and_exact_zero():
    w = torch.tensor([[0.0, 0.3, 1.0, 2.0, -0.5, 0.7, 1.1, 0.0]])
    qt = quantize(w, "int3")
    assert qt.zero.dtype == torch.uint8 and qt.codes.dtype == torch.uint8
    assert dequantize(qt)[0, 0] == 0.0  # zero stays exactly representable


def test_group_size_that_does_not_divide_is_a_clear_error():
    with pytest.raises(SpecError, match=r"group_size=100 does not divide in_features=576.*-ch"):
        quantize(torch.randn(4, 576), "int4-g100")
    with pytest.raises(SpecError, match="q_proj"):
        parse_spec("int4-g100").check_shape(576, "model.layers.0.self_attn.q_proj")


def test_zero_tensor_stays_zero_without_nan():
    for text in ("int4", "int4-sym-g4", "e2m1-t"):
        fq = fake_quantize(torch.zeros(2, 8), text)
        assert torch.equal(fq, torch.zeros(2, 8))


def test_mse_clip_search_never_worse_and_helps_with_outliers():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    w[:, ::32] = 8.0  # one outlier per block of 32: clipping it buys resolution for the rest
    for text in ("int3-g32", "int4-sym-ch", "e2m1-g32"):
        plain = (fake_quantize(w, text) - w).pow(2).view(64, -1).sum(-1)
        clipped = (fake_quantize(w, text, clip=ClipSearch()) - w).pow(2).view(64, -1).sum(-1)
        assert (clipped <= plain * (1 + 1e-6)).all()  # shrink 1.0 is among the candidates
        assert clipped.sum() < plain.sum()
    plain = (fake_quantize(w, "int3-g32") - w).pow(2).sum()
    assert (fake_quantize(w, "int3-g32", clip=ClipSearch()) - w).pow(2).sum() < 0.9 * plain


@pytest.mark.parametrize("text", ["int3-g32", "int2-sym-ch", "e2m1-g32"])
def test_clip_search_picks_each_blocks_first_best_factor_whatever_the_chunking(text, monkeypatch):
    """Several shrink factors run in one tensor op; the choice must be the plain search's: per
    block, the first factor 1 - 0.2 i / 20 (i = 0..20) of lowest error, bit for bit."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    w[:, ::32] *= 6.0
    w[3, :] = 0.5  # a constant block: min/max (the first factor) fits it exactly
    spec, clip = parse_spec(text), ClipSearch()
    blocks = formats._blocked(w, spec)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    best, best_err = None, torch.full_like(lo, math.inf)
    for i in range(clip.grid + 1):  # the reference: one factor at a time, strict improvement
        k = 1.0 - clip.max_shrink * i / clip.grid
        p = formats._params_from_range(lo * k, hi * k, spec)
        err = (formats._from_grid(formats._on_grid(blocks, p, spec), p) - blocks).pow(2).sum(
            -1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = p if best is None else formats.QParams(
            torch.where(better, p.scale, best.scale),
            None if p.zero is None else torch.where(better, p.zero, best.zero))
    for chunk in (1, 3 * w.numel(), 1 << 23):  # one factor per op, three, all 21
        monkeypatch.setattr(formats, "_CLIP_CHUNK", chunk)
        got = compute_qparams(w, spec, clip)
        assert torch.equal(got.scale, best.scale.squeeze(-1))
        assert got.zero is None if best.zero is None else torch.equal(got.zero,
                                                                      best.zero.squeeze(-1))


def test_e8_formats_use_float64_and_stay_finite():
    w = torch.randn(8, 16) * 1e-3
    fq = fake_quantize(w, "e8m23-ch")
    assert fq.dtype == torch.float32 and torch.isfinite(fq).all()
    assert torch.allclose(fq, w, rtol=1e-6, atol=0)


def test_dtype_is_preserved():
    w = torch.randn(4, 32, dtype=torch.bfloat16)
    assert fake_quantize(w, "int4-g16").dtype == torch.bfloat16
    assert dequantize(quantize(w, "int4-g16")).dtype == torch.bfloat16


SPECS = st.one_of(
    st.builds(lambda b, s: f"int{b}" + ("-sym" if s else ""), st.integers(2, 8), st.booleans()),
    st.builds(lambda e, m: f"e{e}m{m}", st.integers(1, 5), st.integers(0, 6)),
)
GRANS = st.sampled_from(["ch", "t", "g"])


@settings(max_examples=150, deadline=None)
@given(head=SPECS, gran=GRANS, rows=st.integers(1, 6), groups=st.integers(1, 4),
       group=st.integers(1, 12), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_property_round_trip(head, gran, rows, groups, group, seed, scale):
    spec = parse_spec(f"{head}-g{group}" if gran == "g" else f"{head}-{gran}")
    w = torch.randn(rows, groups * group, generator=torch.Generator().manual_seed(seed)) * scale
    qt = quantize(w, spec)
    fq = fake_quantize(w, spec)
    assert torch.equal(dequantize(qt), fq)
    p = compute_qparams(w, spec)
    assert torch.equal(fake_quantize_with(fq, p, spec), fq)
    # error bound of round-to-nearest: half a step of the block's grid
    s = p.scale.repeat_interleave(
        {"channel": w.shape[1], "tensor": w.numel(), "group": group}[spec.granularity], dim=-1)
    s = s.reshape(w.shape)
    err = (fq - w).abs()
    if spec.kind == "int":
        assert (err <= s / 2 * (1 + 1e-5) + 1e-6 * scale).all()
        assert len(qt.codes.unique()) <= 2**spec.bits
    else:
        sub_quantum = s * 2.0 ** (1 - spec.bias - spec.man_bits)
        bound = torch.maximum(w.abs() * 2.0 ** -(spec.man_bits + 1), sub_quantum / 2)
        assert (err <= bound * (1 + 1e-5) + 1e-6 * scale).all()
    assert math.isfinite(float(fq.sum()))

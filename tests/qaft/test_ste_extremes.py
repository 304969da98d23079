"""The clipped STE at a group's extremes under dynamic (min/max) scales."""

import pytest
import torch
from torch import nn

import ptq
import qaft
from compare.models import tiny_model
from ptq.formats import compute_qparams, inside_range, parse_spec
from qaft.fake_quant import FakeQuantLinear


def extremes_outside(spec: str, rows=256, cols=576, seed=0):
    """Fraction of each group's min and max that `inside_range` puts outside its own dynamic
    grid (Gaussian weights), and the fraction of the other weights outside."""
    s = parse_spec(spec)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02
    outside = ~inside_range(w, compute_qparams(w, s), s)
    G = s.group_size
    wb, ob = w.view(rows, -1, G), outside.view(rows, -1, G)
    ext = (wb == wb.amin(-1, keepdim=True)) | (wb == wb.amax(-1, keepdim=True))
    return (ob & ext).sum() / ext.sum(), (ob & ~ext).sum() / (~ext).sum()


@pytest.mark.parametrize("spec, lost", [("int2-g64", 0.5), ("int3-g64", 0.5), ("int4-g64", 0.5),
                                        ("int3-sym-g64", 0.36)])
def test_rounded_zero_points_put_one_extreme_of_most_groups_outside_their_own_grid(spec, lost):
    # The range [-z s, (qmax - z) s] of the rounded zero point z misses [min, max] by up to half
    # a step: one extreme of each asymmetric group (rounding z down or up decides which). A
    # symmetric grid tops out at qmax s < absmax: the positive extreme when it is the absmax.
    fraction, others = extremes_outside(spec)
    assert fraction == pytest.approx(lost, abs=0.03)
    assert 0 < others < 0.05  # and the weights within half a step of that edge


def clipping_gradients(spec, w, **kw):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    fq = FakeQuantLinear(lin, spec, **kw)
    x = torch.randn(16, w.shape[1], generator=torch.Generator().manual_seed(1))
    (fq(x) ** 2).sum().backward()
    return lin.weight.grad, fq


def test_with_clip_dynamic_off_the_extremes_keep_their_gradient_under_dynamic_scales():
    spec = parse_spec("int3-g16")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    lost = ~inside_range(w, compute_qparams(w, spec), spec)
    assert lost.sum() >= 8  # today: at least one extreme per group of 8 x 4 loses its gradient

    today, _ = clipping_gradients(spec, w)  # default clip_dynamic=True, clipped_ste=True
    plain, _ = clipping_gradients(spec, w, clipped_ste=False)
    kept, fq = clipping_gradients(spec, w, clip_dynamic=False)
    assert (today[lost] == 0).all() and torch.equal(today[~lost], plain[~lost])
    assert torch.equal(kept, plain) and (kept[lost] != 0).all()  # nothing is clipped
    with torch.no_grad():  # the forward is still PTQ's RTN, exactly
        assert torch.equal(fq.quantized_weight(), ptq.fake_quantize(w, spec))


def test_weights_outside_a_fixed_or_learned_range_still_get_no_gradient():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    for mode in ("fixed", "learned"):
        lin = nn.Linear(16, 4, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        fq = FakeQuantLinear(lin, "int2-g16", scale_mode=mode, clip_dynamic=False)
        with torch.no_grad():
            lin.weight[0, 0] = 100.0  # far outside the range of its group
        fq(torch.randn(8, 16)).sum().backward()
        lo, hi = ptq.formats.representable_range(fq.qparams(), fq.spec)
        outside = (lin.weight < lo) | (lin.weight > hi)
        assert outside[0, 0] and (lin.weight.grad[outside] == 0).all(), mode
        assert (lin.weight.grad[~outside] != 0).all(), mode


def test_prepare_passes_clip_dynamic_on():
    model = tiny_model("llama", seed=0)
    layers = qaft.prepare(model, "int3-g16", qaft.QAFTConfig(clip_dynamic=False))
    assert all(not fq.clip_dynamic for fq in layers.values())
    assert "clip_dynamic=False" in repr(layers["model.layers.0.mlp.up_proj"])
    assert qaft.QAFTConfig().clip_dynamic  # today's gradients by default

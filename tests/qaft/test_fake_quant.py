import pytest
import torch
from torch import nn

import ptq
import qaft
from compare.models import tiny_model
from qaft.fake_quant import FakeQuantLinear


@pytest.mark.parametrize("spec", ["int2-g16", "int3-ch", "int4-sym-g32", "e2m1-g16", "int8-t"])
def test_fake_quant_forward_equals_ptq_rtn_exactly(spec):
    lin = nn.Linear(64, 24)
    x = torch.randn(5, 64)
    fq = FakeQuantLinear.from_linear(lin, spec)
    want = nn.functional.linear(x, ptq.fake_quantize(lin.weight.detach(), spec), lin.bias)
    assert torch.equal(fq(x), want)
    assert fq.weight is lin.weight and fq.to_linear() is lin  # shares, undoable


def test_ste_gradient_is_the_fp_gradient_at_the_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(32, 8, bias=False)
    x = torch.randn(16, 32)
    target = torch.randn(16, 8)
    fq = FakeQuantLinear(lin, "int3-g16", clipped_ste=False)
    ((fq(x) - target) ** 2).sum().backward()
    w_hat = ptq.fake_quantize(lin.weight.detach(), "int3-g16").requires_grad_(True)
    ((x @ w_hat.T - target) ** 2).sum().backward()
    assert torch.allclose(lin.weight.grad, w_hat.grad, rtol=1e-6, atol=1e-6)


def test_clipped_ste_has_no_gradient_outside_the_range():
    lin = nn.Linear(16, 4, bias=False)
    fq = FakeQuantLinear(lin, "int2-sym-ch", scale_mode="fixed", clipped_ste=True)
    with torch.no_grad():
        lin.weight[0, 0] = 100.0  # far outside the fixed range of row 0
    fq(torch.randn(8, 16)).sum().backward()
    lo, hi = ptq.formats.representable_range(fq.qparams(), fq.spec)
    outside = (lin.weight < lo) | (lin.weight > hi)
    assert outside[0, 0] and (lin.weight.grad[outside] == 0).all()
    assert (lin.weight.grad[~outside] != 0).any()


def test_learned_scales_get_the_lsq_gradient():
    torch.manual_seed(1)
    lin = nn.Linear(32, 4, bias=False)
    fq = FakeQuantLinear(lin, "int4-g16", scale_mode="learned")
    assert isinstance(fq.scale, nn.Parameter) and fq.scale.shape == (4, 2)
    with torch.no_grad():
        fq.scale.mul_(0.7)  # some weights now fall outside the range: both LSQ cases occur
    x = torch.randn(8, 32)
    (fq(x) ** 2).sum().backward()
    # LSQ (Esser et al.) written with autograd: clamp to the range, then round through a
    # detached residual (the same forward values, since the bounds are integers)
    expand = ptq.formats.expand_blocks
    s = fq.scale.detach().clone().requires_grad_(True)
    z = expand(fq.zero, lin.weight.shape, fq.spec)
    v = torch.clamp(lin.weight.detach() / expand(s, lin.weight.shape, fq.spec) + z, 0, 15)
    v = v + (torch.round(v) - v).detach()
    w_hat = (v - z) * expand(s, lin.weight.shape, fq.spec)
    ((x @ w_hat.T) ** 2).sum().backward()
    lsq_factor = 1 / (16 * 15) ** 0.5
    assert torch.allclose(fq.scale.grad, s.grad * lsq_factor, rtol=1e-4, atol=1e-6)


def test_prepare_convert_round_trip_on_a_model():
    model = tiny_model("llama", seed=3)
    ids = torch.randint(0, 256, (2, 12))
    layers = qaft.prepare(model, "int3-g16")
    assert len(layers) == 14
    with torch.no_grad():
        fake = model(ids).logits
    codes = qaft.convert(model)
    assert not qaft.fake_quant_layers(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fake)  # converted == fake-quant, exactly
    for name, qt in codes.items():
        w = model.get_submodule(name).weight
        assert torch.equal(ptq.dequantize(qt), w)
        assert torch.equal(ptq.fake_quantize_with(w, ptq.QParams(qt.scale, qt.zero.float()),
                                                  qt.spec), w)  # on the grid


def test_prepare_from_a_gptq_solution_starts_where_gptq_ended():
    calib = torch.randint(0, 256, (4, 16))
    gptq_model = tiny_model("llama", seed=4)
    res = ptq.quantize_sequential(gptq_model, calib, "int3-g16", "gptq", progress=False)
    model = tiny_model("llama", seed=4)
    qaft.prepare(model, "int3-g16", init=res.quantized, scale_mode="fixed")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gptq_model(ids).logits)
    with pytest.raises(ValueError, match="fixed"):
        qaft.prepare(tiny_model("llama", seed=4), "int3-g16", init=res.quantized)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ptq.SpecError, match="in_features=96"):
        qaft.prepare(tiny_model("llama", intermediate_size=96), "int4-g64")
    with pytest.raises(ValueError, match="scale_mode"):
        FakeQuantLinear(nn.Linear(8, 8), "int4", scale_mode="sometimes")

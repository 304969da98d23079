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
    res = ptq.quantize_model(gptq_model, "int3-g16", "gptq", calib=calib, progress=False)
    model = tiny_model("llama", seed=4)
    qaft.prepare(model, "int3-g16", qaft.QAFTConfig(init="gptq"), solution=res.quantized)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gptq_model(ids).logits)
    with pytest.raises(ptq.OptionsError, match="fixed or learned"):
        qaft.QAFTConfig(init="gptq", scale_mode="dynamic")
    with pytest.raises(ptq.OptionsError, match="solution"):  # a solution with init rtn: refused
        qaft.prepare(tiny_model("llama", seed=4), "int3-g16", solution=res.quantized)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ptq.SpecError, match="in_features=96"):
        qaft.prepare(tiny_model("llama", intermediate_size=96), "int4-g64")
    with pytest.raises(ptq.OptionsError, match="scale_mode"):
        FakeQuantLinear(nn.Linear(8, 8), "int4", scale_mode="sometimes")
    # an MSE start with dynamic scales would be RTN after one step: refused, not ignored
    with pytest.raises(ptq.OptionsError, match="discard the mse scales"):
        qaft.QAFTConfig(init="mse", scale_mode="dynamic")
    assert qaft.QAFTConfig(init="mse").scales == "fixed"


def test_prepare_twice_is_refused_and_changes_nothing():
    model = tiny_model("llama", seed=5)
    qaft.prepare(model, "int4-g16")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(ptq.OptionsError, match="already holds fake-quantized"):
        qaft.prepare(model, "int4-g16")
    assert [n for n, _ in model.named_modules()] == before
    # the tree walker does not descend into a FakeQuantLinear: nothing is selected twice
    assert not list(ptq.quantizable_linears(model))


def test_gpt2_conv1d_layers_are_fake_quantized_along_their_input_dimension():
    model = tiny_model("gpt2", seed=6)
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D, weight stored (in=64, out=256)
    ids = torch.randint(0, 256, (2, 12))
    want_w = ptq.fake_quantize(conv.weight.detach().t(), "int4-g16")
    layers = qaft.prepare(model, "int4-g16")
    assert len(layers) == 8  # c_attn, c_proj, c_fc, mlp.c_proj per block
    fq = layers["transformer.h.0.mlp.c_fc"]
    assert torch.equal(fq.quantized_weight().detach(), want_w)
    model(ids).logits.sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.shape == conv.weight.shape
    with torch.no_grad():
        fake = model(ids).logits
    codes = qaft.convert(model)
    assert model.transformer.h[0].mlp.c_fc is conv
    assert torch.equal(conv.weight.t(), ptq.dequantize(codes["transformer.h.0.mlp.c_fc"]))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, fake, atol=1e-5)


def test_weights_computed_once_reuse_w_hat_without_gradients_and_leave_training_alone():
    import qaft

    torch.manual_seed(0)
    layers = [qaft.FakeQuantLinear(torch.nn.Linear(32, 16), "int3-g16", scale_mode="learned"),
              qaft.FakeQuantLinear(torch.nn.Linear(16, 8), "int3-g16", scale_mode="learned")]
    model = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
    calls = []
    for m in layers:
        m.register_forward_pre_hook(lambda mod, args: calls.append(mod.quantized_weight()))
    with qaft.weights_computed_once(model):
        with torch.no_grad():
            held = [m.quantized_weight() for m in layers]
            assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
        assert all(c is h for c, h in zip(calls, held * 2))  # the same tensors, not recomputed
        model(x).sum().backward()  # with gradients: the STE path as always
    assert all(m.weight.grad is not None and m.scale.grad is not None for m in layers)
    assert all(m._w_hat is None for m in layers)  # dropped on the way out

import pytest
import torch
from torch import nn

import ptq
import qaft
from compare.models import tiny_model
from ptq.formats import QParams, expand_blocks, fake_quantize_with
from qaft.fake_quant import FakeQuantLinear
from qaft.train import TrainConfig, finetune, param_groups
from tests.qaft.test_train import blocks


def shifted_layer(seed=1):
    """int4-g16 with learned scales and zero points, moved off their RTN values so that weights
    fall outside the range on both sides and the float zero points round to other integers."""
    torch.manual_seed(seed)
    lin = nn.Linear(32, 4, bias=False)
    fq = FakeQuantLinear(lin, "int4-g16", scale_mode="learned", learn_zero=True)
    with torch.no_grad():
        fq.scale.mul_(0.7)
        fq.zero.add_(torch.tensor([[0.3, -0.4], [0.6, 1.3], [-0.7, 0.2], [1.6, -1.1]]))
    return lin, fq


def test_the_forward_uses_the_rounded_zero_point_on_the_ptq_grid():
    lin, fq = shifted_layer()
    assert isinstance(fq.zero, nn.Parameter) and fq.zero.shape == (4, 2)
    z = torch.round(fq.zero.detach()).clamp(0, 15)
    assert not torch.equal(z, fq.zero.detach())  # the float zero point is not on the integers
    x = torch.randn(8, 32)
    want = fake_quantize_with(lin.weight.detach(), QParams(fq.scale.detach(), z), fq.spec)
    assert torch.equal(fq(x), nn.functional.linear(x, want))
    qt = fq.quantize()
    assert torch.equal(qt.zero, z.to(torch.uint8)) and torch.equal(ptq.dequantize(qt), want)


def test_learned_zero_points_get_the_lsq_plus_gradient():
    lin, fq = shifted_layer()
    x = torch.randn(8, 32)
    (fq(x) ** 2).sum().backward()
    # LSQ+ written with autograd (as EfficientQAT does): the zero point rounded and clamped
    # through a detached residual, the weight clamped to the range and rounded the same way
    shape, spec = lin.weight.shape, fq.spec
    s = fq.scale.detach().clone().requires_grad_(True)
    zf = fq.zero.detach().clone().requires_grad_(True)
    z = zf + (torch.round(zf).clamp(0, 15) - zf).detach()
    S, Z = expand_blocks(s, shape, spec), expand_blocks(z, shape, spec)
    v = torch.clamp(lin.weight.detach() / S + Z, 0, 15)
    outside = (v == 0) | (v == 15)
    assert outside.any() and (~outside).any()  # both cases of dW_hat/dz occur
    v = v + (torch.round(v) - v).detach()
    w_hat = (v - Z) * S
    ((x @ w_hat.T) ** 2).sum().backward()
    lsq_factor = 1 / (16 * 15) ** 0.5
    assert fq.zero.grad.abs().min() > 0
    assert torch.allclose(fq.zero.grad, zf.grad * lsq_factor, rtol=1e-4, atol=1e-7)
    assert torch.allclose(fq.scale.grad, s.grad * lsq_factor, rtol=1e-4, atol=1e-7)


def test_zero_points_train_without_decay_and_convert_to_integer_codes():
    model = tiny_model("llama", seed=0)
    layers = qaft.prepare(model, "int2-g16", qaft.QAFTConfig(scale_mode="learned",
                                                             learn_zero=True))
    fq = layers["model.layers.0.mlp.up_proj"]
    start = fq.zero.detach().clone()
    _, no_decay = param_groups(model, TrainConfig(weight_decay=0.1))
    assert any(p is fq.zero for p in no_decay["params"])
    finetune(model, blocks(), TrainConfig(lr=0.05, max_steps=6, batch_size=2), progress=False)
    assert not torch.equal(fq.zero.detach(), start)  # the zero points learned
    with torch.no_grad():
        ids = torch.randint(0, 256, (2, 12))
        fake = model(ids).logits
        codes = qaft.convert(model)
        assert torch.equal(model(ids).logits, fake)  # converted == fake-quant, exactly
    for qt in codes.values():
        assert qt.zero.dtype == torch.uint8 and int(qt.zero.max()) <= 3


def test_learn_zero_needs_learned_scales_and_an_asymmetric_int_grid():
    with pytest.raises(ptq.OptionsError, match="use scale_mode learned"):
        qaft.QAFTConfig(learn_zero=True)  # init rtn: dynamic scales
    with pytest.raises(ptq.OptionsError, match="learn_zero needs scale_mode 'learned'"):
        FakeQuantLinear(nn.Linear(16, 4), "int4", scale_mode="fixed", learn_zero=True)
    model = tiny_model("llama", seed=0)
    before = [n for n, _ in model.named_modules()]
    for spec in ("int4-sym-g16", "e2m1-g16"):
        with pytest.raises(ptq.OptionsError, match="asymmetric int grid"):
            qaft.prepare(model, spec, qaft.QAFTConfig(scale_mode="learned", learn_zero=True))
    assert [n for n, _ in model.named_modules()] == before  # refused before any swap

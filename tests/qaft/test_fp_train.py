"""Quantized training (paper C): the layer equals nn.Linear when nothing is rounded, each
position changes only the GEMM it feeds, the swap keeps the Parameters."""

import pytest
import torch
from torch import nn

from compare.models import tiny_model
from ptq.errors import OptionsError
from ptq.formats import fake_quantize
from qaft.fp_train import (QTrainConfig, QTrainLinear, prepare_qtrain, qtrain_layers,
                           restore_linears)


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 32, generator=g))
        lin.bias.copy_(torch.randn(16, generator=g))
    x = torch.randn(2, 8, 32, generator=g)
    gy = torch.randn(2, 8, 16, generator=g)
    return lin, x, gy


def run(module, x, gy):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad, module.weight.grad.clone(), module.bias.grad.clone()


def test_nothing_rounded_or_an_exact_format_equals_nn_linear_bit_for_bit():
    lin, x, gy = setup()
    ref = run(lin, x, gy)
    for config in (QTrainConfig(targets=()),
                   QTrainConfig(spec="e8m23-g8", targets=("P1", "P2", "P3", "P4", "P5", "P6"),
                                pow2_scales=True)):
        got = run(QTrainLinear(lin, config), x, gy)
        for a, b in zip(got, ref):
            assert torch.equal(a, b)


def test_each_position_changes_only_the_gemm_it_feeds():
    lin, x, gy = setup(1)
    y0, gx0, gw0, gb0 = run(lin, x, gy)
    spec = "e2m1-g8"
    x2, gy2 = x.reshape(-1, 32), gy.reshape(-1, 16)
    W = lin.weight.detach()
    q = lambda t: fake_quantize(t, spec)  # noqa: E731  rows = the GEMM's reduction last
    expect = {  # what each position alone gives for (y, dX, dW)
        "P1": (q(x2) @ W.t(), None, None),
        "P2": (x2 @ q(W).t(), None, None),
        "P3": (None, q(gy2) @ W, None),
        "P4": (None, gy2 @ q(W.t()).t(), None),
        "P5": (None, None, q(gy2.t()) @ x2),
        "P6": (None, None, gy2.t() @ q(x2.t()).t()),
    }
    for pos, (y_e, gx_e, gw_e) in expect.items():
        y, gx, gw, gb = run(QTrainLinear(lin, QTrainConfig(spec=spec, targets=(pos,))), x, gy)
        for got, plain, want in ((y, y0, y_e), (gx, gx0, gx_e), (gw, gw0, gw_e)):
            if want is None:
                assert torch.equal(got, plain), pos  # untouched GEMM: bit for bit
            else:
                torch.testing.assert_close(got.reshape(want.shape), want + (
                    lin.bias.detach() if got is y else 0), rtol=1e-6, atol=1e-6)
                assert not torch.equal(got, plain), pos
        assert torch.equal(gb, gb0)


def test_the_swap_keeps_parameters_names_and_trains():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = prepare_qtrain(model, QTrainConfig(spec="e3m2-g16"))
    assert len(names) == 14 and set(qtrain_layers(model)) == set(names)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in before.items()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss0 = model(input_ids=ids, labels=ids).loss
    loss0.backward()
    opt.step()
    assert model(input_ids=ids, labels=ids).loss < loss0
    restore_linears(model)
    assert not qtrain_layers(model)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


def test_bad_positions_specs_and_blocks_are_refused():
    with pytest.raises(OptionsError, match="positions are P1..P6"):
        QTrainConfig(targets=("P7",))
    with pytest.raises(OptionsError, match="POSITION=SPEC"):
        QTrainConfig(specs=("X=e4m3",))
    with pytest.raises(OptionsError, match="int4-sym or a float format"):
        QTrainConfig(spec="int4-g8", pow2_scales=True)
    lin, x, gy = setup()
    layer = QTrainLinear(lin, QTrainConfig(spec="e4m3-g5", targets=("P2",)))
    with pytest.raises(OptionsError, match="blocks of 5 do not divide"):
        layer(x)
    layer = QTrainLinear(lin, QTrainConfig(spec="e4m3-g32", targets=("P6",)))  # N = 16 tokens
    with pytest.raises(OptionsError, match="batch_size x seq_len"):
        run(layer, x, gy)

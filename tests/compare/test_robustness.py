"""W8A8 activation fake quantization, outlier statistics, PTQ settings."""

import pytest
import torch
from scipy import stats as sps

from compare.models import tiny_model
from compare.outliers import activation_outliers, summarize
from compare.robustness import parse_setting, quantized_nll, relative_increase
from compare.evaluate import evaluate_nll
from ptq.activations import quantize_per_token, quantized_inputs
from ptq.errors import OptionsError


def test_per_token_rounding_equals_the_direct_computation():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0))
    x[0, 0] = 0.0  # a zero token stays zero
    got = quantize_per_token(x, 8)
    for t in range(3):
        for i in range(5):
            row = x[t, i]
            s = row.abs().max().item() / 127 or 1.0
            want = torch.tensor([max(-127, min(127, round(v / s))) * s for v in row.tolist()])
            torch.testing.assert_close(got[t, i], want, rtol=0, atol=1e-6)
    assert torch.equal(got[0, 0], torch.zeros(16))
    assert got.abs().amax(-1).allclose(x.abs().amax(-1))  # each token's extreme is on the grid
    with pytest.raises(OptionsError, match="use 2 to 16"):
        quantize_per_token(x, 1)


def test_quantized_inputs_change_the_forward_only_inside_the_block():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    before = model(input_ids=ids).logits
    seen = []
    layer = model.model.layers[0].mlp.down_proj
    with quantized_inputs(model, 4) as names:
        h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        during = model(input_ids=ids).logits
    h.remove()
    after = model(input_ids=ids).logits
    assert len(names) == 14 and torch.equal(before, after) and not torch.equal(before, during)
    # the hook that ran after ours saw the per-token rounded input (at most 15 levels a token)
    assert all(len(row.unique()) <= 15 for row in seen[0].reshape(-1, seen[0].shape[-1]))


def test_outlier_statistics_on_planted_activations():
    model = tiny_model("llama")
    layer = "model.layers.1.mlp.down_proj"
    captured = []
    module = model.get_submodule(layer)

    def plant(m, args):  # feature 7 of every token becomes an outlier of 9.5
        x = args[0].clone()
        x[..., 7] = 9.5
        captured.append(x.detach().clone())
        return (x,)
    module.register_forward_pre_hook(plant)  # runs before the statistics' own hook
    ids = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(2))
    stats = activation_outliers(model, ids, batch_size=3)
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()
    s = stats[layer]
    assert s["outlier_dims"] == int((x.abs().amax(0) >= 6).sum()) >= 1
    assert s["max_abs"] == pytest.approx(float(x.abs().max()))
    assert s["kurtosis"] == pytest.approx(sps.kurtosis(x.flatten().numpy(), fisher=False),
                                          rel=1e-9)
    assert s["tokens"] == 40
    summary = summarize(stats)
    assert summary["max_abs"] >= 9.5 and summary["outlier_dims"] >= 1


def test_settings_parse_and_w8a8_is_close_to_fp_on_a_small_model():
    assert parse_setting("w8a8").act_bits == 8 and parse_setting("w8a8").spec == "int8-sym-ch"
    assert parse_setting("gptq:int3-g16").method == "gptq"
    for bad, match in [("gptq", "METHOD:SPEC"), ("nope:int4", "unknown"),
                       ("rtn:int4+b8", r"\+aB")]:
        with pytest.raises(Exception, match=match):
            parse_setting(bad)
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(3))
    fp = evaluate_nll(model, ids, progress=False).nll
    w8a8 = quantized_nll(model, parse_setting("w8a8"), ids, None)
    assert 0 < abs(relative_increase(fp, w8a8)) < 0.01

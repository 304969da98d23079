import pytest
import torch
from torch import nn

import ptq
from compare.models import TINY_CONFIGS, tiny_model
from ptq.layers import linear_weight


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_rtn_quantizes_exactly_the_linears_in_decoder_blocks(model_type):
    model = tiny_model(model_type, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = ptq.decoder_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers
    selected = dict(ptq.quantizable_linears(model))
    in_blocks = {n for n, m in model.named_modules() if ptq.is_linear(m)
                 and any(m is mm for b in blocks for mm in b.modules())}
    assert set(selected) == in_blocks and selected

    originals = {n: linear_weight(m).detach().clone() for n, m in selected.items()}
    res = ptq.quantize_model(model, "int4-g16", progress=False)
    assert [r.name for r in res.layers] == list(selected) == list(res.quantized)
    for name, module in selected.items():
        # on the grid, and exactly the RTN of the original weight
        assert torch.equal(linear_weight(module), ptq.fake_quantize(originals[name], "int4-g16"))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    weight_names = {n + ".weight" for n in selected}
    assert changed == weight_names  # embeddings, norms, lm_head untouched


def test_filter_fn_replaces_the_default_selection():
    model = tiny_model("llama")
    only_mlp = list(ptq.quantizable_linears(model, lambda m, name: ".mlp." in name))
    assert {n.rsplit(".", 1)[-1] for n, _ in only_mlp} == {"gate_proj", "up_proj", "down_proj"}
    head = list(ptq.quantizable_linears(model, lambda m, name: name == "lm_head"))
    assert [n for n, _ in head] == ["lm_head"]


def test_gpt2_conv1d_is_quantized_along_its_input_dimension():
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight stored (in=64, out=256)
    w = conv.weight.detach().clone()
    ptq.quantize_model(model, "int3-g16", progress=False)
    assert torch.equal(conv.weight.t(), ptq.fake_quantize(w.t(), "int3-g16"))


def test_bad_group_size_names_the_layer_and_changes_nothing():
    model = tiny_model("llama", intermediate_size=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ptq.SpecError, match=r"in_features=96 of model\.layers\.0\.mlp\.down_proj"):
        ptq.quantize_model(model, "int4-g64", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unknown_architecture_is_a_clear_error():
    class Mystery(nn.Module):
        class config:
            model_type = "mystery"

    with pytest.raises(ptq.ArchError, match="register_arch"):
        ptq.decoder_blocks(Mystery())


def test_user_method_registers_and_is_selected_by_name():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class HalfOptions:
        factor: float = 0.5

    name = "test-halve-then-rtn"
    if name not in ptq.METHODS:
        @ptq.register_method(name, options=HalfOptions)
        def halve(W, stats, spec, options):
            return ptq.QuantResult(ptq.fake_quantize(W * options.factor, spec))

    with pytest.raises(ValueError, match="already registered"):
        ptq.register_method(name, options=HalfOptions)(lambda *a: None)
    model = tiny_model("llama")
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    ptq.quantize_model(model, "int4", method=name, progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, ptq.fake_quantize(w * 0.5, "int4"))
    with pytest.raises(KeyError, match="registered"):
        ptq.get_method("no-such-method")
    with pytest.raises(ptq.OptionsError, match="unknown option"):
        ptq.get_method(name).make_options(bogus=1)


def test_rtn_reports_its_hessian_loss():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(8, 16, generator=g), torch.randn(100, 16, generator=g)
    H = 2 / 100 * X.T @ X
    res = ptq.rtn_quantize(W, ptq.LayerStats(H=H), ptq.parse_spec("int3"))
    dW = W - res.weight
    # tr(dW H dW^T) = 2/n ||X dW^T||^2: the output error the Hessian stands for
    assert res.loss == pytest.approx(float(2 / 100 * (X @ dW.T).pow(2).sum()), rel=1e-5)

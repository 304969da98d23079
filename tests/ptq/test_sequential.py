import pytest
import torch

import ptq
from compare.models import tiny_model
from ptq.layers import linear_weight


def layer_hessians(model, calib, batch_size):
    """H = 2/n X^T X of every block linear layer, from plain forwards of the whole model."""
    acc, handles = {}, []
    for name, module in ptq.quantizable_linears(model):
        acc[name] = ptq.HessianAccumulator(linear_weight(module).shape[1])
        handles.append(module.register_forward_hook(
            lambda m, args, out, a=acc[name]: a.update(args[0])))
    with torch.no_grad():
        for batch in calib.split(batch_size):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    return {n: a.H for n, a in acc.items()}


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "gemma2", "gemma3_text", "qwen2",
                                        "cohere2"])
def test_fp_propagation_sees_the_fp_models_activations(model_type):
    # with sliding-window and full-attention layers (window shorter than the sequence), each
    # block must be replayed with its own mask and rotary embedding, or later Hessians differ
    model = tiny_model(model_type, seed=3)
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    H = layer_hessians(model, calib, batch_size=4)
    W0 = {n: linear_weight(m).detach().clone() for n, m in ptq.quantizable_linears(model)}
    res = ptq.quantize_model(model, "int3-g16", "gptq", calib=calib, propagate="fp",
                                  batch_size=4, progress=False)
    assert sorted(r.name for r in res.layers) == sorted(W0)  # rows in execution order
    for r in res.layers:
        Wq = linear_weight(dict(ptq.quantizable_linears(model))[r.name])
        assert r.proxy_loss == pytest.approx(ptq.layer_loss(W0[r.name], Wq, H[r.name]), rel=1e-4)
        assert r.n_tokens == 6 * 24


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_true_sequential_sees_the_quantized_models_activations(model_type):
    # With quantized propagation and true-sequential groups, every layer was calibrated on
    # exactly the inputs it gets in the final quantized model.
    model = tiny_model(model_type, seed=4)
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    W0 = {n: linear_weight(m).detach().clone() for n, m in ptq.quantizable_linears(model)}
    res = ptq.quantize_model(model, "int3-g16", "gptq", calib=calib, true_sequential=True,
                                  batch_size=3, progress=False)
    H = layer_hessians(model, calib, batch_size=3)
    layers = dict(ptq.quantizable_linears(model))
    for r in res.layers:
        loss = ptq.layer_loss(W0[r.name], linear_weight(layers[r.name]), H[r.name])
        assert r.proxy_loss == pytest.approx(loss, rel=1e-4), r.name
        ref = ptq.layer_loss(W0[r.name], torch.zeros_like(W0[r.name]), H[r.name])
        assert r.rel_output_error == pytest.approx(loss / ref, rel=1e-4)


def test_rtn_through_the_driver_equals_rtn_over_the_model():
    a, b = tiny_model("llama", seed=5), tiny_model("llama", seed=5)
    calib = torch.randint(0, 256, (4, 16))
    res = ptq.quantize_model(a, "int4-g32", "rtn", calib=calib, progress=False)
    ptq.quantize_model(b, "int4-g32", "rtn", progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert set(res.quantized) == {n for n, _ in ptq.quantizable_linears(a)}
    for name, qt in res.quantized.items():
        assert torch.equal(ptq.dequantize(qt), a.get_submodule(name).weight)


def test_gptq_beats_rtn_on_calibration_output_error():
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    rtn = ptq.quantize_model(tiny_model("llama", seed=6), "int3-ch", "rtn", calib=calib,
                                  propagate="fp", progress=False)
    gptq = ptq.quantize_model(tiny_model("llama", seed=6), "int3-ch", "gptq", calib=calib,
                                   propagate="fp", progress=False)
    # with FP propagation both see the same Hessians, so the per-layer losses compare directly
    for r, g in zip(rtn.layers, gptq.layers):
        assert g.proxy_loss < r.proxy_loss, r.name


def test_bad_group_size_fails_before_any_work():
    model = tiny_model("llama", intermediate_size=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ptq.SpecError, match="down_proj"):
        ptq.quantize_model(model, "int4-g64", "gptq", calib=torch.randint(0, 256, (2, 8)),
                           progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="propagate"):
        ptq.quantize_model(model, "int4", "gptq", calib=torch.randint(0, 256, (2, 8)),
                           propagate="x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_driver_on_cuda_matches_cpu_closely():
    calib = torch.randint(0, 256, (4, 32))
    cpu = tiny_model("llama", seed=7)
    gpu = tiny_model("llama", seed=7)
    ptq.quantize_model(cpu, "int4-g32", "gptq", calib=calib, progress=False)
    ptq.quantize_model(gpu, "int4-g32", "gptq", calib=calib, device="cuda", progress=False)
    assert next(gpu.parameters()).device.type == "cpu"  # blocks go back home
    ids = torch.randint(0, 256, (2, 16))
    assert torch.allclose(cpu(ids).logits, gpu(ids).logits, atol=1e-3)


def test_a_method_that_asks_for_inputs_receives_the_calibration_inputs():
    # needs_inputs: stats.X holds the inputs the layer saw; its Hessian is 2/n X^T X of them
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NoOptions:
        pass

    seen = {}
    name = "test-records-inputs"
    if name not in ptq.METHODS:
        @ptq.register_method(name, options=NoOptions, needs_inputs=True)
        def records(W, stats, spec, options):
            seen[W.shape, len(seen)] = stats
            return ptq.QuantResult(ptq.fake_quantize(W, spec))

    calib = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(3))
    res = ptq.quantize_model(tiny_model("llama", seed=8), "int4", name, calib=calib,
                             batch_size=2, progress=False)
    assert len(seen) == len(res.layers)
    for stats in seen.values():
        assert stats.X.shape[0] == 5 * 12 == stats.n_tokens
        assert torch.allclose(stats.H.float(), 2 / 60 * stats.X.T @ stats.X, rtol=1e-4, atol=1e-5)


def test_one_record_type_for_data_free_and_calibrated_runs():
    calib = torch.randint(0, 256, (4, 16))
    free = ptq.quantize_model(tiny_model("llama", seed=9), "int3-g16", "rtn", progress=False)
    cal = ptq.quantize_model(tiny_model("llama", seed=9), "int3-g16", "gptq", calib=calib,
                             progress=False)
    assert type(free.layers[0]) is type(cal.layers[0]) is ptq.LayerRecord
    assert free.layers[0].rel_output_error is None and free.calibration_tokens == 0
    assert cal.layers[0].rel_output_error > 0 and cal.calibration_tokens == 64
    assert [r.block for r in free.layers] == [r.block for r in cal.layers]
    # the data-free error is the one definition in ptq.metrics
    for r in free.layers:
        assert 0 < r.weight_rel_error < 1


def test_calibrating_method_without_data_and_empty_selection_are_refused():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ptq.QalignError, match="calib="):
        ptq.quantize_model(model, "int4", "gptq", progress=False)
    with pytest.raises(ptq.QalignError, match="no linear layer"):
        ptq.quantize_model(model, "int4", filter_fn=lambda m, n: False, progress=False)
    with pytest.raises(ptq.QalignError, match="ignored"):
        ptq.quantize_model(model, "int4", "rtn", true_sequential=True, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

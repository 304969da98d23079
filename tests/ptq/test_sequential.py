import pytest
import torch

import ptq
from compare.models import tiny_model
from ptq.apply import linear_weight


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


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_fp_propagation_sees_the_fp_models_activations(model_type):
    model = tiny_model(model_type, seed=3)
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    H = layer_hessians(model, calib, batch_size=4)
    W0 = {n: linear_weight(m).detach().clone() for n, m in ptq.quantizable_linears(model)}
    res = ptq.quantize_sequential(model, calib, "int3-g16", "gptq", propagate="fp",
                                  batch_size=4, progress=False)
    assert sorted(r.name for r in res.rows) == sorted(W0)  # rows in execution order
    for r in res.rows:
        Wq = linear_weight(dict(ptq.quantizable_linears(model))[r.name])
        assert r.proxy_loss == pytest.approx(ptq.layer_loss(W0[r.name], Wq, H[r.name]), rel=1e-4)
        assert r.n_tokens == 6 * 24


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_true_sequential_sees_the_quantized_models_activations(model_type):
    # With quantized propagation and true-sequential groups, every layer was calibrated on
    # exactly the inputs it gets in the final quantized model.
    model = tiny_model(model_type, seed=4)
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(1))
    W0 = {n: linear_weight(m).detach().clone() for n, m in ptq.quantizable_linears(model)}
    res = ptq.quantize_sequential(model, calib, "int3-g16", "gptq", true_sequential=True,
                                  batch_size=3, progress=False)
    H = layer_hessians(model, calib, batch_size=3)
    layers = dict(ptq.quantizable_linears(model))
    for r in res.rows:
        loss = ptq.layer_loss(W0[r.name], linear_weight(layers[r.name]), H[r.name])
        assert r.proxy_loss == pytest.approx(loss, rel=1e-4), r.name
        ref = ptq.layer_loss(W0[r.name], torch.zeros_like(W0[r.name]), H[r.name])
        assert r.rel_output_error == pytest.approx(loss / ref, rel=1e-4)


def test_rtn_through_the_driver_equals_rtn_over_the_model():
    a, b = tiny_model("llama", seed=5), tiny_model("llama", seed=5)
    calib = torch.randint(0, 256, (4, 16))
    res = ptq.quantize_sequential(a, calib, "int4-g32", "rtn", progress=False)
    ptq.quantize_model(b, "int4-g32", "rtn", progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert set(res.quantized) == {n for n, _ in ptq.quantizable_linears(a)}
    for name, qt in res.quantized.items():
        assert torch.equal(ptq.dequantize(qt), a.get_submodule(name).weight)


def test_gptq_beats_rtn_on_calibration_output_error():
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    rtn = ptq.quantize_sequential(tiny_model("llama", seed=6), calib, "int3-ch", "rtn",
                                  propagate="fp", progress=False)
    gptq = ptq.quantize_sequential(tiny_model("llama", seed=6), calib, "int3-ch", "gptq",
                                   propagate="fp", progress=False)
    # with FP propagation both see the same Hessians, so the per-layer losses compare directly
    for r, g in zip(rtn.rows, gptq.rows):
        assert g.proxy_loss < r.proxy_loss, r.name


def test_bad_group_size_fails_before_any_work():
    model = tiny_model("llama", intermediate_size=96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ptq.SpecError, match="down_proj"):
        ptq.quantize_sequential(model, torch.randint(0, 256, (2, 8)), "int4-g64", progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="propagate"):
        ptq.quantize_sequential(model, torch.randint(0, 256, (2, 8)), "int4", propagate="x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_driver_on_cuda_matches_cpu_closely():
    calib = torch.randint(0, 256, (4, 32))
    cpu = tiny_model("llama", seed=7)
    gpu = tiny_model("llama", seed=7)
    ptq.quantize_sequential(cpu, calib, "int4-g32", progress=False)
    ptq.quantize_sequential(gpu, calib, "int4-g32", device="cuda", progress=False)
    assert next(gpu.parameters()).device.type == "cpu"  # blocks go back home
    ids = torch.randint(0, 256, (2, 16))
    assert torch.allclose(cpu(ids).logits, gpu(ids).logits, atol=1e-3)

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


# --- compute dtype (bf16) and offloaded activations -------------------------------------------

RECORDED: list = []  # (W, stats) of every call of the recording method below, in call order


def _recording_method() -> str:
    """A method that returns RTN and appends what it receives to RECORDED."""
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NoOptions:
        pass

    name = "test-records-w-and-stats"
    if name not in ptq.METHODS:
        @ptq.register_method(name, options=NoOptions, needs_hessian=True, needs_inputs=True)
        def records(W, stats, spec, options):
            RECORDED.append((W.clone(), stats))
            return ptq.QuantResult(ptq.fake_quantize(W, spec))

    RECORDED.clear()
    return name


def test_bf16_model_hessians_are_float32_sums_of_its_bf16_activations():
    model = tiny_model("llama", seed=10, dtype=torch.bfloat16)
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(4))
    acts, handles = {}, []  # what every layer reads in the bf16 model's own forward
    for name, module in ptq.quantizable_linears(model):
        acts[name] = []
        handles.append(module.register_forward_hook(
            lambda m, args, out, a=acts[name]: a.append(args[0].detach().reshape(
                -1, args[0].shape[-1]))))
    with torch.no_grad():
        for batch in calib.split(3):
            model(input_ids=batch, use_cache=False)
    for h in handles:
        h.remove()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = _recording_method()
    res = ptq.quantize_model(model, "int4", method, calib=calib, batch_size=3, propagate="fp",
                             progress=False)
    assert len(RECORDED) == len(res.layers) == len(acts)
    for r, (W, stats) in zip(res.layers, RECORDED):
        assert W.dtype == torch.float32  # the method gets W upcast...
        assert torch.equal(W.to(torch.bfloat16), before[r.name + ".weight"])
        # ...and its result comes back rounded to bf16
        assert torch.equal(linear_weight(model.get_submodule(r.name)),
                           ptq.fake_quantize(W, "int4").to(torch.bfloat16))
        X = torch.cat(acts[r.name])
        assert X.dtype == torch.bfloat16  # ...and the blocks ran in bf16
        assert torch.equal(stats.X, X.float()), r.name  # the same activations as the model's
        n = X.shape[0]
        exact = 2.0 / n * (X.double().T @ X.double())
        scale = float(exact.abs().max())
        assert float((stats.H - exact).abs().max()) < 1e-6 * scale, r.name  # float32 rounding
        # a bf16 GEMM would be off by far more: the test can tell the difference
        bf16_gemm = 2.0 / n * (X.T @ X).double()
        assert float((bf16_gemm - exact).abs().max()) > 1e-4 * scale
    # nothing else changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()
               if k.removesuffix(".weight") not in acts)


def test_gptq_on_a_bf16_model_matches_the_fp32_run():
    from compare.evaluate import evaluate_nll, reference_logprobs

    g = torch.Generator().manual_seed(0)
    calib, windows = torch.randint(0, 256, (16, 32), generator=g), torch.randint(
        0, 256, (16, 32), generator=g)
    fp = tiny_model("llama", seed=0)
    ref = reference_logprobs(fp, windows, progress=False)
    fp32, rtn = tiny_model("llama", seed=0), tiny_model("llama", seed=0)
    bf16 = tiny_model("llama", seed=0, dtype=torch.bfloat16)
    W0 = {n: linear_weight(m).detach().float() for n, m in ptq.quantizable_linears(bf16)}
    ptq.quantize_model(fp32, "int3-g32", "gptq", calib=calib, progress=False)
    res = ptq.quantize_model(bf16, "int3-g32", "gptq", calib=calib, progress=False)
    ptq.quantize_model(rtn, "int3-g32", "rtn", progress=False)
    a, b, c = (evaluate_nll(m, windows, reference=ref, progress=False) for m in (fp32, bf16, rtn))
    assert b.perplexity == pytest.approx(a.perplexity, rel=0.03)
    # the output error (KL from the FP model): bf16 GPTQ close to fp32 GPTQ, both beat RTN
    assert b.kl == pytest.approx(a.kl, rel=0.15)
    assert a.kl < 0.8 * c.kl and b.kl < 0.8 * c.kl
    layers = dict(ptq.quantizable_linears(bf16))
    for r in res.layers:  # records and codes describe the bf16 weights the model now holds
        Wq = linear_weight(layers[r.name])
        assert Wq.dtype == torch.bfloat16
        qt = res.quantized[r.name]
        assert qt.scale.dtype == torch.float32 and qt.dtype == torch.bfloat16
        assert torch.equal(ptq.dequantize(qt), Wq)
        assert r.weight_rel_error == pytest.approx(
            ptq.weight_relative_error(W0[r.name], Wq.float()), rel=1e-6)


@pytest.mark.parametrize("propagate", ["quantized", "fp"])
def test_offloaded_activations_give_the_same_model_and_are_removed(tmp_path, propagate):
    # gemma3: every block receives its own mask and rotary embedding
    calib = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(5))
    a = tiny_model("gemma3_text", seed=11, dtype=torch.bfloat16)
    b = tiny_model("gemma3_text", seed=11, dtype=torch.bfloat16)
    seen = []

    def on_block(k, records):  # the activations are on disk while the run goes on
        seen.append(sorted(p.name for p in tmp_path.glob("qalign-activations-*/**/*.safetensors")))

    ra = ptq.quantize_model(a, "int3-g16", "gptq", calib=calib, batch_size=4,
                            propagate=propagate, progress=False)
    rb = ptq.quantize_model(b, "int3-g16", "gptq", calib=calib, batch_size=4,
                            propagate=propagate, offload_dir=tmp_path, on_block=on_block,
                            progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [r.proxy_loss for r in ra.layers] == [r.proxy_loss for r in rb.layers]
    assert [r.rel_output_error for r in ra.blocks] == [r.rel_output_error for r in rb.blocks]
    # two batches (4 + 2 samples): one file each, the spent inputs of FP propagation removed
    assert seen == [["batch000000.safetensors", "batch000001.safetensors"]] * len(seen)
    assert len(seen) == 4 and list(tmp_path.iterdir()) == []


def test_offloaded_activations_are_removed_on_error(tmp_path):
    calib = torch.randint(0, 256, (4, 16))

    def fail(k, records):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        ptq.quantize_model(tiny_model("llama", seed=12), "int4", "rtn", calib=calib,
                           batch_size=2, offload_dir=tmp_path / "scratch", on_block=fail,
                           progress=False)
    assert list((tmp_path / "scratch").iterdir()) == []


def test_disk_activations_replace_a_batch_under_its_reader(tmp_path):
    from ptq.capture import DiskActivations

    store = DiskActivations(tmp_path / "acts")
    x = torch.randn(2, 3, 4).to(torch.bfloat16)
    store.append(x)
    store.append(2 * x)
    held = store[0]
    store[0] = -x  # written in place, as the driver writes a block's outputs over its inputs
    assert torch.equal(held, x) and torch.equal(store[0], -x) and torch.equal(store[1], 2 * x)
    assert store[1].dtype == torch.bfloat16 and len(store) == 2
    with pytest.raises(IndexError):
        store[3] = x
    store.remove()
    assert len(store) == 0 and not (tmp_path / "acts").exists()

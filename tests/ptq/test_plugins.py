"""Methods from other packages (entry points), block methods, the result validator, HQQ and
block-wise reconstruction (Block-AP)."""

import textwrap
from dataclasses import dataclass

import pytest
import torch

import ptq
from compare.models import tiny_model
from ptq import registry
from ptq.arch import decoder_blocks
from ptq.capture import capture_block_inputs


@dataclass(frozen=True)
class NoOptions:
    pass


@pytest.fixture
def clean_registry(monkeypatch):
    """The registry as it is, restored after the test; plug-ins not yet loaded."""
    import qaft  # the toolkit's own block method, registered once for the session

    registry.load_plugins()
    assert registry.METHODS["block-ap"].fn is qaft.block_ap.block_ap
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))
    monkeypatch.setattr(registry, "PLUGIN_ERRORS", {})
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    return registry


def _distribution(root, name, entry_points: dict[str, str], module: str | None = None):
    """A minimal installed distribution under root: NAME-0.1.dist-info with METADATA and
    entry_points.txt, plus the module's source if given."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[qalign.methods]\n{lines}\n")
    if module is not None:
        (root / f"{name}.py").write_text(textwrap.dedent(module))


GOOD_PLUGIN = """
    from dataclasses import dataclass, field
    import ptq

    @dataclass(frozen=True)
    class HalfOptions:
        factor: float = field(default=0.5, metadata={"help": "shrink before RTN"})

    @ptq.register_method("ep-half", options=HalfOptions)
    def half(W, stats, spec, options):
        return ptq.QuantResult(ptq.fake_quantize(W * options.factor, spec))
"""


def test_entry_point_plugins_load_lazily_and_a_broken_one_is_reported(tmp_path, monkeypatch,
                                                                     clean_registry, capsys):
    _distribution(tmp_path, "goodplug", {"ep-half": "goodplug"}, GOOD_PLUGIN)
    _distribution(tmp_path, "badplug", {"ep-broken": "badplug"}, "raise RuntimeError('boom')\n")
    _distribution(tmp_path, "clashplug", {"ep-clash": "clashplug"}, """
        import ptq
        from dataclasses import dataclass
        @dataclass(frozen=True)
        class O:
            pass
        ptq.register_method("rtn", options=O)(lambda *a: None)
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "ep-half" not in registry.METHODS  # nothing imported before the first lookup
    with pytest.warns(UserWarning, match="ep-broken"):
        method = registry.get_method("ep-half")
    assert method.source == "goodplug" and method.kind == "layer" and not method.needs_data
    assert set(registry.PLUGIN_ERRORS) == {"ep-broken", "ep-clash"}
    assert "RuntimeError: boom" in registry.PLUGIN_ERRORS["ep-broken"]
    assert "already registered" in registry.PLUGIN_ERRORS["ep-clash"]
    assert registry.METHODS["rtn"].source == "qalign"  # the clash did not replace the built-in
    with pytest.raises(ptq.UnknownMethodError, match="failed to load: badplug"):
        registry.get_method("ep-broken")
    # the plug-in works like a built-in: quantize_model, then the CLI with its option flag
    model = tiny_model("llama", seed=1)
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    ptq.quantize_model(model, "int4", "ep-half", {"factor": 0.25}, progress=False)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight,
                       ptq.fake_quantize(w * 0.25, "int4"))
    from recipes.cli import build_parser, cmd_methods
    from recipes.shared.quantization import method_options

    args = build_parser().parse_args(["quantize", "--spec", "int4", "--method", "ep-half",
                                      "--ep-half-factor", "0.3", "--out", str(tmp_path / "q")])
    assert method_options(args, ["ep-half"])["ep-half"].factor == 0.3
    cmd_methods(build_parser().parse_args(["methods"]))
    out = capsys.readouterr().out
    assert "ep-half" in out and "goodplug" in out and "factor=0.5" in out
    assert "ep-broken" in out and "FAILED to load" in out and "boom" in out
    assert "block-ap" in out and "block" in out  # the toolkit's own block method


def test_plugin_file_from_the_command_line(tmp_path, clean_registry, capsys):
    from recipes.cli import main

    main(["--plugin", "recipes/examples/diag_clip.py", "methods"])
    out = capsys.readouterr().out
    assert "diag-clip" in out and "max_shrink=0.3" in out
    with pytest.raises(SystemExit):
        main(["--plugin", str(tmp_path / "missing.py"), "methods"])
    assert "no such file" in capsys.readouterr().err


# --- the validator ------------------------------------------------------------------------------

def _register_returning(name, make):
    """A data-free method whose result is make(W, spec)."""
    if name not in ptq.METHODS:
        ptq.register_method(name, options=NoOptions)(lambda W, stats, spec, o: make(W, spec))
    return name


def _codes(W, spec):
    return ptq.quantize(W, spec)


BAD_RESULTS = {
    "off-grid": (lambda W, s: ptq.QuantResult(W * 0.9), "not on int3-ch's grid"),
    "nan": (lambda W, s: ptq.QuantResult(W.clone().fill_(float("nan"))), "NaN/Inf"),
    "shape": (lambda W, s: ptq.QuantResult(W[:, :-1]), "shape"),
    "dtype": (lambda W, s: ptq.QuantResult(W.to(torch.int32)), "float tensor"),
    "not-a-result": (lambda W, s: W, "not a QuantResult"),
    "codes-range": (lambda W, s: ptq.QuantResult(
        ptq.fake_quantize(W, s), ptq.QuantizedTensor(torch.full(W.shape, 9, dtype=torch.uint8),
                                                     _codes(W, s).scale, _codes(W, s).zero, s)),
        "outside int3-ch's 0..7"),
    "codes-mismatch": (lambda W, s: ptq.QuantResult(ptq.fake_quantize(W * 0.5, s), _codes(W, s)),
                       "dequantize to a weight"),
    "scale-negative": (lambda W, s: ptq.QuantResult(
        ptq.fake_quantize(W, s), ptq.QuantizedTensor(_codes(W, s).codes, -_codes(W, s).scale,
                                                     _codes(W, s).zero, s)), "finite and > 0"),
    "other-spec": (lambda W, s: ptq.QuantResult(ptq.fake_quantize(W, "int4"), _codes(W, "int4")),
                   "codes on int4-ch"),
}


@pytest.mark.parametrize("case", sorted(BAD_RESULTS))
def test_validator_refuses_a_bad_result_naming_method_and_layer(case):
    make, message = BAD_RESULTS[case]
    name = _register_returning(f"test-bad-{case}", make)
    model = tiny_model("llama", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ptq.MethodResultError, match=message) as err:
        ptq.quantize_model(model, "int3", name, progress=False)
    assert name in str(err.value) and "model.layers.0.self_attn.q_proj" in str(err.value)
    # the first layer's result was refused before anything was written
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_validator_accepts_a_weight_without_codes_when_it_is_on_the_grid():
    name = _register_returning("test-good-weight-only", lambda W, s: ptq.QuantResult(
        ptq.fake_quantize(W, s, clip=ptq.ClipSearch())))
    model = tiny_model("llama", seed=2)
    res = ptq.quantize_model(model, "int3-g16", name, progress=False)
    for layer_name, qt in res.quantized.items():  # codes recovered for every layer
        w = model.get_submodule(layer_name).weight
        assert torch.allclose(qt.dequantize(), w, rtol=0, atol=1e-6)


# --- block methods ----------------------------------------------------------------------------

SEEN: list = []


def _recording_block_method() -> str:
    """A block method that records its BlockData and returns RTN for each layer."""
    name = "test-block-rtn"
    if name not in ptq.METHODS:
        @ptq.register_block_method(name, options=NoOptions)
        def block_rtn(block, data, spec, options):
            SEEN.append((block, data))
            rtn = ptq.get_method("rtn")
            return {n: rtn.fn(ptq.linear_weight(m).detach(), None, spec, rtn.options())
                    for n, m in data.layers.items()}
    SEEN.clear()
    return name


def test_block_method_receives_its_block_inputs_and_fp_targets():
    name = _recording_block_method()
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(5))
    fp = tiny_model("llama", seed=3)
    captured = capture_block_inputs(fp, calib, 2, "cpu")
    model = tiny_model("llama", seed=3)
    res = ptq.quantize_model(model, "int4-g16", name, calib=calib, batch_size=2,
                             propagate="fp", progress=False)
    assert [d.index for _, d in SEEN] == list(range(len(decoder_blocks(model))))
    hidden = list(captured.hidden)
    with torch.no_grad():
        for k, (block, data) in enumerate(SEEN):
            assert data.prefix == f"model.layers.{k}" and len(data.layers) == 7
            assert data.relative(f"model.layers.{k}.mlp.up_proj") == "mlp.up_proj"
            fp_block = decoder_blocks(fp)[k]
            out = []
            for i, x in enumerate(hidden):  # FP inputs (propagate="fp") and FP targets
                assert torch.equal(data.inputs[i], x)
                y = fp_block(x, **captured.kwargs(k)[i])
                y = y[0] if isinstance(y, tuple) else y
                assert torch.allclose(data.targets[i], y, atol=1e-6)
                out.append(y)
            hidden = out
            stats = data.stats[f"model.layers.{k}.self_attn.q_proj"]
            assert stats.n_tokens == 64 and stats.H.shape == (64, 64)
    # RTN through the block interface is RTN through the layer interface, with the same report
    layer = ptq.quantize_model(tiny_model("llama", seed=3), "int4-g16", "rtn", calib=calib,
                               batch_size=2, propagate="fp", progress=False)
    assert [r.name for r in res.layers] == [r.name for r in layer.layers]
    for a, b in zip(res.layers, layer.layers):
        assert a.method == name and a.weight_rel_error == b.weight_rel_error
        assert a.rel_output_error == pytest.approx(b.rel_output_error, rel=1e-6)
    assert [b.rel_output_error for b in res.blocks] == pytest.approx(
        [b.rel_output_error for b in layer.blocks], rel=1e-6)


def test_block_error_record_is_the_direct_computation():
    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(6))
    fp = tiny_model("llama", seed=4)
    captured = capture_block_inputs(fp, calib, 4, "cpu")
    model = tiny_model("llama", seed=4)
    res = ptq.quantize_model(model, "int3-g16", "gptq", calib=calib, batch_size=4,
                             progress=False)
    x, kw = captured.hidden[0], captured.kwargs(0)[0]
    with torch.no_grad():
        y = decoder_blocks(fp)[0](x, **kw)
        y_hat = decoder_blocks(model)[0](x, **kw)
    y, y_hat = (t[0] if isinstance(t, tuple) else t for t in (y, y_hat))
    direct = float((y_hat - y).pow(2).sum() / (y - x).pow(2).sum())
    assert res.blocks[0].rel_output_error == pytest.approx(direct, rel=1e-4)
    assert res.blocks[0].n_tokens == 64 and len(res.blocks) == 2
    # and the probe's block-level loss (held-out FP inputs) agrees on the same inputs
    from compare.probes import block_errors, block_reference

    ref = block_reference(fp, calib, batch_size=4)
    assert block_errors(model, ref)[0] == pytest.approx(direct, rel=1e-4)
    assert block_errors(fp, ref) == [0.0, 0.0]


def test_block_method_may_only_change_its_layers_weights():
    def register(name, fn):
        if name not in ptq.METHODS:
            ptq.register_block_method(name, options=NoOptions)(fn)
        return name

    def rtn_all(data, spec):
        rtn = ptq.get_method("rtn")
        return {n: rtn.fn(ptq.linear_weight(m).detach(), None, spec, rtn.options())
                for n, m in data.layers.items()}

    def touches_norm(block, data, spec, options):
        block.input_layernorm.weight.data.mul_(2)
        return rtn_all(data, spec)

    def swaps(block, data, spec, options):
        block.mlp.up_proj = torch.nn.Linear(block.mlp.up_proj.in_features,
                                            block.mlp.up_proj.out_features, bias=False)
        return rtn_all(data, spec)

    def misses(block, data, spec, options):
        out = rtn_all(data, spec)
        out.pop(next(iter(out)))
        return out

    calib = torch.randint(0, 256, (2, 16))
    for fn, message in ((touches_norm, "input_layernorm"), (swaps, "swapped"),
                        (misses, "exactly the block's layers")):
        name = register(f"test-block-{fn.__name__}", fn)
        with pytest.raises(ptq.MethodResultError, match=message):
            ptq.quantize_model(tiny_model("llama", seed=5), "int4", name, calib=calib,
                               progress=False)


def test_block_method_needs_calibration_data():
    name = _recording_block_method()
    assert ptq.get_method(name).needs_data and ptq.get_method(name).kind == "block"
    with pytest.raises(ptq.QalignError, match="calib="):
        ptq.quantize_model(tiny_model("llama"), "int4", name, progress=False)
    with pytest.raises(ptq.QalignError, match="true_sequential"):
        ptq.quantize_model(tiny_model("llama"), "int4", name, calib=torch.randint(0, 256, (2, 8)),
                           true_sequential=True, progress=False)


# --- HQQ and Block-AP ------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["int2-g16", "int3-g16", "int4-ch", "int3-sym-g16", "e2m1-g16"])
def test_hqq_beats_rtn_weight_error(spec):
    rtn = ptq.quantize_model(tiny_model("llama", seed=6), spec, "rtn", progress=False)
    hqq = ptq.quantize_model(tiny_model("llama", seed=6), spec, "hqq", progress=False)
    for r, h in zip(rtn.layers, hqq.layers):
        assert h.weight_rel_error <= r.weight_rel_error  # each block keeps its best iterate
    total = sum(h.weight_rel_error for h in hqq.layers) / sum(r.weight_rel_error
                                                              for r in rtn.layers)
    assert total < 0.97, total
    # heavy-tailed weights, like trained ones: a clear margin
    W = torch.distributions.StudentT(4).sample((64, 128)) * 0.02
    e_rtn = ptq.weight_relative_error(W, ptq.fake_quantize(W, spec))
    e_hqq = ptq.weight_relative_error(W, ptq.hqq.hqq_quantize(W, None, ptq.parse_spec(spec)).weight)
    assert e_hqq < 0.95 * e_rtn


def test_hqq_options_are_checked():
    with pytest.raises(ptq.OptionsError, match="lp_norm"):
        ptq.hqq.HQQOptions(lp_norm=1.5)
    with pytest.raises(ptq.OptionsError, match="iters"):
        ptq.hqq.HQQOptions(iters=-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_block_ap_lowers_block_output_error_below_gptq(arch):
    import qaft  # registers block-ap

    assert ptq.get_method("block-ap").fn is qaft.block_ap.block_ap
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(7))
    gptq = ptq.quantize_model(tiny_model(arch, seed=8), "int3-g16", "gptq", calib=calib,
                              batch_size=4, progress=False)
    ap = ptq.quantize_model(tiny_model(arch, seed=8), "int3-g16", "block-ap", calib=calib,
                            batch_size=4, progress=False)
    # block 0 sees the same inputs in both runs: its output error is directly comparable
    assert ap.blocks[0].rel_output_error < gptq.blocks[0].rel_output_error
    assert [r.name for r in ap.layers] == [r.name for r in gptq.layers]
    assert all(r.method == "block-ap" and r.rel_output_error > 0 for r in ap.layers)
    assert set(ap.quantized) == {r.name for r in ap.layers}


def test_block_ap_is_deterministic_and_zero_epochs_is_its_init():
    import qaft

    calib = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(9))
    runs = [ptq.quantize_model(tiny_model("llama", seed=9), "int3-g16", "block-ap",
                               qaft.BlockAPOptions(epochs=2), calib=calib, progress=False)
            for _ in range(2)]
    for name, qt in runs[0].quantized.items():
        assert torch.equal(qt.codes, runs[1].quantized[name].codes)
    init = ptq.quantize_model(tiny_model("llama", seed=9), "int3-g16", "block-ap",
                              qaft.BlockAPOptions(epochs=0, init="rtn"), calib=calib, progress=False)
    rtn = ptq.quantize_model(tiny_model("llama", seed=9), "int3-g16", "rtn", progress=False)
    for name, qt in init.quantized.items():
        assert torch.allclose(qt.dequantize(), rtn.quantized[name].dequantize(), atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "gpt2"])
def test_block_ap_micro_batches_compute_what_the_whole_batch_does(arch):
    from qaft.block_ap import slice_batch

    model = tiny_model(arch, seed=10)
    calib = torch.randint(0, 256, (4, 12), generator=torch.Generator().manual_seed(10))
    captured = capture_block_inputs(model, calib, 4, "cpu")
    x = captured.hidden[0]
    with torch.no_grad():
        for k, block in enumerate(decoder_blocks(model)):
            kw = captured.kwargs(k)[0]
            whole = block(x, **kw)
            whole = whole[0] if isinstance(whole, tuple) else whole
            for s, e in ((0, 2), (2, 3), (3, 4)):
                part = block(x[s:e], **slice_batch(kw, s, e, 4))
                part = part[0] if isinstance(part, tuple) else part
                assert torch.allclose(part, whole[s:e], atol=1e-5), (k, s)
            x = whole


def test_learned_scales_do_not_change_the_solution_they_start_from():
    from qaft import FakeQuantLinear

    lin = torch.nn.Linear(32, 8, bias=False)
    qt = ptq.quantize(lin.weight.detach(), "int3-g16")
    before = qt.scale.clone()
    fq = FakeQuantLinear(lin, "int3-g16", scale_mode="learned", init=qt)
    with torch.no_grad():
        fq.scale.mul_(2)
    assert torch.equal(qt.scale, before)

"""qaft.fused: the one-pass kernels give the eager STE's W_hat and dL/dW bit for bit, and its
scale and zero-point gradients to float32 rounding, on every integer grid and STE variant."""

import pytest
import torch
from torch import nn

import ptq
from ptq.formats import compute_qparams, parse_spec
from qaft import fused
from qaft.fake_quant import FakeQuantLinear

pytestmark = pytest.mark.skipif(not fused.available(), reason="needs numba")

SPECS = ["int2-g16", "int3-g64", "int4-sym-g32", "int3-ch", "int4-sym-ch", "int8-t"]


def _weight(rows=24, cols=128, seed=0):
    """Gaussian weights with some values exactly on rounding ties and far outside the range."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[0, :8] = torch.tensor([0.5, 1.5, -2.5, 3.5, -0.5, 40.0, -40.0, 0.0]) * 0.25
    return w


@pytest.mark.parametrize("spec", SPECS)
def test_forward_equals_the_ptq_round_trip_bit_for_bit(spec):
    w = _weight()
    p = compute_qparams(w, spec)
    s = parse_spec(spec)
    assert fused.usable(w, s)
    got = fused.fake_quantize(w, p, s)
    want = ptq.formats.fake_quantize_with(w, p, s)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit())
    low = fused.fake_quantize(w, p, s, torch.bfloat16)  # rounded as a cast rounds
    assert low.dtype == torch.bfloat16
    assert torch.equal(low.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))


def test_bfloat16_rounding_matches_torch_on_ties_extremes_and_nan():
    """W_hat values are q * s; these scales put products on bfloat16 ties, near the largest
    float32 and at NaN, where a rounding written by hand goes wrong first."""
    s = parse_spec("int8-sym-ch")
    w = torch.tensor([[1.0, -3.0, 127.0, -128.0, 5.0, 0.0]]).repeat(4, 1)
    scales = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 2.6e36, float("nan")])
    p = ptq.formats.QParams(scales[:, None])
    w = w * scales[:, None]
    want = ptq.formats.fake_quantize_with(w, p, s).to(torch.bfloat16)
    got = fused.fake_quantize(w, p, s, torch.bfloat16)
    nan = want.isnan()
    assert nan[3].all() and torch.equal(got.isnan(), nan)  # NaN payloads may differ
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def _step(spec, scale_mode, clipped, learn_zero, eager, monkeypatch, autocast=False):
    """One forward/backward of a FakeQuantLinear (optionally under bfloat16 autocast, where
    the fused path makes W_hat in bfloat16 and the eager one lets autocast cast it); its output
    and its input and parameter gradients."""
    if eager:
        monkeypatch.setattr(fused, "usable", lambda *a: False)
    torch.manual_seed(0)
    lin = nn.Linear(128, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(_weight())
    fq = FakeQuantLinear(lin, spec, scale_mode=scale_mode, clipped_ste=clipped,
                         learn_zero=learn_zero)
    if scale_mode != "dynamic":  # move the range so that some weights fall outside it
        with torch.no_grad():
            fq.scale.mul_(0.7)
    x = torch.randn(16, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fq(x)
    (y * torch.randn_like(y)).sum().backward()
    grads = {"y": y.detach(), "x": x.grad, "w": lin.weight.grad}
    if scale_mode == "learned":
        grads["scale"] = fq.scale.grad
    if learn_zero:
        grads["zero"] = fq.zero.grad
    monkeypatch.undo()
    return grads


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("spec,scale_mode,clipped,learn_zero", [
    ("int3-g64", "dynamic", True, False), ("int2-g16", "fixed", True, False),
    ("int4-sym-g32", "learned", True, False), ("int3-g64", "learned", False, False),
    ("int2-g16", "learned", True, True), ("int3-ch", "learned", True, True),
    ("int4-sym-ch", "fixed", False, False)])
def test_fused_ste_gradients_equal_the_eager_ones(spec, scale_mode, clipped, learn_zero,
                                                  autocast, monkeypatch):
    got = _step(spec, scale_mode, clipped, learn_zero, False, monkeypatch, autocast)
    want = _step(spec, scale_mode, clipped, learn_zero, True, monkeypatch, autocast)
    for k in ("y", "x", "w"):
        assert torch.equal(got[k], want[k]), k
    if clipped:
        assert (got["w"] == 0).any()  # the clipped range was exercised
    for k in ("scale", "zero"):
        if k in want:
            assert want[k].abs().max() > 0
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


def test_other_dtypes_layouts_and_grids_keep_the_eager_path():
    w = _weight()
    assert not fused.usable(w.bfloat16(), parse_spec("int3-g64"))
    assert not fused.usable(w.T, parse_spec("int3-g64"))  # GPT-2's Conv1D weight is transposed
    assert not fused.usable(w, parse_spec("e2m1-g16"))


def test_the_plain_ste_gives_each_weight_a_gradient_of_its_own_dtype():
    """A bfloat16 model's weights get bfloat16 gradients, float32 weights float32 ones, also
    when the fused path hands a float32 weight's W_hat over in bfloat16 under autocast."""
    for dtype, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        lin = nn.Linear(64, 8).to(dtype)
        fq = FakeQuantLinear(lin, "int3-g16", clipped_ste=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fq(torch.randn(4, 64).to(dtype))
        y.float().sum().backward()
        assert lin.weight.grad.dtype == dtype and lin.weight.grad.abs().sum() > 0


def test_the_kernels_use_as_many_threads_as_torch():
    import numba

    w = _weight()
    p = compute_qparams(w, "int3-g64")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fused.fake_quantize(w, p, parse_spec("int3-g64"))
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    fused.fake_quantize(w, p, parse_spec("int3-g64"))
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)


def test_the_kernels_compile_without_a_writable_cache_folder():
    """Where numba finds no place for its on-disk cache (a read-only install, no writable home),
    importing the kernels must not fail; they compile in the process instead."""
    import subprocess
    import sys

    probe = """
import numba.core.caching as c
for cls in c.CacheImpl._locator_classes:  # every cache location refuses
    cls.from_function = classmethod(lambda cls, f, p: None)
import torch
from ptq.formats import compute_qparams, fake_quantize_with, parse_spec
from qaft import fused
w, s = torch.randn(8, 64), parse_spec("int3-g64")
p = compute_qparams(w, s)
print(torch.equal(fused.fake_quantize(w, p, s), fake_quantize_with(w, p, s)))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "True"

import pytest
import torch

from compare import dtypes
from compare.dtypes import cpu_bf16_features, describe_dtype_choice, resolve_dtype
from ptq.errors import OptionsError

CPUINFO = """processor\t: {i}
vendor_id\t: GenuineIntel
model name\t: Some CPU
flags\t\t: fpu vme sse sse2 avx avx2 avx512f {extra}
bugs\t\t: spectre_v1
"""


def fake_cpuinfo(tmp_path, extra: str):
    path = tmp_path / "cpuinfo"
    path.write_text("\n".join(CPUINFO.format(i=i, extra=extra) for i in range(2)))
    return path


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    assert cpu_bf16_features(fake_cpuinfo(tmp_path, "avx512_bf16 amx_tile amx_bf16")) == (
        "amx_bf16", "avx512_bf16")
    assert cpu_bf16_features(fake_cpuinfo(tmp_path, "avx512_vnni")) == ()
    # a flag that only contains the name is not the flag
    assert cpu_bf16_features(fake_cpuinfo(tmp_path, "xavx512_bf16x")) == ()
    assert cpu_bf16_features(tmp_path / "missing") == ()  # not Linux: unknown, so none


@pytest.mark.parametrize("units, expected", [(("amx_bf16",), torch.bfloat16),
                                             (("avx512_bf16",), torch.bfloat16),
                                             ((), torch.float32)])
def test_auto_on_cpu_picks_bf16_only_with_bf16_units_and_never_fp16(monkeypatch, units, expected):
    monkeypatch.setattr(dtypes, "cpu_bf16_features", lambda: units)
    assert resolve_dtype("auto", "cpu") is expected
    assert resolve_dtype("AUTO", torch.device("cpu")) is expected
    reason = describe_dtype_choice("auto", "cpu")
    assert reason.startswith(str(expected).removeprefix("torch."))
    assert all(u in reason for u in units)


@pytest.mark.parametrize("name", ["float16", "fp16"])
def test_fp16_is_refused_on_cpu_with_bf16_as_the_fix(monkeypatch, name):
    for units in [(), ("avx512_bf16",)]:
        monkeypatch.setattr(dtypes, "cpu_bf16_features", lambda units=units: units)
        with pytest.raises(OptionsError, match=r"no float16 units.*use bfloat16 \(bf16\)"):
            resolve_dtype(name, "cpu")


def test_names_and_aliases(monkeypatch):
    monkeypatch.setattr(dtypes, "cpu_bf16_features", lambda: ())
    assert resolve_dtype("float32") is resolve_dtype("fp32") is torch.float32
    # asked-for bf16 runs on a CPU without bf16 units (emulated), and the log says it is slow
    assert resolve_dtype("bfloat16") is resolve_dtype("bf16") is torch.bfloat16
    assert "emulated" in describe_dtype_choice("bf16", "cpu")
    with pytest.raises(OptionsError, match="'half' is not known; use one of auto"):
        resolve_dtype("half")


def test_cuda_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    native = {"value": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native["value"] or including_emulation
                        and native.get("emulated", False))
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("fp16", "cuda:0") is torch.float16  # allowed on a GPU, never by auto
    native["value"] = False  # e.g. a V100 / T4: no bf16 at all
    assert resolve_dtype("auto", "cuda") is torch.float32
    assert "Ampere" in describe_dtype_choice("auto", "cuda")
    with pytest.raises(OptionsError, match="no native bfloat16.*use float32"):
        resolve_dtype("bf16", "cuda")
    native["emulated"] = True  # runs, emulated: allowed when asked for, not picked by auto
    assert resolve_dtype("bf16", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cuda") is torch.float32


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionsError, match="sees no CUDA device"):
        resolve_dtype("auto", "cuda")

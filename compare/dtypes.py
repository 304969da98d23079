"""The compute dtype of a run: what `--dtype auto|float32|bfloat16` means on a given device.

bfloat16 halves the model's and the activations' memory, and on hardware with bf16 matrix units
its GEMMs run several times faster than float32's (a 2048^3 matmul on a 2-core AVX512-BF16 CPU:
228 vs 90 GFLOP/s). float16 is as small, but CPUs have no float16 units (two orders of magnitude
slower than float32 there) and its range (max 65504) overflows on LLM activations, so it is never
chosen automatically and is refused on the CPU.

`auto` picks bfloat16 where the hardware runs it fast:
  - a CUDA GPU that supports it natively (`torch.cuda.is_bf16_supported(including_emulation=False)`,
    Ampere and later);
  - a CPU with AMX (`amx_bf16`) or AVX512-BF16 (`avx512_bf16`) units, read from the flags of
    /proc/cpuinfo (Linux; elsewhere the flags are unknown and float32 is kept);
and float32 everywhere else. Quantization math does not follow this dtype: Hessians, the GPTQ solve
and scales stay float32/float64 (`ptq.sequential`); only the model's weights and the forward
passes use it.

    dtype = resolve_dtype("auto", "cpu")           # torch.bfloat16 on this machine
    log(describe_dtype_choice("auto", "cpu"))      # "bfloat16: CPU has avx512_bf16 units"
"""

from __future__ import annotations

from pathlib import Path

import torch

from ptq.errors import OptionsError

__all__ = ["DTYPE_NAMES", "cpu_bf16_features", "resolve_dtype", "describe_dtype_choice"]

DTYPE_NAMES: dict[str, torch.dtype | None] = {
    "auto": None,
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
# /proc/cpuinfo flags of x86 units that run bfloat16 matmuls natively (oneDNN uses them)
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_features(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, ...]:
    """The bf16 matrix-unit flags this CPU reports (a subset of amx_bf16, avx512_bf16); empty
    when it has none or the flags cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return tuple(f for f in _CPU_BF16_FLAGS if f in flags)


def _cuda_bf16() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def _choose(name: str, device) -> tuple[torch.dtype, str]:
    """(dtype, reason) for a dtype name on a device (module docstring)."""
    key = str(name).lower()
    if key not in DTYPE_NAMES:
        raise OptionsError(f"dtype {name!r} is not known; use one of auto, float32 (fp32), "
                           "bfloat16 (bf16), or float16 (fp16, CUDA only)")
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise OptionsError(f"device {str(device)!r} is not a torch device ({e}); use cpu or "
                           "cuda") from None
    wanted = DTYPE_NAMES[key]
    if kind == "cuda" and not torch.cuda.is_available():
        raise OptionsError(f"device {str(device)!r} asked for, but torch sees no CUDA "
                           "device; run on the CPU (--device cpu) or install a CUDA build")
    if wanted is torch.float32:
        return torch.float32, "float32: asked for"
    if wanted is torch.float16:
        if kind == "cpu":
            raise OptionsError(f"dtype {name!r} on the CPU: CPUs have no float16 units (matmuls "
                               "run ~100x slower than float32); use bfloat16 (bf16) for half "
                               "the memory, or float32")
        return torch.float16, f"float16: asked for, on {kind}"
    if kind == "cuda":
        bf16 = _cuda_bf16()
        why = "the GPU runs bfloat16 natively" if bf16 else \
            "the GPU has no native bfloat16 (needs compute capability 8.0, Ampere, or later)"
    elif kind == "cpu":
        units = cpu_bf16_features()
        bf16 = bool(units)
        why = (f"the CPU has {' and '.join(units)} units" if bf16 else
               "the CPU reports neither amx_bf16 nor avx512_bf16 (bfloat16 would be emulated, "
               "slower than float32)")
    else:
        bf16, why = False, f"no bfloat16 speed check for {kind} devices"
    if wanted is None:  # auto
        return (torch.bfloat16, f"bfloat16: {why}") if bf16 else (torch.float32, f"float32: {why}")
    # bfloat16 asked for: refused only where it cannot run at all (a CUDA GPU without it);
    # a CPU without bf16 units runs it correctly, only slower, so the reason says so
    if kind == "cuda" and not bf16 and not torch.cuda.is_bf16_supported(including_emulation=True):
        raise OptionsError(f"dtype {name!r}: {why}; use float32, or float16 on this GPU")
    return torch.bfloat16, f"bfloat16: asked for; {why}"


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype for `name` (auto, float32/fp32, bfloat16/bf16, float16/fp16) on `device`.
    auto never gives float16; float16 on the CPU, an unknown name, or bf16 on a GPU that cannot
    run it raise OptionsError naming the fix."""
    return _choose(name, device)[0]


def describe_dtype_choice(name: str, device: str | torch.device = "cpu") -> str:
    """One line for the run's log: the dtype `resolve_dtype(name, device)` gives, and why."""
    return _choose(name, device)[1]

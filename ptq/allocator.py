"""glibc's malloc, set up for tensor work, and freed memory handed back to the OS.

PyTorch's CPU tensors come from malloc. By default glibc serves each request above a threshold
(128 KiB at first, adapting up to 32 MiB) with a mapping of its own, unmapped again on free, and
gives the top of its heap back to the OS as soon as 128 KiB lie free there. A forward pass frees
its activations and the next one asks for the same sizes again, so it gets fresh pages, and the
first touch of each page is a page fault; in a virtual machine a fault costs several
microseconds. `tune_allocator()` asks glibc to serve every size from its heap (M_MMAP_MAX = 0)
and to keep up to 2 GiB free at the top of it (M_TRIM_THRESHOLD), so freed activations are
reused without new faults. It changes no number, only where the memory comes from. On the
2-core development machine (a VM) a training step of SmolLM2-135M ran 16-21% faster tuned, FP
and fake-quantized alike (`python benchmarks/qaft_step.py [--default-allocator]`); GPTQ's time
did not change measurably (benchmarks/README.md).

The price is memory held between phases: the heap keeps what a step freed instead of returning
it. The block-by-block driver hands it back after each block (`release_freed_memory`, which
trims the heap whatever the threshold), so its peak is unchanged.

The `qalign` command line and the benchmarks call `tune_allocator()` first; a program that
imports the toolkit chooses for itself (no import changes process-wide settings). It does
nothing where the C library is not glibc, when QALIGN_MALLOC=default, or when the user set
glibc's own MALLOC_* variables or GLIBC_TUNABLES (theirs win).
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["ALLOCATOR_ENV", "tune_allocator", "release_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_KEEP_FREE = 2**31 - 1  # bytes free at the heap top before glibc trims it (mallopt takes an int)

# the same settings as environment variables, for a process that cannot call tune_allocator
# (the benchmarks give them to llm-compressor's process to compare like with like)
ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_KEEP_FREE)}


def _glibc():
    """The glibc this process runs on, or None (another OS, or a C library such as musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


# glibc's own ways of setting what tune_allocator sets
_USER_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                  "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _user_chose() -> bool:
    return (os.environ.get("QALIGN_MALLOC") == "default"
            or any(k in os.environ for k in _USER_SETTINGS))


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap for reuse (module docstring). True when the settings
    took effect; False without glibc, or where the user chose the allocator's settings."""
    if _LIBC is None or _user_chose():
        return False
    return bool(_LIBC.mallopt(_M_MMAP_MAX, 0)) and bool(_LIBC.mallopt(_M_TRIM_THRESHOLD,
                                                                       _KEEP_FREE))


def release_freed_memory() -> None:
    """Return the memory freed so far to the OS (glibc's malloc_trim). glibc keeps freed heap
    blocks for reuse, and the block driver's pattern (Hessians, float64 factors, per-layer
    copies, activation batches) leaves the process far above what it holds: SmolLM2-135M,
    128 x 512, bfloat16, was at 1.25 GB after quantizing against 0.71 GB after one malloc_trim
    (benchmarks/README.md). No effect on any number; a no-op without glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

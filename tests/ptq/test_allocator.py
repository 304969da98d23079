"""ptq.allocator: after tune_allocator, glibc serves a large tensor from its heap instead of a
mapping of its own (so a freed one is reused without new page faults); the user's own choice
wins. Each case runs in a fresh interpreter, whose malloc state is glibc's default."""

import ctypes
import os
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, torch
from ptq.allocator import tune_allocator
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks",
                                                "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
tuned = tune_allocator()
before = libc.mallinfo2().hblkhd
x = torch.ones(64 << 20, dtype=torch.uint8)
print(tuned, libc.mallinfo2().hblkhd - before)
"""


def _has_mallinfo2() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc 2.33+ (mallinfo2)")


def _probe(**env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items()
             if k != "QALIGN_MALLOC" and not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuned_allocator_serves_large_tensors_from_the_heap():
    tuned, mapped = _probe()
    assert tuned and mapped == 0


@pytest.mark.parametrize("env", [{"QALIGN_MALLOC": "default"},
                                 {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_the_users_choice_keeps_glibcs_settings(env):
    tuned, mapped = _probe(**env)
    assert not tuned and mapped >= 64 << 20  # glibc maps a 64 MiB request of its own

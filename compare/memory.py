"""Peak resident memory of this process over a stretch of code, sampled in a thread.

`ru_maxrss` only ever grows, so it cannot say what one step of a longer run needed; this samples
/proc/self/statm every `interval` seconds (Linux) and falls back to ru_maxrss elsewhere.
"""

from __future__ import annotations

import os
import resource
import sys
import threading

__all__ = ["current_rss", "PeakRSS"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        scale = 1 if sys.platform == "darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakRSS:
    """with PeakRSS() as m: ...; m.peak is the largest sampled RSS in bytes."""

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())
        return False

"""Peak resident memory of this process, sampled from ``/proc/self/status`` by a background thread.

Two parts, in bytes above their levels when sampling started: private memory (``RssAnon``: tensors,
heap; what each process pays) and file-backed pages (``RssFile``: mmap'd files and libraries, shared
by every process mapping the same file). Linux only; the benchmarks that use it run in a fresh
process per measurement so peaks do not mix.
"""
from __future__ import annotations

import threading
import time


def _resident() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split(":")
                out["anon" if key == "RssAnon" else "file"] = int(value.split()[0]) * 1024
    return out


class PeakRss(threading.Thread):
    """Start sampling on construction; :meth:`stop` returns ``{"anon": bytes, "file": bytes}``, the peaks
    above the start (``interval``: seconds between samples)."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval = interval
        self.base = _resident()
        self.peak = dict(self.base)
        self.running = True
        self.start()

    def _sample(self) -> None:
        for key, value in _resident().items():
            self.peak[key] = max(self.peak[key], value)

    def run(self) -> None:
        while self.running:
            self._sample()
            time.sleep(self.interval)

    def stop(self) -> dict[str, int]:
        self.running = False
        self.join()
        self._sample()
        return {key: self.peak[key] - self.base[key] for key in self.base}

"""Resident memory of a server process tree, read from /proc (Linux only).

A server may fork workers, so the figure is summed over the tree.  Two views:
VmRSS sampled every few ms (peak of the *sum*, what the machine actually had to
hold) and VmHWM (kernel-tracked per-process peak, catches spikes between
samples; reset with clear_refs so each request gets its own peak).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return kids


def tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def rss_kib(pids: list[int]) -> int:
    return sum(_status_kib(p, "VmRSS") for p in pids)


def hwm_kib(pids: list[int]) -> int:
    return sum(_status_kib(p, "VmHWM") for p in pids)


def reset_hwm(pids: list[int]) -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    ok = True
    for p in pids:
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


@dataclass
class Peak:
    sampled_kib: int
    hwm_kib: int
    hwm_reset: bool
    samples: int


class RssSampler:
    """Background thread sampling tree RSS while a request runs."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.pids = tree(pid)
        self.peak = rss_kib(self.pids)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.hwm_reset = reset_hwm(self.pids)

    def _run(self) -> None:
        last_scan = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last_scan > 0.5:  # workers may be spawned on demand
                self.pids, last_scan = tree(self.pid), time.monotonic()
            self.peak = max(self.peak, rss_kib(self.pids))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> Peak:
        pids = tree(self.pid)
        return Peak(max(self.peak, rss_kib(pids)), hwm_kib(pids), self.hwm_reset, self.samples)

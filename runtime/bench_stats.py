"""Latency summaries and process resource meters for the benchmark (stdlib + numpy only)."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize_ns(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds (and the sample count) of per-frame nanosecond timings."""
    values = np.asarray(samples_ns, np.float64) / 1e6
    if values.size == 0:
        return {"n": 0}
    summary = {f"p{q}_ms": float(np.percentile(values, q)) for q in PERCENTILES}
    summary.update(max_ms=float(values.max()), mean_ms=float(values.mean()), n=int(values.size))
    return summary


def _read_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) so each run gets its own peak; False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> tuple[float, str]:
    """(peak resident set size in MB, how it was measured)."""
    hwm = _read_status_kb("VmHWM")
    if hwm is not None:
        return hwm / 1024.0, "VmHWM"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "ru_maxrss (process lifetime)"


@dataclass
class ResourceMeter:
    """CPU time (user + system, all threads) against wall time over a ``with`` block, plus the peak RSS in it."""

    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    rss_source: str = ""
    rss_per_run: bool = False

    def __enter__(self) -> ResourceMeter:
        self.rss_per_run = reset_peak_rss()
        self._times = os.times()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        end = os.times()
        self.cpu_s = (end.user - self._times.user) + (end.system - self._times.system)
        self.peak_rss_mb, self.rss_source = peak_rss_mb()

    def as_dict(self) -> dict[str, Any]:
        cores = os.cpu_count() or 1
        busy = self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0
        return {
            "wall_s": round(self.wall_s, 4),
            "cpu_s": round(self.cpu_s, 4),
            "cpu_cores_busy": round(busy, 3),
            "cpu_utilisation": round(busy / cores, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "peak_rss_source": self.rss_source + ("" if self.rss_per_run else ", not reset per run"),
        }

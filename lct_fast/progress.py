"""Progress of a long loop, for a person watching a terminal and for a log file alike.

On a terminal: a tqdm bar. Elsewhere (nohup, Slurm, CI, a pipe): one compact line every ``interval_s`` seconds
and one at the end -- ``<who>: <what> 4,096/50,000 samples (8%) | 120 samples/s | ETA 6m12s`` -- so a log shows
the run is alive without a 75 kB carriage-return line. ``interval_s = 0`` or ``enabled = False``: silent.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress", "duration"]


def duration(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """``update(n)`` after each chunk of work, ``close()`` at the end (or use it as a context manager)."""

    def __init__(self, total: int, what: str, *, who: str = "lct_fast", unit: str = "samples",
                 interval_s: float = 30.0, enabled: bool = True, stream: Optional[TextIO] = None,
                 tty: Optional[bool] = None) -> None:
        self.total, self.what, self.who, self.unit = int(total), what, who, unit
        self.stream = stream or sys.stderr
        self.enabled = bool(enabled) and interval_s > 0
        self.interval_s = float(interval_s)
        self.done = 0
        self.t0 = self.t_last = time.perf_counter()
        self.lines = 0
        tty = self.stream.isatty() if tty is None else tty
        self.bar = None
        if self.enabled and tty:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=f"{who}: {what}", unit=unit.rstrip("s") or unit,
                            file=self.stream, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += int(n)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(int(n))
            return
        now = time.perf_counter()
        if now - self.t_last >= self.interval_s and self.done < self.total:
            self.t_last = now
            self._line(now)

    def line(self, now: Optional[float] = None) -> str:
        """The progress line at time ``now`` (default: the present)."""
        elapsed = max((time.perf_counter() if now is None else now) - self.t0, 1e-9)
        rate = self.done / elapsed
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        left = self.total - self.done
        eta = f" | ETA {duration(left / rate)}" if left > 0 and rate > 0 else f" | {duration(elapsed)}"
        return (f"{self.who}: {self.what} {self.done:,}/{self.total:,} {self.unit}{pct} | "
                f"{rate:,.1f} {self.unit}/s{eta}")

    def _line(self, now: float) -> None:
        print(self.line(now), file=self.stream, flush=True)
        self.lines += 1

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.done:
            self._line(time.perf_counter())
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

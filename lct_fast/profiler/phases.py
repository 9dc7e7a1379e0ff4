"""Phase timing of a training step: where each millisecond goes.

The trainer and the loss objects mark their phases with :func:`phase`::

    with phase("backward"):
        engine.backward(loss)

Outside a profile this is a no-op (one global lookup). Inside ``with PhaseTimer(...).active():`` every
phase boundary is a *mark* -- a clock reading on CPU, a CUDA event on GPU -- and the interval between two
consecutive marks is charged to the innermost phase open at the time (exclusive time), or to
``"untracked"`` when none is. A step is the interval between the first and the last mark of
:meth:`PhaseTimer.step`, so the phases of a step sum to the step exactly, whatever the nesting; a nested
phase (the OT coupling inside the loss) is not counted twice.

On GPU the marks are CUDA events on the current stream, resolved once at the end of the step: the phases
then measure the device timeline (a kernel launched in one phase and still running when the next begins
is charged to the phase in which the device runs it, not to the one that launched it), and the step's only
host synchronisation is that final one. CPU work that keeps the device idle (data wait, logging) shows as
the device time between the marks around it.

Every phase is also a ``torch.profiler.record_function`` range (``lct_fast/<name>``) while a timer is
active, so a Chrome trace shows the same names.

This module is a leaf: it imports torch only, so any module (models, losses, trainer) may mark phases.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

__all__ = ["phase", "current_phase", "PhaseTimer", "UNTRACKED"]

UNTRACKED = "untracked"
_ACTIVE: Optional["PhaseTimer"] = None


def current_phase() -> Optional[str]:
    """The innermost open phase of the active timer (None when no timer is active or no phase is open)."""
    t = _ACTIVE
    return t._stack[-1] if t is not None and t._stack else None


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase of the training step (no-op unless a :class:`PhaseTimer` is active)."""
    t = _ACTIVE
    if t is None:
        yield
        return
    with t.phase(name):
        yield


class PhaseTimer:
    """Exclusive time per phase, step by step.

    Args:
        device: ``"cuda"`` marks with CUDA events (device timeline); anything else with ``clock``.
        clock: seconds as a float (default ``time.perf_counter``); tests inject a fake clock.
    """

    def __init__(self, device: str = "cpu", clock: Optional[Callable[[], float]] = None) -> None:
        self.cuda = device == "cuda"
        self.clock = clock or time.perf_counter
        self.steps: List[Dict[str, float]] = []
        self._stack: List[str] = []
        self._marks: List[Tuple[object, Optional[str]]] = []  # (clock value | event, phase charged after it)
        self._in_step = False

    # ------------------------------------------------------------------ marks
    def _mark(self) -> None:
        top = self._stack[-1] if self._stack else None
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((ev, top))
        else:
            self._marks.append((self.clock(), top))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if not self._in_step:  # a phase outside a timed step (e.g. set-up) is not charged anywhere
            yield
            return
        with torch.profiler.record_function(f"lct_fast/{name}"):
            # Each mark records the phase that runs *after* it: push before the entry mark, pop before the exit.
            self._stack.append(name)
            self._mark()
            try:
                yield
            finally:
                self._stack.pop()
                self._mark()

    @contextlib.contextmanager
    def step(self) -> Iterator[Dict[str, float]]:
        """Time one step; the yielded dict is filled with ``{phase: seconds, ..., "step": seconds}`` on exit."""
        if self._in_step:
            raise RuntimeError("PhaseTimer.step: steps do not nest")
        result: Dict[str, float] = {}
        self._marks, self._stack, self._in_step = [], [], True
        self._mark()
        try:
            yield result
        finally:
            self._mark()
            self._in_step = False
        result.update(self._resolve())
        self.steps.append(result)

    def _resolve(self) -> Dict[str, float]:
        marks = self._marks
        if self.cuda:
            marks[-1][0].synchronize()
            seg = [marks[i][0].elapsed_time(marks[i + 1][0]) / 1e3 for i in range(len(marks) - 1)]
        else:
            seg = [marks[i + 1][0] - marks[i][0] for i in range(len(marks) - 1)]
        out: Dict[str, float] = {}
        for (_, name), dt in zip(marks[:-1], seg):
            key = name or UNTRACKED
            out[key] = out.get(key, 0.0) + dt
        out["step"] = sum(seg)
        return out

    # ------------------------------------------------------------------ activation
    @contextlib.contextmanager
    def active(self) -> Iterator["PhaseTimer"]:
        """Make this the timer that :func:`phase` reports to."""
        global _ACTIVE
        prev, _ACTIVE = _ACTIVE, self
        try:
            yield self
        finally:
            _ACTIVE = prev

"""The layout of a run directory, in one place: every file a run writes and every tool reads is named here.

::

    <run>/config.json            the resolved config (+ "derived": the precision plan)
    <run>/metrics.jsonl          one JSON line per log interval / evaluation
    <run>/summary.json           the run's end: samples, throughput, last metrics, evaluation
    <run>/report.png             the run report (lct_fast.report)
    <run>/tensorboard/           TensorBoard scalars
    <run>/checkpoints/<tag>/     DeepSpeed's shards + our client state + COMPLETE (lct_fast.checkpoint)
    <run>/samples/<tag>-<k>step  periodic 1-/2-step sample grids (.npy + .png)
    <run>/eval/                  the latest evaluation's grids and standardised samples
    <run>/export/                launch/export.py: the EMAs as safetensors + config.json
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["RunDir"]


@dataclass(frozen=True)
class RunDir:
    root: str

    def _p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def config(self) -> str:
        return self._p("config.json")

    @property
    def metrics(self) -> str:
        return self._p("metrics.jsonl")

    @property
    def summary(self) -> str:
        return self._p("summary.json")

    @property
    def report(self) -> str:
        return self._p("report.png")

    @property
    def tensorboard(self) -> str:
        return self._p("tensorboard")

    @property
    def checkpoints(self) -> str:
        return self._p("checkpoints")

    @property
    def samples(self) -> str:
        return self._p("samples")

    @property
    def eval(self) -> str:
        return self._p("eval")

    @property
    def export(self) -> str:
        return self._p("export")

"""The whole method, stage after stage, on the Ray given by `ray.address`.

    cmevlm pipeline --config configs/demo.yaml [--from sft] [--to evaluate]

Each stage is skipped when its outputs are complete (its manifest) and resumes when it was
interrupted; one line per stage says what happened, and a failing stage is named.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

from cmevlm.config import RunConfig
from cmevlm.errors import ConfigError
from cmevlm.stages import NAMES, get

log = logging.getLogger(__name__)

STAGES = NAMES  # in pipeline order, from the registry (cmevlm.stages)


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage {stage} failed: {type(error).__name__}: {error}")
        self.stage, self.error = stage, error


@dataclass
class StageResult:
    stage: str
    seconds: float
    skipped: bool
    summary: str


def runner(stage: str):
    """The `run(cfg, force=False)` of a stage."""
    return get(stage).run


def summary(stage: str, m: dict) -> str:
    """One line on what a stage produced, from its manifest or metrics."""
    return get(stage).summary(m)


def run(cfg: RunConfig, start: str = STAGES[0], stop: str = STAGES[-1], echo=print) -> list[StageResult]:
    """Run the stages from `start` to `stop` in order; raises StageFailed naming the stage."""
    chosen = STAGES[STAGES.index(start): STAGES.index(stop) + 1]
    if not chosen:
        raise ConfigError(f"--from {start} comes after --to {stop}")
    results = []
    for i, stage in enumerate(chosen, 1):
        t0 = time.time()
        try:
            m = runner(stage)(cfg)
        except Exception as e:
            echo(f"[{i}/{len(chosen)}] {stage:<8} FAILED after {time.time() - t0:.0f} s: {type(e).__name__}: {e}")
            raise StageFailed(stage, e) from e
        gc.collect()  # a finished stage's datasets (in reference cycles) release their blocks, so idle workers can go
        r = StageResult(stage, time.time() - t0, bool(m.get("skipped")), summary(stage, m))
        echo(f"[{i}/{len(chosen)}] {stage:<8} {'skipped (complete)' if r.skipped else 'done'} in {r.seconds:.0f} s: {r.summary}")
        results.append(r)
    return results

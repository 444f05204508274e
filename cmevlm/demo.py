"""`cmevlm demo`: the whole method on one laptop, from nothing.

Writes synthetic CME data and a tiny Qwen2.5-VL under the workdir, then runs the pipeline's
stages with `configs/demo.yaml`. Every step is skipped when its output is already there, so a
second run finishes in seconds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cmevlm.config import RunConfig

log = logging.getLogger(__name__)


def rebase(cfg: RunConfig, workdir: str) -> RunConfig:
    """The demo config moved to `workdir`: every path under its workdir moves with it."""
    old = cfg.workdir.rstrip("/")

    def move(p: str) -> str:
        return workdir + p[len(old):] if p == old or p.startswith(old + "/") else p

    cfg.workdir = workdir
    cfg.model.base = move(cfg.model.base)
    for s in cfg.sources:
        s.uri = move(s.uri)
    return cfg


def run(cfg: RunConfig, procedures: int = 24, frames_per_procedure: int = 30) -> dict:
    from cmevlm.data.synth import write_dataset
    from cmevlm.model.tiny import build_tiny_model

    summary = {}
    # ---- synthetic data (the demo's one source)
    src = Path(cfg.sources[0].uri)
    if (src / "procedures.csv").exists():
        log.info("synth: %s exists, skipped", src)
    else:
        summary["synth"] = write_dataset(src, procedures=procedures, frames_per_procedure=frames_per_procedure, seed=cfg.seed)
        log.info("synth: %s", summary["synth"])
    # ---- the tiny base model
    base = Path(cfg.model.base)
    if (base / "config.json").exists():
        log.info("tiny-model: %s exists, skipped", base)
    else:
        build_tiny_model(base, seed=cfg.seed)
        log.info("tiny-model: built %s", base)
    summary["base_model"] = str(base)
    # ---- the pipeline's stages, then Table 1
    from cmevlm import pipeline
    from cmevlm.evaluate import report
    from cmevlm.storage import Storage, join

    summary["stages"] = pipeline.run(cfg)
    st = Storage(cfg.storage)
    summary["metrics"] = st.read_json(join(cfg.workdir, "eval", "metrics.json"))
    summary["table"] = report.summary_text(summary["metrics"])
    summary["sampled"] = report.sampled_text(summary["metrics"])
    # ---- what waits for the surgeon in `cmevlm review`: the flagged items and a blinded sheet
    from cmevlm.evaluate import expert
    from cmevlm.review.queues import load_queues

    if not st.exists(join(cfg.workdir, expert.SHEET)):
        expert.export_sheet(cfg)

    summary["review"] = {name: len(q.items) for name, q in load_queues(cfg).items()}
    return summary

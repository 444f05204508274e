"""The stage registry: the one list of pipeline stages and what each needs.

The pipeline's order, the CLI's stage subcommands, the job entry point (`jobs/run.py`),
`cmevlm submit` and the Helm chart's `stages:` values all come from `STAGES`; a test fails if
the chart's stage list (names, `gpu`, `callsTeacher`) and this registry differ.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # its `run(cfg, force=False) -> manifest`
    inputs: tuple[str, ...]  # under the workdir
    outputs: tuple[str, ...]
    gpu: bool  # its workers ask Ray for GPUs on a cluster
    calls_teacher: bool  # its pods may reach the teacher / judge endpoint
    summary: Callable[[dict], str]
    help: str
    description: str
    force: str

    def run(self, cfg, force: bool = False) -> dict:
        return importlib.import_module(self.module).run(cfg, force=force)


def _models(m: dict) -> str:
    return ", ".join(f"{k}: judge {v['judge']['mean']:.2f}, structure {v['structure_accuracy']:.2f}" for k, v in m["models"].items())


STAGES: tuple[Stage, ...] = (
    Stage("ingest", "cmevlm.ingest", (), ("frames",), False, False,
          lambda m: f"{m['accepted']} accepted, {m['quarantined']} quarantined",
          "frames + masks -> composite Parquet shards (Ray Data); bad items quarantined",
          "Read every source (local or s3://, cmevlm or dsad layout), build one composite per (frame, structure) with "
          "the overlay and size from `data:`, split by procedure, and write Parquet shards to <workdir>/frames with a "
          "manifest. Bad items go to <workdir>/quarantine/ingest.jsonl.",
          "rebuild even when frames/manifest.json says the stage is complete"),
    Stage("teach", "cmevlm.teach", ("frames",), ("sft",), False, True,
          lambda m: f"{m['train']} train / {m['test']} test answers, {m['quarantined']} quarantined, ${m['cost_usd']:.4f}",
          "write the SFT dataset with a teacher that sees only text and binary masks",
          "Ask the teacher (teacher.backend: gemini, openai or offline) for an expert answer per item, from text "
          "context and the binary mask only, rate-limited, cached and audited; write <workdir>/sft/{train,test} in "
          "TRL's conversational format, applying teacher/reviews.jsonl.",
          "reassemble even when sft/manifest.json says complete (cached answers are reused)"),
    Stage("sft", "cmevlm.train.sft", ("sft",), ("models/sft",), True, False,
          lambda m: f"{m['global_step']} steps",
          "SFT of Qwen2.5-VL on Ray Train + DeepSpeed + TRL (vision encoder frozen)",
          "Supervised fine-tuning on <workdir>/sft/train with TRL's SFTTrainer in a Ray Train TorchTrainer under "
          "DeepSpeed ZeRO; vision encoder frozen, merger and LM trained. Checkpoints in <workdir>/checkpoints/sft, the "
          "model in <workdir>/models/sft.",
          "train again even when models/sft is complete"),
    Stage("sample", "cmevlm.sample", ("models/sft", "sft"), ("samples",), True, False,
          lambda m: f"{m['items']} items x 5 answers",
          "five answers per item from the frozen SFT model, one per sampling setting",
          "Load models/sft once per actor (Ray Data actor pool; GPU actors on clusters) and answer every pool item five "
          "times with five distinct temperature/top_p/seed settings, batched across items. Resumable: a rerun "
          "generates only the items without answers.",
          "discard earlier samples and generate again"),
    Stage("prefer", "cmevlm.prefer", ("samples", "sft"), ("preferences",), False, True,
          lambda m: f"{m['pairs']} pairs, {m['quarantined']} quarantined",
          "the judge picks accepted/rejected answers (text only) -> the DPO dataset",
          "Send each item's five answers and its ground truth, as text only, through the same guarded, audited, "
          "cached and rate-limited client as the teacher; the judge (judge.backend) names one accepted and one "
          "rejected answer. Writes <workdir>/preferences in TRL's preference format.",
          "reassemble even when preferences/manifest.json says complete"),
    Stage("dpo", "cmevlm.train.dpo", ("preferences", "models/sft"), ("models/dpo",), True, False,
          lambda m: f"{m['global_step']} steps",
          "DPO of the SFT model on the preference dataset (all components trained)",
          "Direct preference optimisation on <workdir>/preferences with TRL's DPOTrainer in a Ray Train "
          "TorchTrainer under DeepSpeed ZeRO; reference = the frozen SFT model; every component trained.",
          "train again even when models/dpo is complete"),
    Stage("evaluate", "cmevlm.evaluate.evaluation", ("sft", "models/sft", "models/dpo"), ("eval",), True, True,
          _models,
          "base vs SFT vs DPO on the test set: BLEU-4, BERTScore, judge, rubric, report",
          "Answer every test item with each model (greedy, Ray Data actors), score the answers (BLEU-4, BERTScore "
          "F1, the LLM judge on text only, rubric measures), compare models (per structure, per site, Wilcoxon "
          "tests) and write eval/metrics.json, eval/answers.parquet, eval/report.html.",
          "recompute metrics even when eval/ is complete (answers are reused)"),
)

NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
GPU_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.gpu)
TEACHER_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.calls_teacher)


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; one of {', '.join(NAMES)}")
    return BY_NAME[name]

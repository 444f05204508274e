"""SFT throughput: the Ray Train stage (1 worker, DeepSpeed) vs a plain single-process TRL run.

    .venv/bin/python bench/train.py [--steps 40] [--zero-stage 2]

Both run the same tiny Qwen2.5-VL, data, batch and SFTTrainer settings for `--steps` optimiser
steps. Steady-state samples/s is taken from the per-step metrics after the first 5 steps
(warm-up, compilation and Ray's worker start are left out); Ray's start-up is timed apart.
Target: Ray Train >= 0.9 of plain TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cmevlm.cluster import apply_env_defaults  # noqa: E402  (before torch and Ray)

apply_env_defaults()

from cmevlm import ingest, teach  # noqa: E402
from cmevlm.config import load_config  # noqa: E402
from cmevlm.data.synth import write_dataset  # noqa: E402
from cmevlm.model.tiny import build_tiny_model  # noqa: E402
from cmevlm.storage import Storage  # noqa: E402
from cmevlm.train import common, sft  # noqa: E402

SKIP = 5


def steady(rows):
    rates = [r["samples_per_s"] for r in rows if r["step"] > SKIP]
    return statistics.median(rates)


def plain(cfg, data) -> float:
    from trl import SFTConfig, SFTTrainer

    from cmevlm.model.loading import load
    from cmevlm.train.callbacks import MetricsCallback
    from cmevlm.train.freeze import apply_freeze

    t = cfg.sft
    kw = common.trainer_kwargs(t, tempfile.mkdtemp())
    kw.update(deepspeed=None, save_strategy="no")
    model, proc = load(cfg, cfg.model.base, dtype="float32", device="cpu")
    proc.tokenizer.padding_side = "right"
    apply_freeze(model, "sft")
    trainer = SFTTrainer(model=model, args=SFTConfig(**kw, assistant_only_loss=True),
                         train_dataset=common.load_dataset(Storage(), data), processing_class=proc)
    metrics = MetricsCallback(t.per_device_batch_size * common.grad_accumulation(t))
    trainer.add_callback(metrics)
    trainer.train()
    return steady(metrics.rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8, help="examples per step")
    ap.add_argument("--zero-stage", type=int, default=2, choices=[0, 2, 3])
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_dataset(tmp / "src", procedures=6, frames_per_procedure=20, seed=0)
    build_tiny_model(tmp / "base")
    cfg = load_config(overrides=[
        f"workdir={tmp / 'run'}", f"sources=[{{uri: '{tmp / 'src'}'}}]", f"model.base={tmp / 'base'}", "data.image_size=168",
        "sft.num_workers=1", f"sft.max_steps={args.steps}", f"sft.per_device_batch_size={args.batch}",
        f"sft.effective_batch_size={args.batch}", "sft.lr=1e-3", f"sft.zero_stage={args.zero_stage}",
        f"sft.checkpoint_every={args.steps}", "sft.resources_per_worker={CPU: 1}"])
    from cmevlm.cluster import connect

    t0 = time.perf_counter()
    connect(cfg.ray)
    startup = time.perf_counter() - t0
    ingest.run(cfg)
    teach.run(cfg)
    data = str(tmp / "run/sft/train")

    a = plain(cfg, data)
    t0 = time.perf_counter()
    sft.run(cfg)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (tmp / "run/models/sft/metrics.jsonl").read_text().splitlines()]
    b = steady(rows)
    print(f"steps={args.steps} batch={args.batch} zero_stage={args.zero_stage} (steady state = median after step {SKIP})")
    print(f"(a) plain TRL, one process : {a:7.1f} samples/s")
    print(f"(b) Ray Train, 1 worker    : {b:7.1f} samples/s  (stage wall {wall:.1f} s incl. worker start and export; Ray start-up {startup:.1f} s apart)")
    print(f"ratio (b)/(a)              : {b / a:.2f}")


if __name__ == "__main__":
    main()

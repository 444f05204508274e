"""SFT of Qwen2.5-VL (paper, Step 1): vision encoder frozen; merger and language model trained.

    cmevlm sft --config configs/demo.yaml [--set sft.num_workers=2 --set sft.zero_stage=3]
    python jobs/run.py sft --config /etc/cmevlm/run.yaml

A Ray Train TorchTrainer runs `train_loop` on `sft.num_workers` workers; each runs TRL's
SFTTrainer under DeepSpeed ZeRO (`sft.zero_stage`) with assistant-only loss. Every worker reads
the whole (small) SFT table and the HF Trainer's distributed sampler gives each its shard:
simpler than streaming Ray Data shards into a vision collator, and the table of composites is
a few hundred MB even for thousands of items. Checkpoints go to `<workdir>/checkpoints/sft/`
every `sft.checkpoint_every` steps; a failed worker group restarts from the last one.
The result is exported to `<workdir>/models/sft/` in Hugging Face format.
"""

from __future__ import annotations

import logging

from cmevlm.config import RunConfig
from cmevlm.errors import MissingInput
from cmevlm.storage import Storage, join, stage_uri
from cmevlm.train import common
from cmevlm.train.freeze import COMPONENTS, trainable

log = logging.getLogger(__name__)


def train_loop(config: dict) -> None:
    """One Ray Train worker: build, (resume,) train, report the final model."""
    cfg = RunConfig.model_validate_json(config["cfg"])
    t = cfg.sft
    common.init_distributed(t)
    from trl import SFTConfig, SFTTrainer

    scratch = common.scratch_dir("sft")
    args = SFTConfig(**common.trainer_kwargs(t, scratch), max_length=t.max_length, assistant_only_loss=True)
    model, processor, counts = common.load_trainable(cfg, t, config["base"], config["freeze"], config.get("init"))
    dataset = common.load_dataset(Storage(cfg.storage), config["data"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    common.train_and_report(trainer, t, "sft", counts, scratch, keep_trainable=bool(config.get("init")))


def local_round(cfg: RunConfig, init: str, name: str) -> tuple[bytes, dict]:
    """One federated SFT round at a site: `cfg.sft` (its max_steps = the round's local steps)
    from the global trainable tensors in `init`, through the same Ray Train stage as `run`.
    Returns (the trained tensors as safetensors bytes, the final marker with the last loss)."""
    t = cfg.sft
    return common.local_round(cfg, t, name, train_loop, {"cfg": cfg.model_dump_json(), "base": cfg.model.base,
                                                        "data": stage_uri(cfg, t.data), "freeze": t.freeze or "sft", "init": init})


def run(cfg: RunConfig, force: bool = False) -> dict:
    """Train and export; skipped when `models/sft` has a manifest."""
    st = Storage(cfg.storage)
    t = cfg.sft
    out, data = stage_uri(cfg, t.output), stage_uri(cfg, t.data)
    if st.is_complete(out) and not force:
        log.info("sft: %s is complete, skipped", out)
        return {**st.read_manifest(out), "skipped": True}
    if not st.is_complete(join(cfg.workdir, "sft")) and data == join(cfg.workdir, "sft/train"):
        raise MissingInput(f"sft needs the teach stage's dataset at {data} (run `cmevlm teach`)")
    policy = t.freeze or "sft"
    base = cfg.model.base
    result = common.fit(cfg, t, "sft", train_loop, {"cfg": cfg.model_dump_json(), "base": base, "data": data, "freeze": policy})
    frozen = {c for c in COMPONENTS if not trainable(policy, c)}
    values = {"stage": "sft", "base": base, "data": data, "freeze": policy, **common.effective_values(t)}
    final = common.export_model(cfg, result, base, out, frozen, values)
    manifest = st.write_manifest(out, stage="sft", global_step=final["global_step"], parameters=final["parameters"], training=values,
                               export=final["export"])
    log.info("sft: %d steps -> %s", final["global_step"], out)
    return manifest

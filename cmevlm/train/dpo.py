"""DPO of the SFT model (paper, Step 3): every component trained, reference = frozen SFT model.

    cmevlm dpo --config configs/demo.yaml [--set dpo.beta=0.1 --set dpo.zero_stage=3]
    python jobs/run.py dpo --config /etc/cmevlm/run.yaml

The same Ray Train + DeepSpeed wiring as SFT, running TRL's DPOTrainer on the preference rows
(`images`, `prompt`, `chosen`, `rejected`). The policy is loaded from the SFT model's directory
and `ref_model=None` makes TRL load the reference from that same directory, frozen; the first
loss is then ln 2 = 0.6931 (policy = reference).
"""

from __future__ import annotations

import logging

from cmevlm.config import RunConfig
from cmevlm.errors import MissingInput
from cmevlm.storage import Storage, stage_uri
from cmevlm.train import common
from cmevlm.train.freeze import COMPONENTS, trainable

log = logging.getLogger(__name__)


def train_loop(config: dict) -> None:
    """One Ray Train worker: build, (resume,) train, report the final model."""
    cfg = RunConfig.model_validate_json(config["cfg"])
    t = cfg.dpo
    common.init_distributed(t)
    from trl import DPOConfig, DPOTrainer

    from cmevlm.model.loading import local_model_dir

    scratch = common.scratch_dir("dpo")
    args = DPOConfig(**common.trainer_kwargs(t, scratch), beta=t.beta, loss_type=[t.loss_type], max_length=t.max_length)
    policy_dir = str(local_model_dir(config["policy"], cfg.storage))  # TRL reloads the reference from it
    model, processor, counts = common.load_trainable(cfg, t, policy_dir, config["freeze"], config.get("init"))
    dataset = common.load_dataset(Storage(cfg.storage), config["data"])
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=processor)
    common.train_and_report(trainer, t, "dpo", counts, scratch, keep_trainable=bool(config.get("init")))


def local_round(cfg: RunConfig, init: str, name: str) -> tuple[bytes, dict]:
    """One federated DPO round at a site: `cfg.dpo` from the global trainable tensors in
    `init`; policy and reference = `dpo.model` (the consortium's SFT model), which the round's
    tensors update in the policy only (TRL reloads the reference from its directory, or turns
    the adapter off). Returns (the trained tensors as safetensors bytes, the final marker)."""
    t = cfg.dpo
    return common.local_round(cfg, t, name, train_loop, {"cfg": cfg.model_dump_json(), "policy": stage_uri(cfg, t.model),
                                                        "data": stage_uri(cfg, t.data), "freeze": t.freeze or "dpo", "init": init})


def run(cfg: RunConfig, force: bool = False) -> dict:
    """Train and export; skipped when `models/dpo` has a manifest."""
    st = Storage(cfg.storage)
    t = cfg.dpo
    out, data, policy = stage_uri(cfg, t.output), stage_uri(cfg, t.data), stage_uri(cfg, t.model)
    if st.is_complete(out) and not force:
        log.info("dpo: %s is complete, skipped", out)
        return {**st.read_manifest(out), "skipped": True}
    for need, what in ((data, "the prefer stage's preferences"), (policy, "the SFT model")):
        if not st.is_complete(need):
            raise MissingInput(f"dpo needs {what} at {need}")
    freeze = t.freeze or "dpo"
    result = common.fit(cfg, t, "dpo", train_loop, {"cfg": cfg.model_dump_json(), "policy": policy, "data": data, "freeze": freeze})
    frozen = {c for c in COMPONENTS if not trainable(freeze, c)}
    values = {"stage": "dpo", "policy": policy, "reference": policy, "data": data, "freeze": freeze, **common.effective_values(t)}
    final = common.export_model(cfg, result, policy, out, frozen, values)
    manifest = st.write_manifest(out, stage="dpo", global_step=final["global_step"], parameters=final["parameters"], training=values,
                               export=final["export"])
    log.info("dpo: %d steps -> %s", final["global_step"], out)
    return manifest

"""What the consortium averages: the trainable tensors of a phase's model, by name.

`federation.trainable` = lora: the LoRA adapter (sft.lora, or r=16 on the default modules);
full: every parameter the freeze policy trains (merger + LM). The coordinator and every site
build the same trainable model from the same base (`trainable_model`), so names and shapes
agree; the coordinator's initial tensors start round 1, and each site loads the global tensors
of a round before it trains (cmevlm.train.common.start_from).
"""

from __future__ import annotations

import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch.nn as nn

from cmevlm.config import LoraSettings, RunConfig
from cmevlm.storage import Storage


TRAINING_PHASES = ("sft", "dpo")
OUTPUT = {"sft": "models/federated", "dpo": "models/federated-dpo"}  # what each phase's sites keep, under the workdir


def last_phase(cfg: RunConfig) -> str:
    """The phase whose model the sites keep last: dpo with federation.dpo_rounds, else sft."""
    return "dpo" if cfg.federation.dpo_rounds else "sft"


def stage_of(c: RunConfig, phase: str):
    return c.sft if phase == "sft" else c.dpo


def federated_cfg(cfg: RunConfig, phase: str = "sft") -> RunConfig:
    """The run config a federated round of `phase` trains with: its max_steps = local_steps,
    one checkpoint at the end, a constant learning rate (each round is a short stretch of one
    schedule), the adapter or not as `federation.trainable` says; DPO's policy and reference
    are the consortium's SFT model (OUTPUT["sft"])."""
    c = cfg.model_copy(deep=True)
    f, t = c.federation, stage_of(c, phase)
    if t.zero_stage == 3:
        from cmevlm.errors import ConfigError

        raise ConfigError(f"federated rounds need {phase}.zero_stage 0 or 2 (every worker holds the whole trainable tensors)")
    t.lora = (t.lora or LoraSettings(merge=False)) if f.trainable == "lora" else None
    t.max_steps, t.checkpoint_every, t.scheduler, t.warmup_ratio = f.local_steps, f.local_steps, "constant", 0.0
    c.dpo.model = OUTPUT["sft"]
    return c


def base_of(c: RunConfig, phase: str) -> str:
    """The model a phase's trainable tensors apply to: the base for SFT, the SFT consortium
    model for DPO."""
    from cmevlm.storage import stage_uri

    return c.model.base if phase == "sft" else stage_uri(c, c.dpo.model)


def trainable_model(cfg: RunConfig, phase: str = "sft", on: str | None = None):
    """(model, processor) of a federated phase: its base (or `on`, a model of the same
    architecture), its freeze policy, the adapter."""
    import torch

    from cmevlm.train.common import load_trainable

    c = federated_cfg(cfg, phase)
    t = stage_of(c, phase)
    torch.manual_seed(c.seed)  # the adapter's A starts the same everywhere
    model, processor, _ = load_trainable(c, t, on or base_of(c, phase), t.freeze or phase)
    return model, processor


def initial_state(cfg: RunConfig, phase: str = "sft") -> "OrderedDict":
    """A phase's starting tensors. A new LoRA adapter (random A, zero B) depends only on the
    architecture, so DPO's is built on the base: a coordinator under secure aggregation never
    holds the SFT consortium model; a full DPO starts from that model's own tensors."""
    from cmevlm.train.lora import trainable_state

    lora = cfg.federation.trainable == "lora"
    model, _ = trainable_model(cfg, phase, on=cfg.model.base if lora else None)
    return OrderedDict((k, v.float()) for k, v in trainable_state(model).items())


def to_numpy(state: dict) -> dict:
    return {k: v.detach().float().cpu().numpy() for k, v in state.items()}


def from_numpy(params: dict) -> dict:
    import torch

    return {k: torch.as_tensor(v).float() for k, v in params.items()}


def save_model(cfg: RunConfig, state: dict, phase: str = "sft") -> dict:
    """A phase's consortium model as a loadable directory at OUTPUT[phase] under the workdir:
    an adapter directory (its base = the phase's base) for lora, a whole model for full.
    Returns its manifest."""
    from cmevlm.model import adapters, layout
    from cmevlm.storage import stage_uri
    from cmevlm.train.lora import load_trainable_state

    model, processor = trainable_model(cfg, phase)
    load_trainable_state(model, state)
    st, out_uri = Storage(cfg.storage), stage_uri(cfg, OUTPUT[phase])
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        layout.save_processor(processor, tmp)
        layout.write_training_images(tmp, cfg.data.image_size, cfg.data.resize)
        if adapters.is_adapter_dir(tmp):
            adapters.set_base(tmp, base_of(federated_cfg(cfg, phase), phase))
        st.delete(out_uri)
        st.upload_dir(tmp, out_uri)
    return st.write_manifest(out_uri, stage="federated", phase=phase, created_unix=time.time(), trainable=cfg.federation.trainable,
                             tensors=len(state), values=sum(int(v.numel()) for v in state.values()))


class TrainableState(nn.Module):
    """The global model as the coordinator's persistor holds it (the job names this class, the
    initial tensors' URI in the run's storage and its endpoint; FLARE's server builds it,
    possibly in another pod than the one that submitted the job): the trainable tensors by
    their own dotted names, which nn.Module's parameters could not carry."""

    def __init__(self, uri: str, endpoint: str | None = None, region: str | None = None):
        super().__init__()
        from safetensors.torch import load

        from cmevlm.config import StorageConfig

        self._state = OrderedDict(load(Storage(StorageConfig(endpoint=endpoint, region=region)).read_bytes(uri)))

    def state_dict(self, *args, **kwargs):
        return OrderedDict(self._state)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._state = OrderedDict(state_dict)

"""What the consortium averages: the trainable tensors of the SFT model, by name.

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


def federated_cfg(cfg: RunConfig) -> RunConfig:
    """The run config a federated round trains with: sft.max_steps = local_steps, one
    checkpoint at the end, a constant learning rate (each round is a short stretch of one
    schedule), and the adapter or not as `federation.trainable` says."""
    c = cfg.model_copy(deep=True)
    f, t = c.federation, c.sft
    if t.zero_stage == 3:
        from cmevlm.errors import ConfigError

        raise ConfigError("federated rounds need sft.zero_stage 0 or 2 (every worker holds the whole trainable tensors)")
    t.lora = (t.lora or LoraSettings(merge=False)) if f.trainable == "lora" else None
    t.max_steps, t.checkpoint_every, t.scheduler, t.warmup_ratio = f.local_steps, f.local_steps, "constant", 0.0
    return c


def trainable_model(cfg: RunConfig):
    """(model, processor) of the federated SFT: the base, the freeze policy, the adapter."""
    import torch

    from cmevlm.train.common import load_trainable

    c = federated_cfg(cfg)
    torch.manual_seed(c.seed)  # the adapter's A starts the same everywhere
    model, processor, _ = load_trainable(c, c.sft, c.model.base, c.sft.freeze or "sft")
    return model, processor


def initial_state(cfg: RunConfig) -> "OrderedDict":
    from cmevlm.train.lora import trainable_state

    model, _ = trainable_model(cfg)
    return OrderedDict((k, v.float()) for k, v in trainable_state(model).items())


def to_numpy(state: dict) -> dict:
    return {k: v.detach().float().cpu().numpy() for k, v in state.items()}


def from_numpy(params: dict) -> dict:
    import torch

    return {k: torch.as_tensor(v).float() for k, v in params.items()}


def save_model(cfg: RunConfig, state: dict, out_uri: str) -> dict:
    """The consortium model as a loadable directory at `out_uri`: an adapter directory (its
    base = model.base) for lora, a whole model for full. Returns its manifest."""
    from cmevlm.train import lora
    from cmevlm.train.lora import load_trainable_state

    model, processor = trainable_model(cfg)
    load_trainable_state(model, state)
    st = Storage(cfg.storage)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if lora.is_adapter_dir(tmp):
            lora.set_base(Path(tmp), cfg.model.base)
        st.delete(out_uri)
        st.upload_dir(tmp, out_uri)
    return st.write_manifest(out_uri, stage="federated", created_unix=time.time(), trainable=cfg.federation.trainable, tensors=len(state),
                             values=sum(int(v.numel()) for v in state.values()))


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

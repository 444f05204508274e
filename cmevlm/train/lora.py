"""LoRA adapters through PEFT: which modules get one, wrapping, and adapter directories.

An adapter is placed only inside the components the freeze policy trains (cmevlm.train.freeze):
`target_modules` names the last part of a module's name (`q_proj`, `gate_proj`, the merger's
`mlp.0`), and the vision encoder has modules of the same names, so the list PEFT gets is of full
module names, filtered by component. Everything else is frozen: only the adapter trains.

Exporting writes an adapter directory (its layout: cmevlm.model.adapters, which loading reads).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cmevlm.model import layout
from cmevlm.model.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGED, set_base
from cmevlm.train.freeze import COMPONENTS, component, trainable

log = logging.getLogger(__name__)


def targets(model, target_modules: list[str], policy: str) -> list[str]:
    """Full names of the Linear modules that get an adapter: named in `target_modules` (by
    their last part, or a dotted tail such as `mlp.0`) and in a component `policy` trains."""
    import torch

    out = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not trainable(policy, component(name)):
            continue
        if any(name == t or name.endswith("." + t) for t in target_modules):
            out.append(name)
    if not out:
        raise ValueError(f"lora.target_modules {target_modules} match no Linear module in the components policy {policy!r} trains")
    return out


def wrap(model, settings, policy: str):
    """(PeftModel, parameter counts per component): the adapter on `targets`, all else frozen."""
    from peft import LoraConfig, get_peft_model

    names = targets(model, settings.target_modules, policy)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=names, bias="none")
    peft_model = get_peft_model(model, config)
    counts = {c: {"trainable": 0, "total": 0} for c in COMPONENTS}
    for name, p in peft_model.named_parameters():
        c = component(name.removeprefix("base_model.model."))
        counts[c]["total"] += p.numel()
        counts[c]["trainable"] += p.numel() if p.requires_grad else 0
    log.info("lora r=%d on %d modules: %s", settings.r, len(names),
             ", ".join(f"{c} {v['trainable']:,}/{v['total']:,}" for c, v in counts.items()))
    return peft_model, counts


def trainable_state(model) -> dict:
    """The tensors that train, by name, detached on CPU: the adapter of a PeftModel, or every
    parameter with requires_grad of a plain model."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict) -> None:
    """Put `state` (names as `trainable_state` gives them) into `model`; every name must exist
    and be trainable, and every trainable tensor must be given."""
    import torch

    params = dict(model.named_parameters())
    want = {n for n, p in params.items() if p.requires_grad}
    if set(state) != want:
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        raise ValueError(f"trainable state does not fit the model: missing {missing[:3]} ({len(missing)}), unexpected {extra[:3]} ({len(extra)})")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(torch.as_tensor(t).to(params[n].dtype))


SKIP_ON_EXPORT = ("README.md", "final.json", "metrics.jsonl", "log_history.json")


def export_adapter(checkpoint: Path, out_dir: Path, base_uri: str, storage, dtype: str, merge: bool) -> dict:
    """An adapter checkpoint -> `out_dir`: the adapter, the processor files, the base's URI,
    and with `merge` the merged model in `dtype` under `merged/` (this loads the base: the
    export task's memory must cover the model in `dtype`, 15.4 GiB for a 7B in bf16)."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    for p in checkpoint.iterdir():
        if p.is_file() and p.name not in SKIP_ON_EXPORT and p.suffix not in (".bin", ".pt", ".pth"):
            shutil.copy(p, out_dir / p.name)
    set_base(out_dir, base_uri)
    layout.normalise(out_dir)
    figures = {"adapter_bytes": (out_dir / ADAPTER_WEIGHTS).stat().st_size, "merged": merge, "dtype": dtype}
    if merge:
        from cmevlm.model.loading import load_model

        merged = load_model(str(out_dir), storage, dtype=dtype, device="cpu")
        merged.save_pretrained(out_dir / MERGED)
        for p in out_dir.iterdir():
            if p.is_file() and p.name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy(p, out_dir / MERGED / p.name)
        figures["merged_bytes"] = sum(f.stat().st_size for f in (out_dir / MERGED).glob("*.safetensors"))
    return figures

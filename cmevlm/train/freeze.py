"""Which parameters train: named, tested freeze policies for Qwen2.5-VL.

Module names (transformers 5): vision encoder `model.visual.patch_embed`, `model.visual.blocks.*`;
merger `model.visual.merger.*`; language model `model.language_model.*` and `lm_head`.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

COMPONENTS = ("vision", "merger", "lm")


def component(name: str) -> str:
    """Parameter name -> vision | merger | lm."""
    if ".visual.merger." in f".{name}" or name.startswith("visual.merger."):
        return "merger"
    if ".visual." in f".{name}" or name.startswith("visual."):
        return "vision"
    return "lm"


def trainable(policy: str, comp: str) -> bool:
    """sft: merger + LM (paper, Step 1); dpo / none: everything (Step 3); lm_only: the LM."""
    if policy == "sft":
        return comp in ("merger", "lm")
    if policy in ("dpo", "none"):
        return True
    if policy == "lm_only":
        return comp == "lm"
    raise ValueError(f"unknown freeze policy {policy!r} (sft, dpo, lm_only, none)")


def apply_freeze(model, policy: str) -> dict[str, dict[str, int]]:
    """Set requires_grad per component; returns {component: {trainable, total}} parameter counts."""
    counts = {c: {"trainable": 0, "total": 0} for c in COMPONENTS}
    for name, p in model.named_parameters():
        c = component(name)
        p.requires_grad_(trainable(policy, c))
        n = getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 partitions parameters: ds_numel is the full size
        counts[c]["total"] += n
        counts[c]["trainable"] += n if p.requires_grad else 0
    log.info("freeze %s: %s", policy, ", ".join(f"{c} {v['trainable']:,}/{v['total']:,}" for c, v in counts.items()))
    return counts

"""LoRA adapter directories, as model loading sees them: recognise one, find its base, apply it.

An exported adapter directory holds `adapter_config.json` (its `base_model_name_or_path` is the
base's URI: a workdir path or s3:// prefix, itself possibly an adapter directory, as DPO's base
is SFT's adapter), `adapter_model.safetensors`, the processor files, and optionally `merged/`,
a whole model (base + adapter) for tooling that knows no PEFT. Training adapters
(cmevlm.train.lora) writes them; loading (cmevlm.model.loading) reads them through this module.
"""

from __future__ import annotations

import json
from pathlib import Path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED = "merged"


def is_adapter_dir(path: str | Path) -> bool:
    return Path(path, ADAPTER_CONFIG).exists()


def base_of(adapter_dir: str | Path) -> str:
    return json.loads(Path(adapter_dir, ADAPTER_CONFIG).read_text())["base_model_name_or_path"]


def set_base(adapter_dir: str | Path, base_uri: str) -> None:
    """Record where the adapter's base lives (a URI, not the worker's cache path)."""
    f = Path(adapter_dir, ADAPTER_CONFIG)
    data = json.loads(f.read_text())
    data["base_model_name_or_path"] = base_uri
    f.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def apply_adapter(base_model, adapter_dir: str | Path):
    """base + adapter, merged into plain weights (no PEFT wrapper left)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(adapter_dir)).merge_and_unload()

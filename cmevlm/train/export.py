"""Streaming export: a trained model's Hugging Face directory, one tensor chunk at a time.

A 7B Qwen2.5-VL is 30.9 GiB in fp32; loading the trained and the base model to merge them
needs ~62 GiB, more than a Ray head pod has. This module never holds a model: it reads the
safetensors headers of the base and of the final checkpoint, decides for every tensor where
it comes from (frozen components from the base, bit for bit; trained ones from the
checkpoint), and copies each tensor in chunks of `CHUNK_BYTES`, cast to the export dtype, into
shards it writes itself. Peak memory is the Python process plus two chunks, whatever the
model's size.

Key names: checkpoints name tensors either as the architecture does in transformers 5
(`model.language_model.*`, `model.visual.*`, `lm_head.*`) or in the original Qwen2.5-VL
layout (`model.layers.*`, `visual.*`); `canonical` maps both to the first. The output keeps
the base's own names, so tooling that loaded the base loads the export. A trainable tensor
missing from the checkpoint, a checkpoint tensor the base does not have, or a shape that
differs is an error: nothing is exported half right.

The safetensors format (https://github.com/huggingface/safetensors): 8 bytes little-endian
header length, a JSON header {name: {dtype, shape, data_offsets: [begin, end]}} padded with
spaces to a multiple of 8, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from cmevlm.model import layout
from cmevlm.train.freeze import component

CHUNK_BYTES = 64 * 2**20
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")

# safetensors dtype name -> (torch dtype name, bytes per element)
ST_DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2),
             "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
             "BOOL": ("bool", 1)}
ST_NAME = {torch_name: st for st, (torch_name, _) in ST_DTYPES.items()}
FLOATS = ("F64", "F32", "BF16", "F16")


class ExportError(RuntimeError):
    """The trained weights do not fit the base's architecture (names or shapes)."""


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Unlike getrusage's ru_maxrss, it starts
    afresh at exec, so a child of a big process does not inherit its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# Reading


def read_header(path: Path) -> dict[str, TensorRef]:
    """Every tensor of one safetensors file, without reading any tensor."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {k: TensorRef(path, k, v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def read_tensors(model_dir: Path) -> dict[str, TensorRef]:
    """Every tensor of a model directory's safetensors files, by the name it is saved under."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no safetensors weights")
    refs: dict[str, TensorRef] = {}
    for f in files:
        refs.update(read_header(f))
    return refs


def canonical(key: str) -> str:
    """A checkpoint key in the architecture's own naming (transformers 5 Qwen2.5-VL)."""
    while key.startswith("model.model."):  # a wrapped model saved with its wrapper's prefix
        key = key[len("model."):]
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


# ---------------------------------------------------------------------------------------------
# Deciding


def select(base: dict[str, TensorRef], trained: dict[str, TensorRef], frozen: set[str], tied: bool) -> list[tuple[str, TensorRef]]:
    """(output key, source) per base tensor: the base's for frozen components, the checkpoint's
    otherwise. Raises ExportError on missing, unexpected or reshaped tensors."""
    by_name = {canonical(k): ref for k, ref in trained.items()}
    base_names = {canonical(k) for k in base}
    unexpected = sorted(k for k in by_name if k not in base_names and not (tied and k == "lm_head.weight"))
    out, missing, reshaped = [], [], []
    for key, ref in base.items():
        name = canonical(key)
        if component(name) in frozen:
            out.append((key, ref))
        elif name not in by_name:
            missing.append(name)
        elif by_name[name].shape != ref.shape:
            reshaped.append(f"{name} {list(by_name[name].shape)} != {list(ref.shape)}")
        else:
            out.append((key, by_name[name]))
    wrong = {"missing": missing, "unexpected": unexpected, "shapes": reshaped}
    if any(wrong.values()):
        raise ExportError("trained weights do not match the architecture: "
                          + "; ".join(f"{len(v)} {k} {v[:5]}" for k, v in wrong.items() if v))
    return out


def out_dtype(ref: TensorRef, dtype: str) -> str:
    """The safetensors dtype a tensor is written in: floats in the export dtype, the rest as they are."""
    return ST_NAME[dtype] if ref.dtype in FLOATS else ref.dtype


def shards(items: list[tuple[str, TensorRef]], dtype: str, shard_bytes: int) -> list[list[tuple[str, TensorRef]]]:
    """Consecutive groups of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    groups: list[list] = [[]]
    size = 0
    for key, ref in items:
        n = ref.numel * ST_DTYPES[out_dtype(ref, dtype)][1]
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, ref))
        size += n
    return groups


# ---------------------------------------------------------------------------------------------
# Writing


def write_shard(path: Path, items: list[tuple[str, TensorRef]], dtype: str) -> int:
    """One safetensors file, each tensor copied chunk by chunk; returns its data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, ref in items:
        st = out_dtype(ref, dtype)
        n = ref.numel * ST_DTYPES[st][1]
        header[key] = {"dtype": st, "shape": list(ref.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, ref in items:
            copy_tensor(ref, f, header[key]["dtype"])
    return offset


def copy_tensor(ref: TensorRef, out, st_dtype: str) -> None:
    """Append one tensor to `out`, converted to `st_dtype`, `CHUNK_BYTES` of source at a time."""
    import torch

    src_t, size = ST_DTYPES[ref.dtype]
    dst_t = ST_DTYPES[st_dtype][0]
    step = max(size, CHUNK_BYTES // size * size)
    buf = bytearray(step)
    with open(ref.path, "rb") as f:
        f.seek(ref.start)
        left = ref.end - ref.start
        while left > 0:
            n = min(step, left)
            view = memoryview(buf)[:n]
            if f.readinto(view) != n:
                raise ExportError(f"{ref.path} ends inside tensor {ref.key}")
            chunk = torch.frombuffer(view, dtype=getattr(torch, src_t))
            if dst_t != src_t:
                chunk = chunk.to(getattr(torch, dst_t))
            out.write(chunk.view(torch.uint8).numpy().data)
            left -= n


def write_config(base_dir: Path, out_dir: Path, dtype: str) -> None:
    """The base's config.json, saying the weights' dtype (transformers 5 reads `dtype`, older
    tooling `torch_dtype`)."""
    config = json.loads((base_dir / "config.json").read_text())
    for section in (config, config.get("text_config"), config.get("vision_config")):
        if isinstance(section, dict):
            section["dtype"] = dtype
            section["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(base_dir: Path, out_dir: Path) -> None:
    """Processor, tokenizer, chat templates, generation config: everything but weights and config
    (then brought to the real repo's split by `layout.normalise`)."""
    weights = {p for pattern in WEIGHT_FILES for p in base_dir.glob(pattern)}
    for p in base_dir.iterdir():
        if p.is_file() and p not in weights and p.name != "config.json":
            shutil.copy(p, out_dir / p.name)


def export_dir(base_dir: Path, trained_dir: Path, out_dir: Path, frozen: set[str], dtype: str = "bfloat16",
               shard_bytes: int = 4 * 2**30) -> dict:
    """Write the exported model to `out_dir`; returns {tensors, bytes, shards, from_base, from_trained}."""
    base_dir, trained_dir, out_dir = Path(base_dir), Path(trained_dir), Path(out_dir)
    tied = bool(json.loads((base_dir / "config.json").read_text()).get("tie_word_embeddings"))
    items = select(read_tensors(base_dir), read_tensors(trained_dir), frozen, tied)
    groups = shards(items, dtype, shard_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["model.safetensors"] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    total = sum(write_shard(out_dir / name, group, dtype) for name, group in zip(names, groups))
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: name for name, g in zip(names, groups) for k, _ in g}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(base_dir, out_dir, dtype)
    copy_side_files(base_dir, out_dir)
    layout.normalise(out_dir)
    from_base = sum(1 for _, ref in items if ref.path.parent == base_dir)
    return {"tensors": len(items), "bytes": total, "shards": len(groups), "from_base": from_base,
            "from_trained": len(items) - from_base, "dtype": dtype}

"""Load Qwen2.5-VL models and processors from a local folder or an `s3://` prefix.

Without torchvision (these CPU machines cannot have it) `AutoProcessor` cannot build a
Qwen2.5-VL processor, because its video processor needs torchvision; `load_processor` builds
`Qwen2_5_VLProcessor` from the tokenizer and the PIL image processor instead, and saved
processors name `Qwen2_5_VLProcessor` so standard tooling (vLLM, AutoProcessor with
torchvision) loads them too.
"""

from __future__ import annotations

from pathlib import Path

from cmevlm.config import StorageConfig
from cmevlm.errors import ConfigError, MissingInput
from cmevlm.model import adapters, layout
from cmevlm.storage import Storage


def _processor_class():
    """Qwen2_5_VLProcessor with no video processor, for machines without torchvision.

    transformers checks and saves every sub-processor named in `__init__`, and without
    torchvision the video processor's class is a dummy, so both crash on `video_processor=None`.
    This subclass declares only the image processor and the tokenizer, and keeps the parent's
    name, so saved processors say `processor_class: Qwen2_5_VLProcessor` and real tooling
    (vLLM, AutoProcessor where torchvision exists) loads them as the real class."""
    from transformers import Qwen2_5_VLProcessor

    class _Processor(Qwen2_5_VLProcessor):
        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    _Processor.__name__ = _Processor.__qualname__ = "Qwen2_5_VLProcessor"
    return _Processor


def make_processor(tokenizer, min_pixels: int = layout.REAL_MIN_PIXELS, max_pixels: int = layout.REAL_MAX_PIXELS,
                   chat_template: str | None = None):
    """A Qwen2_5_VLProcessor from a tokenizer and the PIL image processor (no video); the chat
    template defaults to Qwen2.5-VL's own (the real repo's chat_template.json, as TRL ships it)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                               image_mean=layout.CLIP_MEAN, image_std=layout.CLIP_STD)
    return _processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=chat_template or layout.reference_templates()[1],
    )


def local_model_dir(uri: str, storage: StorageConfig | None = None) -> Path:
    """A local folder holding the model: the path itself, or a cached copy of an s3:// prefix."""
    path = Storage(storage).local_dir(uri)
    if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
        raise MissingInput(f"{uri} is not a Hugging Face model or adapter directory (no config.json, no adapter_config.json)")
    return path


def load_processor(uri: str, storage: StorageConfig | None = None):
    """The processor saved with a model (tokenizer, image processor, the processor's chat
    template found as transformers finds it: cmevlm.model.layout)."""
    from transformers import AutoTokenizer

    path = local_model_dir(uri, storage)
    tokenizer = AutoTokenizer.from_pretrained(path)
    pixels = layout.image_processor_settings(path)
    processor = make_processor(tokenizer, chat_template=layout.find_chat_template(path, tokenizer), **pixels)
    tokenizer.padding_side = "left"  # batched generation needs left padding
    return processor


DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTENTION = ("sdpa", "flash_attention_2", "eager")


def resolve_dtype(name: str, device: str):
    """A torch dtype from a config name: `auto` = bfloat16 on a GPU, float32 on CPU (CPUs here
    have no fast bf16 kernels; a 7B model in bf16 is 15.4 GiB, in fp32 30.9 GiB)."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r} (one of {', '.join(DTYPES)})")
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def resolve_attention(name: str) -> str:
    """The attention implementation; flash_attention_2 only where its package imports."""
    import importlib.util

    if name not in ATTENTION:
        raise ConfigError(f"unknown attention implementation {name!r} (one of {', '.join(ATTENTION)})")
    if name == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation=flash_attention_2 needs the flash-attn package (GPU image); use sdpa")
    return name


def inference_device(num_gpus: float) -> str:
    """cuda when the stage asks Ray for a GPU and one is visible, else cpu."""
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def load_model(uri: str, storage: StorageConfig | None = None, dtype: str = "float32", device: str = "cpu",
               attn: str = "sdpa"):
    """`Qwen2_5_VLForConditionalGeneration` from a local folder or s3:// prefix, in `dtype`
    (a name of DTYPES), with attention `attn`, moved to `device`, in eval mode. An adapter
    directory (cmevlm.model.adapters) gives its merged model: `merged/` when the export wrote
    one, else its base (loaded the same way, so an adapter on an adapter works) + the adapter."""
    from transformers import AutoModelForImageTextToText

    path = local_model_dir(uri, storage)
    if adapters.is_adapter_dir(path):
        if (path / adapters.MERGED / "config.json").exists():
            return load_model(str(path / adapters.MERGED), None, dtype, device, attn)
        base = load_model(adapters.base_of(path), storage, dtype, "cpu", attn)
        return adapters.apply_adapter(base, path).to(device).eval()
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=resolve_dtype(dtype, device), attn_implementation=resolve_attention(attn))
    return model.to(device).eval()


def image_geometry(cfg, uri: str) -> tuple[int, str]:
    """(side, pad|crop) of the square images the model at `uri` was trained on (recorded at
    export; the run's data.image_size / data.resize for a model without the record)."""
    return layout.training_images(local_model_dir(uri, cfg.storage), cfg.data.image_size, cfg.data.resize)


def load(cfg, uri: str, dtype: str = "auto", num_gpus: float = 0, device: str | None = None):
    """The one way a stage loads a model: (model, processor) from `uri` with the run's storage,
    attention implementation and the stage's dtype, on a GPU when the stage has one."""
    device = device or inference_device(num_gpus)
    model = load_model(uri, cfg.storage, dtype=dtype, device=device, attn=cfg.model.attn_implementation)
    return model, load_processor(uri, cfg.storage)

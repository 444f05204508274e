"""A tiny random-weight Qwen2.5-VL (same architecture as the real one) and a tokenizer trained here.

Tests and the demo cannot download weights, so they build this: ~0.7M parameters, a byte-level
BPE tokenizer trained on CME text with the Qwen special tokens after the BPE vocabulary (as in
real Qwen, so a pad id is never 0), saved as the real Qwen2.5-VL-7B-Instruct repo lays out its
files (cmevlm.model.layout). The number of image tokens follows the image: a side of 28k pixels
gives k^2 tokens, e.g. 168 x 168 -> 36.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from cmevlm.errors import ConfigError
from cmevlm.model import layout

# Qwen2.5-VL special tokens, in the order real Qwen appends them after the BPE vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

CHAT_WORDS = (
    "system", "user", "assistant", "You are a helpful assistant.",
    "You are an expert colorectal surgeon.", "Identify the highlighted anatomical structure",
    "and explain its significance for Complete Mesocolic Excision.", "highlighted in green",
)


def default_corpus() -> list[str]:
    """The domain text the tokenizer learns its merges from."""
    from cmevlm.anatomy import corpus_lines

    return [*corpus_lines(), *CHAT_WORDS]


def train_tokenizer(lines: Iterable[str], vocab_size: int = 2048):
    """A byte-level BPE `Qwen2Tokenizer` trained on `lines`, Qwen special tokens appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(list(lines), trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return Qwen2Tokenizer(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)


def tiny_config(tokenizer, hidden: int = 128, layers: int = 2, vision_hidden: int = 64, vision_depth: int = 2):
    """A Qwen2_5_VLConfig a few MB in size; the text head_dim is hidden / heads = 32."""
    from transformers import Qwen2_5_VLConfig

    heads = max(1, hidden // 32)
    head_dim = hidden // heads
    # M-RoPE splits head_dim / 2 frequencies over (temporal, height, width).
    half = head_dim // 2
    mrope = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]  # real Qwen: [16, 24, 24] of 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": max(1, heads // 2),
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_hidden * 2,
            "num_heads": max(1, vision_hidden // 32),
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def like_config(tokenizer, like: dict, layers: int, vision_depth: int):
    """A real config (e.g. configs/models/qwen2.5-vl-7b-instruct.json) with its widths, vocabulary
    size and everything else kept, but `layers` decoder layers and `vision_depth` vision blocks,
    and the special token ids of the local tokenizer (whose vocabulary is smaller than the
    config's, as real Qwen's is: its embedding rows past the tokenizer are padding)."""
    import copy

    from transformers import Qwen2_5_VLConfig

    c = copy.deepcopy(like)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    tokens = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
              "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
              "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
              "vision_token_id": ids["<|vision_pad|>"]}
    for section in (c, c.get("text_config")):
        if isinstance(section, dict):
            section.update(num_hidden_layers=layers, max_window_layers=min(section.get("max_window_layers", layers), layers))
            section.pop("layer_types", None)
            section.update({k: v for k, v in tokens.items() if k in section or section is c})
    v = c["vision_config"]
    v["depth"] = vision_depth
    v["fullatt_block_indexes"] = [i for i in v.get("fullatt_block_indexes", []) if i < vision_depth] or [vision_depth - 1]
    if c.get("vocab_size", 0) < len(tokenizer):
        raise ConfigError(f"the config's vocabulary ({c.get('vocab_size')}) is smaller than the tokenizer's ({len(tokenizer)})")
    return Qwen2_5_VLConfig.from_dict(c)


def build_tiny_model(
    out: str | Path,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    max_pixels: int | None = None,
    hidden: int = 128,
    layers: int = 2,
    vision_hidden: int = 64,
    vision_depth: int = 2,
    vocab_size: int = 2048,
    like: dict | None = None,
) -> Path:
    """Build, save and return the directory of a tiny Qwen2.5-VL in the real repo's layout
    (cmevlm.model.layout: its files, template split, generation and preprocessor settings,
    sharded weights). The image tokens per image follow the image size (`data.image_size`:
    168 px -> 36); `max_pixels` other than the real one caps them and is then a deviation from
    the real preprocessor_config.json. With `like` (a real config.json's dict), a random model
    of that config's widths with `layers` decoder layers and `vision_depth` vision blocks, in
    bfloat16 (7B widths, 2 + 2: ~1.6 B parameters, 3.2 GB, mostly the two 152064 x 3584
    embedding matrices)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from cmevlm.model.loading import make_processor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([*default_corpus(), *(corpus or ())], vocab_size=vocab_size)
    text_template, image_template = layout.reference_templates()
    tokenizer.chat_template = text_template
    processor = make_processor(tokenizer, max_pixels=max_pixels or layout.REAL_MAX_PIXELS, chat_template=image_template)
    torch.manual_seed(seed)
    if like is not None:
        cfg = like_config(tokenizer, like, layers, vision_depth)
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16).eval()
    else:
        cfg = tiny_config(tokenizer, hidden=hidden, layers=layers, vision_hidden=vision_hidden, vision_depth=vision_depth)
        model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    save_like_real_repo(model, processor, out)
    return out


def save_like_real_repo(model, processor, out: Path, shards: int = 5) -> None:
    """Weights in `shards` safetensors files with their index, the real generation_config.json,
    the processor in the real split, vocab.json + merges.txt, a model card and .gitattributes."""
    from transformers import GenerationConfig

    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
    model.generation_config = GenerationConfig(**layout.real_generation_config(
        bos=ids["<|endoftext|>"], eos=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad=ids["<|endoftext|>"]))
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(out, max_shard_size=max(1, total // (shards - 1) if shards > 1 else total + 1))
    layout.save_processor(processor, out)
    tok.backend_tokenizer.model.save(str(out))  # vocab.json, merges.txt
    (out / "README.md").write_text("# Random Qwen2.5-VL\n\nRandom weights with the architecture of Qwen2.5-VL, built by "
                                   "`cmevlm tiny-model` for offline tests; laid out as Qwen/Qwen2.5-VL-7B-Instruct is.\n")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\ntokenizer.json filter=lfs diff=lfs merge=lfs -text\n")

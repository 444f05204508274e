#!/usr/bin/env bash
# GPU smoke test of the SFT stage at real scale: 20 steps of a randomly initialised Qwen2.5-VL
# with the real 3B or 7B configuration (no weights needed), bf16, DeepSpeed ZeRO-3, one GPU.
# Prints tokens/s/GPU, MFU and peak GPU memory. Run it only on a machine with a GPU:
#
#   bash bench/gpu/train_smoke.sh [3b|7b] [STEPS]
#
# It needs the project installed with a CUDA torch (the Dockerfile's image, or
# `pip install torch` + requirements.lock) and writes under ${OUT:-/tmp/cmevlm-gpu-smoke}.
set -euo pipefail
SIZE=${1:-3b}
STEPS=${2:-20}
OUT=${OUT:-/tmp/cmevlm-gpu-smoke}
PY=${PY:-python}
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."

"$PY" - "$SIZE" "$STEPS" "$OUT" <<'PYEOF'
import json, sys, time
from pathlib import Path

size, steps, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from cmevlm import ingest, teach
from cmevlm.config import load_config
from cmevlm.data.synth import write_dataset
from cmevlm.model.loading import make_processor
from cmevlm.model.tiny import tiny_config, train_tokenizer, default_corpus
from cmevlm.train import sft

# The published Qwen2.5-VL configurations (text / vision), weights random.
REAL = {
    "3b": dict(hidden=2048, layers=36, heads=16, kv=2, inter=11008, vocab=151936),
    "7b": dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=152064),
}[size]
tok = train_tokenizer(default_corpus())
cfg = tiny_config(tok)
t = cfg.text_config
t.hidden_size, t.num_hidden_layers, t.num_attention_heads = REAL["hidden"], REAL["layers"], REAL["heads"]
t.num_key_value_heads, t.intermediate_size, t.vocab_size = REAL["kv"], REAL["inter"], REAL["vocab"]
t.rope_parameters = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
t.tie_word_embeddings = cfg.tie_word_embeddings = size == "3b"
v = cfg.vision_config
v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size = 32, 1280, 16, 3420, REAL["hidden"]
v.fullatt_block_indexes = [7, 15, 23, 31]
base = out / f"qwen2.5-vl-{size}-random"
if not (base / "config.json").exists():
    t0 = time.time()
    model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(base)
    make_processor(tok, min_pixels=56 * 56, max_pixels=448 * 448).save_pretrained(base)
    print(f"built {size}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params in {time.time() - t0:.0f} s", flush=True)
    del model

write_dataset(out / "src", procedures=8, frames_per_procedure=20, seed=0)
run = load_config(overrides=[
    f"workdir={out}/run-{size}", f"sources=[{{uri: '{out}/src'}}]",
    f"model.base={base}", "data.image_size=448", "teacher.backend=offline",
    "sft.num_workers=1", "sft.use_gpu=true", "sft.resources_per_worker={CPU: 8, GPU: 1}", "sft.bf16=true",
    "sft.zero_stage=3", f"sft.max_steps={steps}", "sft.per_device_batch_size=4", "sft.effective_batch_size=4",
    "sft.lr=2e-5", f"sft.checkpoint_every={steps * 10}", "ray.num_cpus=12",
])
ingest.run(run)
teach.run(run)
t0 = time.time()
sft.run(run, force=True)
wall = time.time() - t0
rows = [json.loads(x) for x in (Path(run.workdir) / "models/sft/metrics.jsonl").read_text().splitlines()]
steady = [r for r in rows if r["step"] > 3]
tok_s = sorted(r["tokens_per_s"] for r in steady if r.get("tokens_per_s"))[len(steady) // 2]
params = json.loads((Path(run.workdir) / "models/sft/training_args.json").read_text())["parameters"]
n_total = sum(c["total"] for c in params.values())
n_train = sum(c["trainable"] for c in params.values())
# 6 N flops per token for trained weights (fwd + bwd), 2 N for frozen ones (fwd only); H100/H200 bf16 dense peak 989 TFLOP/s.
flops = (6 * n_train + 2 * (n_total - n_train)) * tok_s
peak = max(r.get("gpu_peak_mem_gb", 0) for r in rows)
print(json.dumps({"size": size, "steps": len(rows), "params_b": round(n_total / 1e9, 2), "tokens_per_s_per_gpu": round(tok_s, 1),
                  "mfu": round(flops / 989e12, 4), "peak_gpu_mem_gb": round(peak, 1), "stage_wall_s": round(wall, 1)}))
PYEOF

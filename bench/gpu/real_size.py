"""Real size on one GPU, with torch and transformers only: no Ray, DeepSpeed, TRL, network or
weights (random models from the public configs in configs/models/). At most ~10 minutes.

1. Serving path: Qwen2.5-VL-7B in bf16 with sdpa, a 448 px image (256 image tokens) and a
   96-token prompt; generate 64 tokens at batch 1 and 8. Peak memory (must fit the 24 GB RTX
   4090 pool) and tokens/s.
2. Training: a few steps of the 3B (or --train-model 7b) with gradient checkpointing, the vision
   encoder frozen, fp32 weights under bf16 autocast and fused AdamW (the plan's ZeRO 0 case),
   batch 4 of 610 tokens. Tokens/s, MFU, peak memory.

Each peak (torch.cuda.max_memory_allocated) is compared with `cmevlm plan`'s estimate for the
same settings, less the plan's fixed per-process overhead (target: within 15 %). Training is
compared phase by phase (docs/plan.md, "Phases"): the forward peak with the plan's weights,
optimiser, autocast copies, activations and logits; the backward + step peak with its weights,
optimiser, gradients, activations and logits; the plan's sum of all parts is an upper bound
that no phase reaches. Make the two plans where cmevlm is installed and carry them along:

    cmevlm plan --config bench/gpu/plan.yaml --json > .gpu/plan-7b.json
    cmevlm plan --config bench/gpu/plan.yaml --set model.config_json=configs/models/qwen2.5-vl-3b-instruct.json --json > .gpu/plan-3b.json
    python bench/gpu/real_size.py --plan-7b .gpu/plan-7b.json --plan-3b .gpu/plan-3b.json --out $OUT/real_size.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent.parent
IMAGE_SIZE, PROMPT_TOKENS, ANSWER_TOKENS, NEW_TOKENS = 448, 96, 256, 64  # as in bench/gpu/plan.yaml
# Every decoding setting stated (a model's generation_config.json fills whatever is left unset).
GREEDY = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def random_model(size: str, dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig.from_dict(json.loads((REPO / "configs" / "models" / f"qwen2.5-vl-{size}-instruct.json").read_text()))
    with torch.device("cuda"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model, config


def batch_inputs(config, batch: int, text_tokens: int, device: str = "cuda") -> dict:
    """Token ids as the processor lays them out (vision start, image pads, vision end, text),
    random pixel patches and the image grid: no tokenizer or processor needed."""
    side = IMAGE_SIZE // config.vision_config.patch_size
    image_tokens = (side // config.vision_config.spatial_merge_size) ** 2
    text = torch.randint(0, 150000, (batch, text_tokens))
    ids = torch.cat([torch.full((batch, 1), config.vision_start_token_id), torch.full((batch, image_tokens), config.image_token_id),
                     torch.full((batch, 1), config.vision_end_token_id), text], dim=1)
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size ** 2
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch * side * side, patch_dim, device=device, dtype=torch.bfloat16),
            "image_grid_thw": torch.tensor([[1, side, side]] * batch, device=device)}


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def serving(results: dict) -> None:
    model, config = random_model("7b", torch.bfloat16)
    model.eval()
    results["serve"] = {"weights_gib": gib(torch.cuda.memory_allocated())}
    for batch in (1, 8):
        inputs = batch_inputs(config, batch, PROMPT_TOKENS)
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, **GREEDY)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **GREEDY)
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        results["serve"][f"batch_{batch}"] = {"tokens_per_s": round(batch * NEW_TOKENS / dt, 1), "seconds": round(dt, 2),
                                              "peak_gib": gib(torch.cuda.max_memory_allocated())}
    del model
    torch.cuda.empty_cache()


def training(results: dict, size: str, steps: int, peak_tflops: float) -> None:
    model, config = random_model(size, torch.float32)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_(not (".visual." in f".{name}" and ".merger." not in name))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    inputs = batch_inputs(config, 4, PROMPT_TOKENS + ANSWER_TOKENS)
    tokens = inputs["input_ids"].numel()
    times, forward_peak, backward_peak = [], 0, 0
    for step in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
        torch.cuda.synchronize()
        forward_peak = max(forward_peak, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        backward_peak = max(backward_peak, torch.cuda.max_memory_allocated())
        times.append(time.perf_counter() - t0)
    dt = sum(times[2:]) / max(1, len(times) - 2)  # after two warm-up steps
    lm = sum(p.numel() for n, p in model.named_parameters() if ".visual." not in f".{n}")
    flops = 6 * lm * tokens  # forward + backward of the language model (recompute not counted: MFU, not HFU)
    results["train"] = {"model": size, "tokens_per_step": tokens, "tokens_per_s": round(tokens / dt, 1), "step_s": round(dt, 3),
                        "mfu": round(flops / dt / (peak_tflops * 1e12), 3), "peak_gib": gib(max(forward_peak, backward_peak)),
                        "forward_peak_gib": gib(forward_peak), "backward_peak_gib": gib(backward_peak),
                        "loss": round(loss.item(), 3)}


# The parts of a training plan alive in each phase of a step (docs/plan.md, "Phases"). Forward:
# autocast's bf16 weight copies are cached, no gradient exists yet (zeroed to None after each step).
# Backward + step: the gradients grow while the activations are freed; autocast's copies are gone
# (its cache is dropped when the autocast block ends; recomputation makes them one layer at a time).
ALWAYS = ("weights", "optimizer", "gather buffer", "reference")
FORWARD = ALWAYS + ("autocast copies", "activations", "logits")
BACKWARD = ALWAYS + ("gradients", "activations", "logits")


def phase_estimates(parts_gib: dict) -> dict:
    """{forward, backward, peak} in GiB from a plan stage's parts (overhead left out: the
    allocator's peak does not see the CUDA context)."""
    fwd = sum(v for k, v in parts_gib.items() if k in FORWARD)
    bwd = sum(v for k, v in parts_gib.items() if k in BACKWARD)
    return {"forward": round(fwd, 2), "backward": round(bwd, 2), "peak": round(max(fwd, bwd), 2)}


def compare(results: dict, plan_file: str | None, stage: str, key: str) -> None:
    """measured peak / the plan's estimate (less its overhead: the allocator's peak excludes the
    CUDA context); training phase by phase."""
    if not plan_file:
        return
    plan = json.loads(Path(plan_file).read_text())
    st = next(s for s in plan["stages"] if s["stage"] == stage)
    r = results[key]
    if key == "serve":
        estimate = st["need_gib"] - st["parts_gib"].get("overhead", 0)
        r["plan_estimate_gib"] = round(estimate, 2)
        r["measured_over_plan"] = round(r["batch_8"]["peak_gib"] / estimate, 3)
        return
    phases = phase_estimates(st["parts_gib"])
    r["plan_phases_gib"] = phases
    r["plan_sum_of_parts_gib"] = round(st["need_gib"] - st["parts_gib"].get("overhead", 0), 2)
    r["forward_over_plan"] = round(r["forward_peak_gib"] / phases["forward"], 3)
    r["backward_over_plan"] = round(r["backward_peak_gib"] / phases["backward"], 3)
    r["measured_over_plan"] = round(r["peak_gib"] / phases["peak"], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-7b", help="cmevlm plan --json of bench/gpu/plan.yaml (7B)")
    ap.add_argument("--plan-3b", help="the same with the 3B config (for --train-model 3b)")
    ap.add_argument("--train-model", choices=["3b", "7b"], default="3b")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    ap.add_argument("--out", default="real_size.json")
    args = ap.parse_args()
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    serving(results)
    compare(results, args.plan_7b, "serve", "serve")
    training(results, args.train_model, args.steps, args.peak_tflops)
    compare(results, args.plan_3b if args.train_model == "3b" else args.plan_7b, "sft", "train")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

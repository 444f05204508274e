"""What a training worker records per logging step. Imported inside Ray Train workers only
(it imports transformers), never by the driver's stage code."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class MetricsCallback(TrainerCallback):
    """Per logging step: loss, lr, grad norm, samples/s and tokens/s, DPO's rewards and
    log-probs, peak GPU memory (rank 0 keeps the rows)."""

    def __init__(self, examples_per_step: int):
        self.examples_per_step = examples_per_step
        self.rows, self.last_time, self.last_step, self.last_tokens = [], time.time(), 0, 0

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        now = time.time()
        dt, steps = max(now - self.last_time, 1e-9), state.global_step - self.last_step
        tokens = logs.get("num_tokens", 0) or 0
        self.rows.append({
            "step": state.global_step, "loss": logs.get("loss"), "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"), "samples_per_s": steps * self.examples_per_step / dt,
            "tokens_per_s": (tokens - self.last_tokens) / dt if tokens else None,
            **{k: v for k, v in logs.items() if k.startswith("rewards/") or k in ("logps/chosen", "logps/rejected")},
            **gpu_memory(),
        })
        self.last_time, self.last_step, self.last_tokens = now, state.global_step, tokens


def gpu_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu_peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}

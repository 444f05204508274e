"""Five-way sampling throughput: batched (the stage's path) vs naive one-call-per-answer.

    .venv/bin/python bench/sample.py [--items 64] [--max-new-tokens 48] [--batch 16]

Both generate five answers per item with the same five settings and max_new_tokens on the tiny
Qwen2.5-VL: (a) naive, one `generate` per item per setting; (b) `cmevlm.sample.sample_items`,
one left-padded `generate` per setting over a batch of items. Prints new tokens/s of each and
the ratio (target >= 3x on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cmevlm.cluster import apply_env_defaults  # noqa: E402  (before torch and Ray)

apply_env_defaults()

from cmevlm.config import RunConfig, SampleConfig  # noqa: E402
from cmevlm.data.composite import build_composite, encode_png  # noqa: E402
from cmevlm.data.synth import render_frame  # noqa: E402
from cmevlm.model.generate import Setting, decode_image, generate  # noqa: E402
from cmevlm.model.loading import load  # noqa: E402
from cmevlm.model.tiny import build_tiny_model  # noqa: E402
from cmevlm.sample import sample_items  # noqa: E402
from cmevlm.instructions import TEMPLATES  # noqa: E402


def items(n: int) -> list[dict]:
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        frame, masks = render_frame(rng, ["pancreas", "duodenum"], "left" if i % 2 else "right", np.zeros(3, np.float32))
        comp, _ = build_composite(frame, masks["pancreas"], 168, "pad", (0, 255, 0), 0.4)
        out.append({"item_id": f"i{i}", "image": encode_png(comp), "prompt": TEMPLATES[i % len(TEMPLATES)].text})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=16, help="items per generate call in (b)")
    args = ap.parse_args()

    path = build_tiny_model(Path(tempfile.mkdtemp()) / "m", max_pixels=168 * 168)
    model, proc = load(RunConfig(), str(path))
    settings = [Setting.of(s) for s in SampleConfig().settings]
    data = items(args.items)

    t0 = time.perf_counter()
    naive_tokens = 0
    for it in data:
        img = decode_image(it["image"])
        for s in settings:
            naive_tokens += generate(model, proc, [img], [it["prompt"]], args.max_new_tokens, s)[0][1]
    dt_a = time.perf_counter() - t0

    t0 = time.perf_counter()
    batched_tokens = 0
    for i in range(0, len(data), args.batch):
        for row in sample_items(model, proc, data[i:i + args.batch], settings, args.max_new_tokens):
            batched_tokens += sum(a["n_tokens"] for a in row["answers"])
    dt_b = time.perf_counter() - t0

    a, b = naive_tokens / dt_a, batched_tokens / dt_b
    print(f"items={args.items} answers={5 * args.items} max_new_tokens={args.max_new_tokens} batch={args.batch}")
    print(f"(a) naive, one call per answer : {a:8.1f} tokens/s ({naive_tokens} tokens, {dt_a:.1f} s)")
    print(f"(b) batched, one call per setting: {b:8.1f} tokens/s ({batched_tokens} tokens, {dt_b:.1f} s)")
    print(f"ratio (b)/(a)                  : {b / a:.2f}x")


if __name__ == "__main__":
    main()

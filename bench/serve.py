"""Serving: the Ray Serve endpoint vs calling model.generate in-process, and batching.

    .venv/bin/python bench/serve.py [--requests 32] [--max-tokens 32]

(a) in-process `generate` of the tiny Qwen2.5-VL, one request at a time; (b) the same prompts
and max_tokens through the endpoint (HTTP, base64 image, Serve routing) at concurrency 1 and
16; (c) concurrency 16 with max_batch_size=1. Prints p50/p99 latency and requests/s, the
overhead ratio at concurrency 1 (target <= 1.15) and the throughput gain of batching at 16
(target >= 2x).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "tests")]
from cmevlm.cluster import apply_env_defaults  # noqa: E402  (before torch and Ray)

apply_env_defaults()

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cmevlm.config import load_config  # noqa: E402
from cmevlm.data.synth import render_frame  # noqa: E402
from cmevlm.model.generate import generate_chat  # noqa: E402
from cmevlm.model.loading import load as load_model  # noqa: E402
from cmevlm.model.tiny import build_tiny_model  # noqa: E402
from conftest import free_port  # noqa: E402

PROMPT = "Identify the highlighted anatomical structure and explain its significance for Complete Mesocolic Excision."


def stats(lat: list[float], wall: float) -> str:
    lat = sorted(lat)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    return f"p50 {1000 * statistics.median(lat):7.1f} ms  p99 {1000 * p99:7.1f} ms  {len(lat) / wall:6.2f} req/s"


def load(url: str, body: bytes, n: int, concurrency: int) -> tuple[list[float], float]:
    def one(_):
        t = time.perf_counter()
        req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            json.loads(r.read())
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        lat = list(ex.map(one, range(n)))
    return lat, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-wait", type=float, default=0.005, help="serve.batch_wait_timeout_s (seconds a batch waits to fill)")
    args = ap.parse_args()

    model_dir = build_tiny_model(Path(tempfile.mkdtemp()) / "m", max_pixels=168 * 168)
    frame, _ = render_frame(np.random.default_rng(0), ["pancreas"], "left", np.zeros(3, np.float32))
    image = Image.fromarray(frame).resize((168, 168))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]

    model, proc = load_model(load_config(), str(model_dir))
    generate_chat(model, proc, [conv], [image], args.max_tokens)  # warm-up
    lat = []
    t0 = time.perf_counter()
    for _ in range(args.requests):
        t = time.perf_counter()
        generate_chat(model, proc, [conv], [Image.open(io.BytesIO(buf.getvalue())).convert("RGB")], args.max_tokens)
        lat.append(time.perf_counter() - t)
    inproc = (lat, time.perf_counter() - t0)

    from ray import serve

    from cmevlm.serve import app

    body = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                               {"type": "text", "text": PROMPT}]}], "max_tokens": args.max_tokens}).encode()
    results = {}
    for batch in (8, 1):
        port = free_port()
        cfg = load_config(overrides=[f"serve.model={model_dir}", f"serve.port={port}", f"serve.max_batch_size={batch}",
                                     f"serve.batch_wait_timeout_s={args.batch_wait}", "serve.num_cpus_per_replica=1", "data.image_size=168"])
        app.run(cfg, block=False)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        load(url, body, 2, 1)  # warm-up
        if batch == 8:
            results["c1"] = load(url, body, args.requests, 1)
        results[f"c16_b{batch}"] = load(url, body, 2 * args.requests, 16)
        serve.shutdown()

    print(f"requests={args.requests} max_tokens={args.max_tokens} (tiny Qwen2.5-VL, 36 image tokens, CPU)")
    print(f"(a) in-process generate, c=1 : {stats(*inproc)}")
    print(f"(b) endpoint, c=1            : {stats(*results['c1'])}")
    print(f"(b) endpoint, c=16, batch 8  : {stats(*results['c16_b8'])}")
    print(f"(c) endpoint, c=16, batch 1  : {stats(*results['c16_b1'])}")
    overhead = statistics.median(results["c1"][0]) / statistics.median(inproc[0])
    gain = (len(results["c16_b8"][0]) / results["c16_b8"][1]) / (len(results["c16_b1"][0]) / results["c16_b1"][1])
    print(f"overhead at c=1 (p50 endpoint / in-process): {overhead:.2f}")
    print(f"batching gain at c=16 (req/s batch 8 / batch 1): {gain:.2f}x")


if __name__ == "__main__":
    main()

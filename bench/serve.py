"""Serving: the Ray Serve endpoint vs calling model.generate in-process, batching, and token
streaming.

    .venv/bin/python bench/serve.py [--model tiny|real-width] [--requests 32] [--max-tokens 32]

--model tiny: the tiny Qwen2.5-VL (36 image tokens); --model real-width: a random model with
Qwen2.5-VL-7B's widths and 2 + 2 layers in bf16 (hidden 3584, vocabulary 152064: generation is
not 50 ms there). (a) in-process `generate`, one request at a time; (b) the same prompts and
max_tokens through the endpoint (HTTP, base64 image, Serve routing) at concurrency 1 and 16;
(c) concurrency 16 with max_batch_size=1; (d) time to the first streamed token vs a whole
non-streamed answer. Prints p50/p99 latency and requests/s, the overhead ratio at concurrency 1
(target <= 1.10 on the real-width model), the batching gain at 16 (target >= 2x) and the
time-to-first-token ratio.
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


HEADERS = {"Content-Type": "application/json"}


def load(url: str, body: bytes, n: int, concurrency: int) -> tuple[list[float], float]:
    def one(_):
        t = time.perf_counter()
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=HEADERS), timeout=600) as r:
            json.loads(r.read())
        return time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        lat = list(ex.map(one, range(n)))
    return lat, time.perf_counter() - t0


def first_token(url: str, body: dict, n: int) -> tuple[float, float]:
    """Median seconds to the first streamed content chunk, and to the whole non-streamed answer."""
    firsts, wholes = [], []
    for _ in range(n):
        t = time.perf_counter()
        req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), headers=HEADERS)
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                if line.startswith(b"data: {") and b'"content": ' in line and b'"role"' not in line:  # the first token's chunk
                    firsts.append(time.perf_counter() - t)
                    break
            r.read()
        wholes.append(load(url, json.dumps(body).encode(), 1, 1)[0][0])
    return statistics.median(firsts), statistics.median(wholes)


def build(kind: str) -> tuple[Path, int]:
    """(model folder, image side) for --model."""
    out = Path(tempfile.mkdtemp()) / "m"
    if kind == "tiny":
        return build_tiny_model(out, max_pixels=168 * 168), 168
    config = json.loads((Path(__file__).resolve().parent.parent / "configs/models/qwen2.5-vl-7b-instruct.json").read_text())
    return build_tiny_model(out, like=config, layers=2, vision_depth=2, max_pixels=112 * 112), 112


def in_process(model_dir: Path, dtype: str, conv, png: bytes, n: int, max_tokens: int) -> tuple[list[float], float]:
    model, proc = load_model(load_config(overrides=[f"serve.dtype={dtype}"]), str(model_dir), dtype=dtype)
    generate_chat(model, proc, [conv], [Image.open(io.BytesIO(png)).convert("RGB")], max_tokens)  # warm-up
    lat, t0 = [], time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        generate_chat(model, proc, [conv], [Image.open(io.BytesIO(png)).convert("RGB")], max_tokens)
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0


def through_serve(args, model_dir: Path, dtype: str, side: int, chat: dict) -> tuple[dict, tuple]:
    from ray import serve

    from cmevlm.serve import app

    body, results, ttft = json.dumps(chat).encode(), {}, None
    for batch in (8, 1):
        port = free_port()
        cfg = load_config(overrides=[f"serve.model={model_dir}", f"serve.port={port}", f"serve.max_batch_size={batch}", f"serve.dtype={dtype}",
                                     f"serve.batch_wait_timeout_s={args.batch_wait}", "serve.num_cpus_per_replica=1", f"data.image_size={side}"])
        app.run(cfg, block=False)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        load(url, body, 2, 1)  # warm-up
        if batch == 8:
            results["c1"] = load(url, body, args.requests, 1)
            ttft = first_token(url, {**chat, "temperature": 1.0, "seed": 1}, max(3, args.requests // 4))
        results[f"c16_b{batch}"] = load(url, body, 2 * args.requests, 16)
        serve.shutdown()
    return results, ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "real-width"], default="tiny")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-wait", type=float, default=0.005, help="serve.batch_wait_timeout_s (seconds a batch waits to fill)")
    args = ap.parse_args()

    model_dir, side = build(args.model)
    dtype = "bfloat16" if args.model == "real-width" else "float32"
    frame, _ = render_frame(np.random.default_rng(0), ["pancreas"], "left", np.zeros(3, np.float32))
    buf = io.BytesIO()
    Image.fromarray(frame).resize((side, side)).save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    chat = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": PROMPT}]}],
            "max_tokens": args.max_tokens}
    inproc = in_process(model_dir, dtype, conv, buf.getvalue(), args.requests, args.max_tokens)
    results, (ttft, whole) = through_serve(args, model_dir, dtype, side, chat)

    print(f"model={args.model} ({dtype}) requests={args.requests} max_tokens={args.max_tokens} image {side}x{side}, CPU")
    print(f"(a) in-process generate, c=1 : {stats(*inproc)}")
    print(f"(b) endpoint, c=1            : {stats(*results['c1'])}")
    print(f"(b) endpoint, c=16, batch 8  : {stats(*results['c16_b8'])}")
    print(f"(c) endpoint, c=16, batch 1  : {stats(*results['c16_b1'])}")
    overhead = statistics.median(results["c1"][0]) / statistics.median(inproc[0])
    gain = (len(results["c16_b8"][0]) / results["c16_b8"][1]) / (len(results["c16_b1"][0]) / results["c16_b1"][1])
    print(f"overhead at c=1 (p50 endpoint / in-process): {overhead:.2f}")
    print(f"batching gain at c=16 (req/s batch 8 / batch 1): {gain:.2f}x")
    print(f"(d) first streamed token {1000 * ttft:.0f} ms vs whole answer {1000 * whole:.0f} ms: {ttft / whole:.2f}")


if __name__ == "__main__":
    main()

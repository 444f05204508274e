"""Teacher throughput under a quota: the teach stage against a loopback Gemini server.

    .venv/bin/python bench/teacher.py [--frames 100] [--latency 0.2] [--rpm 600] [--concurrency 4]

The real google-genai SDK talks to a fake Gemini server with `--latency` seconds per request;
the stage's shared limiter holds `--rpm`. Prints the achieved requests/min as a fraction of the
limit (target >= 0.95), the requests repeated by a resumed (forced) rerun (target 0) and the
wall time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from cmevlm.cluster import apply_env_defaults  # noqa: E402  (before torch and Ray)

apply_env_defaults()

from cmevlm import ingest, teach  # noqa: E402
from cmevlm.config import load_config  # noqa: E402
from cmevlm.data.synth import write_dataset  # noqa: E402
from fake_llm import FakeLLM  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100, help="synthetic frames (~2 items each)")
    ap.add_argument("--latency", type=float, default=0.2, help="seconds the fake server takes per request")
    ap.add_argument("--rpm", type=float, default=600, help="the quota the limiter must hold")
    ap.add_argument("--concurrency", type=int, default=4, help="teacher actors")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-"))
    write_dataset(tmp / "src", procedures=max(1, args.frames // 10), frames_per_procedure=10, seed=0)
    with FakeLLM(latency=args.latency) as srv:
        overrides = [f"workdir={tmp / 'run'}", f"sources=[{{uri: '{tmp / 'src'}'}}]", "data.image_size=56",
                     "teacher.backend=gemini", f"teacher.base_url={srv.url}", f"teacher.rpm={args.rpm}",
                     f"teacher.concurrency={args.concurrency}", "teacher.batch_size=4"]
        cfg = load_config(overrides=overrides)
        ingest.run(cfg)
        t0 = time.perf_counter()
        m = teach.run(cfg)
        wall = time.perf_counter() - t0
        times = sorted(r["time"] for r in srv.requests)
        n = len(times)
        achieved = (n - 1) / (times[-1] - times[0]) * 60 if n > 1 else 0.0
        before = len(srv.requests)
        teach.run(cfg, force=True)
        repeated = len(srv.requests) - before

    print(f"items={m['train'] + m['test']} requests={n} latency={args.latency}s rpm_limit={args.rpm:.0f} concurrency={args.concurrency}")
    print(f"achieved           : {achieved:.1f} requests/min = {achieved / args.rpm:.3f} of the limit")
    print(f"repeated on resume : {repeated}")
    print(f"wall time          : {wall:.1f} s (teach stage, Ray already up after ingest)")


if __name__ == "__main__":
    main()

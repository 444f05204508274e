"""Ingest throughput: the Ray Data stage vs a single-process loop doing the identical work.

    .venv/bin/python bench/ingest.py [--frames 1000] [--image-size 448]

Both paths list the same sources, read the same files, run the same `process_frame` (decode,
validate, overlay, resize, PNG at the configured level, geometry) and write Parquet shards of
the same size; (a) in one process, (b) through `cmevlm.ingest.run` on a local Ray with the
config's actor pool. Ray's start-up is timed apart. Prints rows/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cmevlm.cluster import apply_env_defaults  # noqa: E402  (before torch and Ray)

apply_env_defaults()

import pyarrow as pa  # noqa: E402

from cmevlm import ingest  # noqa: E402
from cmevlm.config import load_config  # noqa: E402
from cmevlm.data.sources import list_sources  # noqa: E402
from cmevlm.data.splits import assign_splits  # noqa: E402
from cmevlm.data.synth import write_dataset  # noqa: E402
from cmevlm.storage import Storage, join  # noqa: E402


def single_process(cfg) -> int:
    """The stage's work in one process, no Ray."""
    st = Storage(cfg.storage)
    records, _, _ = list_sources(st, cfg.sources)
    per_proc = {}
    for r in records:
        per_proc.setdefault((r["site"], r["procedure_id"]), Counter()).update(m["structure"] for m in r["masks"])
    splits = assign_splits(per_proc, cfg.data.test_fraction, cfg.data.holdout_sites, cfg.data.split_seed)
    rows, shard, n = [], 0, 0
    out = join(cfg.workdir, "frames", "shards")

    def flush():
        nonlocal rows, shard
        good = [{k: r[k] for k in ingest.ROW_SCHEMA.names} for r in rows]
        st.write_parquet(join(out, f"part-{shard:05d}.parquet"), pa.Table.from_pylist(good, schema=ingest.ROW_SCHEMA))
        rows, shard = [], shard + 1

    for r in records:
        r["split"] = splits[(r["site"], r["procedure_id"])]
        outs = ingest.process_frame(r, st.read_bytes(r["frame_uri"]), [st.read_bytes(m["mask_uri"]) for m in r["masks"]], cfg)
        for o in outs:
            if o["reason"] is None:
                rows.append(o)
                n += 1
                if len(rows) == cfg.ingest.rows_per_shard:
                    flush()
    if rows:
        flush()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1000, help="synthetic frames (default 1000)")
    ap.add_argument("--image-size", type=int, default=448, help="composite side in pixels (default 448, the paper's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config overrides for the Ray path")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    per = 25
    write_dataset(tmp / "src", procedures=max(1, args.frames // per), frames_per_procedure=per, seed=0)
    base = [f"sources=[{{uri: '{tmp / 'src'}'}}]", f"data.image_size={args.image_size}"]

    cfg_a = load_config(overrides=[*base, f"workdir={tmp / 'a'}"])
    t = time.perf_counter()
    n_a = single_process(cfg_a)
    dt_a = time.perf_counter() - t

    cfg_b = load_config(overrides=[*base, f"workdir={tmp / 'b'}", *args.overrides])
    from cmevlm.cluster import connect

    t = time.perf_counter()
    connect(cfg_b.ray)
    startup = time.perf_counter() - t
    t = time.perf_counter()
    n_b = ingest.run(cfg_b)["accepted"]
    dt_b = time.perf_counter() - t
    assert n_a == n_b, (n_a, n_b)

    print(f"frames={args.frames} rows={n_a} image_size={args.image_size} cpus={os.cpu_count()}")
    print(f"(a) single process : {n_a / dt_a:8.1f} rows/s  ({dt_a:.1f} s)")
    print(f"(b) Ray Data stage : {n_b / dt_b:8.1f} rows/s  ({dt_b:.1f} s; Ray start-up {startup:.1f} s apart)")
    print(f"ratio (b)/(a)      : {dt_a / dt_b:.2f}x")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

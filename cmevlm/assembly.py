"""What the stages that build a dataset on the driver share (teach and prefer), and the one
quarantine writer of every stage.

A dataset is rebuilt when the expert's reviews file changed since it was assembled (its sha256
is in the manifest); the expert's decisions are applied as rows are assembled (reject drops
a row, the others change it); rows go to Parquet shards of `ROWS_PER_SHARD` rows; items that
cannot be used go to the stage's quarantine file, `<workdir>/quarantine/<stage>.jsonl`, one
JSON object per line with at least `item_id` (or the source) and `reason`.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Callable, Iterable

import pyarrow as pa

from cmevlm.storage import Storage, join

ROWS_PER_SHARD = 256  # rows of a dataset shard (a few MB of composites each)


def quarantine_uri(workdir: str, stage: str) -> str:
    """The one place each stage writes what it quarantined."""
    return join(workdir, "quarantine", f"{stage}.jsonl")


def write_quarantine(st: Storage, workdir: str, stage: str, entries: list[dict]) -> str:
    uri = quarantine_uri(workdir, stage)
    st.write_text(uri, "".join(json.dumps(q, sort_keys=True) + "\n" for q in entries))
    return uri


def reviews_sha256(st: Storage, uri: str) -> str | None:
    """The digest of the expert's reviews file, None while there is none."""
    return hashlib.sha256(st.read_bytes(uri)).hexdigest() if st.exists(uri) else None


def is_current(st: Storage, out: str, force: bool, reviews_sha: str | None) -> bool:
    """The stage's output is complete and was assembled with the same reviews."""
    return st.is_complete(out) and not force and st.read_manifest(out).get("reviews_sha256") == reviews_sha


def apply_reviews(rows: Iterable[tuple[str, dict]], reviews: dict[str, dict],
                  change: Callable[[dict, dict], dict]) -> tuple[list[dict], Counter]:
    """Rows after the expert's last decision on each: reject drops it, `change(row, review)`
    applies any other (edit, swap, accept). Returns the kept rows and {decision: count}."""
    kept, counts = [], Counter()
    for item_id, row in rows:
        rev = reviews.get(item_id)
        if rev:
            counts[rev["decision"]] += 1
            if rev["decision"] == "reject":
                continue
            row = change(row, rev)
        kept.append(row)
    return kept, counts


def write_shards(st: Storage, uri: str, rows: list[dict], schema: pa.Schema) -> list[str]:
    """`rows` as part-NNNNN.parquet shards under `uri` (one empty shard when there are none)."""
    parts = []
    for i in range(0, max(len(rows), 1), ROWS_PER_SHARD):
        parts.append(join(uri, f"part-{i // ROWS_PER_SHARD:05d}.parquet"))
        st.write_parquet(parts[-1], pa.Table.from_pylist(rows[i:i + ROWS_PER_SHARD], schema=schema))
    return parts

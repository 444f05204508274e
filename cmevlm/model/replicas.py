"""Model replicas on a Ray Data actor pool, writing their outputs as Parquet parts.

The sample and evaluate stages both generate with one model replica per actor (one per GPU on
a cluster). Each batch's rows are written at once as their own part, named by the batch's
item ids, so a killed run loses at most the batches in flight and a rerun does only the
items that no part holds yet.
"""

from __future__ import annotations

import hashlib

from cmevlm.config import RunConfig
from cmevlm.storage import Storage, join


def part_uri(parts_uri: str, item_ids: list[str]) -> str:
    """Where the part of a batch goes: a hash of its item ids."""
    return join(parts_uri, hashlib.sha256("|".join(sorted(item_ids)).encode()).hexdigest()[:20] + ".parquet")


def read_parts(storage: Storage, parts_uri: str) -> list[dict]:
    """Every row of every part written so far."""
    return [r for f in storage.list_files(parts_uri, ".parquet") for r in storage.read_parquet(f).to_pylist()]


def run_pool(cfg: RunConfig, todo: list[dict], worker, worker_kwargs: dict, batch_size: int, concurrency: int,
             num_cpus: float, num_gpus: float) -> None:
    """Run `worker` (a callable class that writes its parts) over `todo` on an actor pool."""
    from cmevlm.cluster import connect

    if not todo:
        return
    ray = connect(cfg.ray)
    blocks = max(1, -(-len(todo) // batch_size))
    ray.data.from_items(todo, override_num_blocks=blocks).map_batches(
        worker, fn_constructor_kwargs=worker_kwargs, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(concurrency, blocks)), num_cpus=num_cpus, num_gpus=num_gpus,
    ).materialize()

"""Sample: the frozen SFT model answers every pool item five times (paper, Step 2).

    cmevlm sample --config configs/demo.yaml [--set sample.limit=200 --set sample.num_gpus_per_actor=1]
    python jobs/run.py sample --config /etc/cmevlm/run.yaml

A Ray Data actor pool holds one model replica per actor (one per GPU on a cluster). Each actor
takes a batch of items and makes one left-padded `generate` call per sampling setting, so the
five settings cost five calls per batch rather than five per item. Each batch's answers are
written at once as their own Parquet part under `samples/parts/`, so a killed run loses at most
the batches in flight and a rerun generates only the items that have no part yet.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa

from cmevlm.config import RunConfig
from cmevlm.data.formats import prompt_text
from cmevlm.errors import MissingInput
from cmevlm.model.generate import Setting, decode_image, generate
from cmevlm.model.replicas import part_uri, read_parts, run_pool
from cmevlm.storage import Storage, join, stage_uri

log = logging.getLogger(__name__)

ANSWER = pa.struct([("setting", pa.string()), ("temperature", pa.float64()), ("top_p", pa.float64()), ("seed", pa.int64()),
                    ("text", pa.string()), ("n_tokens", pa.int64()), ("duplicate", pa.bool_())])
SAMPLES_SCHEMA = pa.schema([("item_id", pa.string()), ("answers", pa.list_(ANSWER)), ("generation_s", pa.float64())])


def sample_items(model, processor, items: list[dict], settings: list[Setting], max_new_tokens: int,
                 geometry: tuple[int, str] | None = None) -> list[dict]:
    """Five answers per item, one batched generate call per setting, images brought to the
    model's training `geometry`. Identical answers are kept and marked `duplicate` (all but the
    first of a kind)."""
    images = [decode_image(it["image"], geometry) for it in items]
    prompts = [it["prompt"] for it in items]
    t0 = time.time()
    per_setting = [generate(model, processor, images, prompts, max_new_tokens, s) for s in settings]
    dt = (time.time() - t0) / max(1, len(items))
    rows = []
    for i, it in enumerate(items):
        seen, answers = set(), []
        for s, outs in zip(settings, per_setting):
            text, n = outs[i]
            answers.append({"setting": s.name, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed,
                            "text": text, "n_tokens": n, "duplicate": text in seen})
            seen.add(text)
        rows.append({"item_id": it["item_id"], "answers": answers, "generation_s": dt})
    return rows


class SampleWorker:
    """Callable class for `map_batches`: one model replica per actor."""

    def __init__(self, cfg_json: str, model_uri: str, parts_uri: str):
        from cmevlm.model.loading import image_geometry, load

        self.cfg = RunConfig.model_validate_json(cfg_json)
        s = self.cfg.sample
        self.model, self.processor = load(self.cfg, model_uri, dtype=s.dtype, num_gpus=s.num_gpus_per_actor)
        self.geometry = image_geometry(self.cfg, model_uri)
        self.settings = [Setting.of(s, self.cfg.model.repetition_penalty) for s in self.cfg.sample.settings]
        self.storage, self.parts = Storage(self.cfg.storage), parts_uri

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        rows = sample_items(self.model, self.processor, items, self.settings, self.cfg.sample.max_new_tokens, self.geometry)
        self.storage.write_parquet(part_uri(self.parts, [it["item_id"] for it in items]), pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA))
        return pa.table({"item_id": [it["item_id"] for it in items]})


def run(cfg: RunConfig, force: bool = False) -> dict:
    st = Storage(cfg.storage)
    s = cfg.sample
    out, parts = join(cfg.workdir, "samples"), join(cfg.workdir, "samples", "parts")
    model_uri, pool_uri = stage_uri(cfg, s.model), stage_uri(cfg, s.pool)
    if st.is_complete(out) and not force:
        log.info("sample: %s is complete, skipped", out)
        return {**st.read_manifest(out), "skipped": True}
    if force:
        st.delete(out)
    if not st.is_complete(model_uri):
        raise MissingInput(f"sample needs the SFT model at {model_uri} (run `cmevlm sft`)")
    t0 = time.time()

    # ---- the pool, minus what an earlier (interrupted) run already answered
    pool = st.read_parquet(pool_uri, columns=["item_id", "images", "messages"]).to_pylist()
    if s.limit:
        pool = pool[: s.limit]
    done = {r["item_id"] for r in read_parts(st, parts)}
    todo = [{"item_id": r["item_id"], "image": r["images"][0]["bytes"], "prompt": prompt_text(r["messages"])}
            for r in pool if r["item_id"] not in done]
    log.info("sample: %d pool items, %d already answered, %d to generate", len(pool), len(done & {r["item_id"] for r in pool}), len(todo))

    # ---- generate on the actor pool
    run_pool(cfg, todo, SampleWorker, {"cfg_json": cfg.model_dump_json(), "model_uri": model_uri, "parts_uri": parts},
             s.batch_size, s.concurrency, s.num_cpus_per_actor, s.num_gpus_per_actor)

    # ---- manifest over every part
    files = st.list_files(parts, ".parquet")
    table = pa.concat_tables([st.read_parquet(f) for f in files]) if files else pa.Table.from_pylist([], schema=SAMPLES_SCHEMA)
    answers = [a for row in table.column("answers").to_pylist() for a in row]
    manifest = st.write_manifest(
        out, files, stage="sample", items=table.num_rows, generated=len(todo), model=model_uri,
        settings=[x.model_dump() for x in s.settings], duplicates=sum(a["duplicate"] for a in answers),
        mean_tokens=round(sum(a["n_tokens"] for a in answers) / max(1, len(answers)), 2), seconds=round(time.time() - t0, 2),
    )
    log.info("sample: %d items x 5 answers (%d generated now, %d duplicates) -> %s", table.num_rows, len(todo), manifest["duplicates"], out)
    return manifest

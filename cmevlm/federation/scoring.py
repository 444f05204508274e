"""A model's structure accuracy and laterality errors on one site's test set.

The consortium's measures need no judge and no reference model: whether the answer names the
highlighted structure and whether it names the wrong side (cmevlm.rubric, the same measures as
`cmevlm evaluate`'s Table 1 columns), greedy, in this process (a site's test set is small).
"""

from __future__ import annotations

from cmevlm.config import RunConfig
from cmevlm.storage import Storage, stage_uri


def test_items(cfg: RunConfig) -> list[dict]:
    rows = Storage(cfg.storage).read_parquet(stage_uri(cfg, cfg.evaluate.data)).to_pylist()
    return rows[: cfg.evaluate.limit] if cfg.evaluate.limit else rows


def score_model(cfg: RunConfig, model_uri: str, items: list[dict] | None = None) -> dict:
    """{n, structure_accuracy, laterality_error} of `model_uri` on `items` (default: the
    run's test set)."""
    from cmevlm.data.formats import prompt_text
    from cmevlm.model.generate import Setting, decode_image, generate
    from cmevlm.model.loading import image_geometry, load
    from cmevlm.rubric import identifies, laterality_error

    items = test_items(cfg) if items is None else items
    model, processor = load(cfg, model_uri, dtype=cfg.evaluate.dtype, num_gpus=cfg.evaluate.num_gpus_per_actor)
    geometry = image_geometry(cfg, model_uri)
    ok = wrong_side = 0
    b = cfg.evaluate.batch_size
    for i in range(0, len(items), b):
        batch = items[i:i + b]
        outs = generate(model, processor, [decode_image(it["images"][0]["bytes"], geometry) for it in batch],
                        [prompt_text(it["messages"]) for it in batch], cfg.evaluate.max_new_tokens,
                        Setting.greedy(cfg.model.repetition_penalty))
        for it, (text, _) in zip(batch, outs):
            ok += identifies(text, it["structure"])
            wrong_side += laterality_error(text, it["laterality"])
    n = max(1, len(items))
    return {"n": len(items), "structure_accuracy": round(ok / n, 4), "laterality_error": round(wrong_side / n, 4)}

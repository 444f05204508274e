"""Evaluate: the paper's Table 1 for any run (Section 3.2), and what the paper asks for but does
not automate: laterality errors, per-structure and per-site results, significance tests.

    cmevlm evaluate --config configs/demo.yaml [--export-expert-sheet] [--import-expert-sheet FILE]
    python jobs/run.py evaluate --config /etc/cmevlm/run.yaml

Every model in `evaluate.models` answers every test item greedily (a Ray Data actor pool per
model, one replica per actor, parts written per batch so a rerun answers only what is
missing). BLEU-4 (sacrebleu), BERTScore F1 and the rubric measures of every answer run on a Ray
Data actor pool too (`evaluate.metrics_*`: CPUs and memory Ray accounts for, so on a cluster
they run on workers, never on the head, whose Ray CPUs are 0); the LLM judge's requests go
through the shared guarded client's actor pool. The driver only orchestrates and tabulates:
breakdowns and Wilcoxon tests; outputs
`eval/metrics.json`, `eval/answers.parquet`, `eval/report.html` and `eval/report.md`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict

import pyarrow as pa

from cmevlm.config import RunConfig
from cmevlm.data.formats import answer_text, prompt_text
from cmevlm.errors import MissingInput
from cmevlm.evaluate import metrics as M
from cmevlm.model.generate import Setting, decode_image, generate
from cmevlm.model.replicas import part_uri, read_parts, run_pool
from cmevlm.rubric import identifies, laterality_error, repetition_rate
from cmevlm.storage import Storage, join, stage_uri
from cmevlm.teacher import pool
from cmevlm.teacher.backends import JudgeScore
from cmevlm.teacher.client import merge_audit
from cmevlm.teacher.prompts import SCORE_SYSTEM_PROMPT, score_prompt

log = logging.getLogger(__name__)

ANSWERS_SCHEMA = pa.schema([("model", pa.string()), ("item_id", pa.string()), ("answer", pa.string()), ("n_tokens", pa.int64())])


def models_to_evaluate(cfg: RunConfig, st: Storage) -> dict[str, str]:
    """name -> URI of each model that exists (a stage model needs its manifest)."""
    wanted = cfg.evaluate.models or {"base": cfg.model.base, "sft": "models/sft", "dpo": "models/dpo"}
    out = {}
    for name, uri in wanted.items():
        full = stage_uri(cfg, uri)
        if (st.exists(join(full, "config.json")) or st.exists(join(full, "adapter_config.json"))) and (full == cfg.model.base or st.is_complete(full) or cfg.evaluate.models):
            out[name] = full
        else:
            log.info("evaluate: %s (%s) does not exist yet, left out", name, full)
    return out


GREEDY = "greedy"


def modes(cfg: RunConfig) -> dict[str, Setting]:
    """The decoding modes every model is evaluated in, each stated whole: greedy, then each
    evaluate.sampling (all with model.repetition_penalty)."""
    penalty = cfg.model.repetition_penalty
    return {GREEDY: Setting.greedy(penalty), **{(s := Setting.of(x, penalty)).name: s for x in cfg.evaluate.sampling}}


class AnswerWorker:
    """Callable class for `map_batches`: one model replica answers a batch in one decoding mode
    and writes the batch's answers as one Parquet part."""

    def __init__(self, cfg_json: str, name: str, model_uri: str, parts_uri: str, mode: str = GREEDY):
        from cmevlm.model.loading import image_geometry, load

        self.cfg = RunConfig.model_validate_json(cfg_json)
        e = self.cfg.evaluate
        self.model, self.processor = load(self.cfg, model_uri, dtype=e.dtype, num_gpus=e.num_gpus_per_actor)
        self.geometry = image_geometry(self.cfg, model_uri)
        self.name, self.storage, self.parts, self.setting = name, Storage(self.cfg.storage), parts_uri, modes(self.cfg)[mode]

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = batch.to_pylist()
        outs = generate(self.model, self.processor, [decode_image(it["image"], self.geometry) for it in items], [it["prompt"] for it in items],
                        self.cfg.evaluate.max_new_tokens, self.setting)
        rows = [{"model": self.name, "item_id": it["item_id"], "answer": text, "n_tokens": n} for it, (text, n) in zip(items, outs)]
        self.storage.write_parquet(part_uri(self.parts, [it["item_id"] for it in items]), pa.Table.from_pylist(rows, schema=ANSWERS_SCHEMA))
        return pa.table({"item_id": [it["item_id"] for it in items]})


def answer_all(cfg: RunConfig, st: Storage, name: str, uri: str, items: list[dict], mode: str = GREEDY) -> dict[str, dict]:
    """{item_id: answer row} of one model in one decoding mode; generates only what earlier
    runs did not (greedy parts in eval/answers/<model>, sampled ones in <model>@<mode>)."""
    e = cfg.evaluate
    parts = join(cfg.workdir, "eval", "answers", name if mode == GREEDY else f"{name}@{mode}")
    done = {r["item_id"]: r for r in read_parts(st, parts)}
    todo = [{"item_id": it["item_id"], "image": it["images"][0]["bytes"], "prompt": prompt_text(it["messages"])}
            for it in items if it["item_id"] not in done]
    if todo:
        run_pool(cfg, todo, AnswerWorker, {"cfg_json": cfg.model_dump_json(), "name": name, "model_uri": uri, "parts_uri": parts, "mode": mode},
                 e.batch_size, e.concurrency, e.num_cpus_per_actor, e.num_gpus_per_actor)
        done = {r["item_id"]: r for r in read_parts(st, parts)}
    log.info("evaluate: %s (%s) answered %d items (%d generated now)", name, mode, len(items), len(todo))
    return done


def summarise(rows: list[dict]) -> dict:
    """The metrics.json block of one group of answer rows."""
    return {
        "n": len(rows),
        "bleu4": M.mean_std_ci(r["bleu4"] for r in rows),
        "bertscore_f1": M.mean_std_ci(r["bertscore_f1"] for r in rows),
        "judge": M.mean_std_ci(r["judge"] for r in rows if r["judge"] is not None),
        "structure_accuracy": sum(r["structure_ok"] for r in rows) / max(1, len(rows)),
        "laterality_error_rate": sum(r["laterality_error"] for r in rows) / max(1, len(rows)),
        "mean_length": sum(r["length"] for r in rows) / max(1, len(rows)),
        "repetition_rate": sum(r["repetition"] for r in rows) / max(1, len(rows)),
    }


def check_missing(cfg: RunConfig, st: Storage, out: str, models: dict[str, str]) -> dict[str, str]:
    """The models the previous report had that are missing now: an error naming them, or with
    evaluate.allow_missing (--allow-missing) what the new report says it left out."""
    metrics = join(out, "metrics.json")
    before = st.read_json(metrics).get("model_uris", {}) if st.exists(metrics) else {}
    gone = {name: uri for name, uri in before.items() if name not in models}
    if gone and not cfg.evaluate.allow_missing:
        where = ", ".join(f"{n} (was {u})" for n, u in gone.items())
        hint = " model.base is resolved under the workdir when relative;" if "base" in gone else ""
        raise MissingInput(f"evaluate: the previous report had {where}, which is missing now.{hint} "
                           "--allow-missing writes the report without it and names it there")
    return gone


def answer(cfg: RunConfig, st: Storage, models: dict[str, str], items: list[dict]) -> list[dict]:
    """Every model's answer to every item (Ray), one row each with its ground truth."""
    rows = []
    for (name, uri), mode in ((m, d) for m in models.items() for d in modes(cfg)):
        answers = answer_all(cfg, st, name, uri, items, mode)
        for it in items:
            rows.append({"model": name, "mode": mode, "item_id": it["item_id"], "structure": it["structure"], "site": it["site"],
                         "laterality": it["laterality"], "prompt": prompt_text(it["messages"]), "answer": answers[it["item_id"]]["answer"],
                         "ground_truth": answer_text(it["messages"])})
    return rows


MEASURE_INPUTS = ("i", "answer", "ground_truth", "structure", "laterality")


class MetricsWorker:
    """Callable class for `map_batches`: the measures of a batch of answers against their ground
    truth (BLEU-4, BERTScore F1, the rubric's), the BERTScore model loaded once per actor."""

    def __init__(self, cfg_json: str):
        e = RunConfig.model_validate_json(cfg_json).evaluate
        self.scorer = M.bertscore_scorer(e.bertscore_model, e.bertscore_layers, e.bertscore_baseline)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        f1 = M.bertscore_f1([r["answer"] for r in rows], [r["ground_truth"] for r in rows], scorer=self.scorer)
        return pa.Table.from_pylist([
            {"i": r["i"], "bleu4": M.bleu4(r["answer"], r["ground_truth"]), "bertscore_f1": f, "structure_ok": identifies(r["answer"], r["structure"]),
             "laterality_error": laterality_error(r["answer"], r["laterality"]), "length": len(r["answer"].split()),
             "repetition": repetition_rate(r["answer"])} for r, f in zip(rows, f1)])


def score(cfg: RunConfig, rows: list[dict]) -> None:
    """Every answer's measures, computed on a Ray Data actor pool, set on the rows in place."""
    from cmevlm.cluster import connect

    if not rows:
        return
    e, ray = cfg.evaluate, connect(cfg.ray)
    blocks = max(1, -(-len(rows) // e.metrics_batch_size))
    inputs = [{k: (i if k == "i" else r[k]) for k in MEASURE_INPUTS} for i, r in enumerate(rows)]
    scored = ray.data.from_items(inputs, override_num_blocks=blocks).map_batches(
        MetricsWorker, fn_constructor_kwargs={"cfg_json": cfg.model_dump_json()}, batch_size=e.metrics_batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(e.metrics_concurrency, blocks)), num_cpus=e.metrics_num_cpus,
        memory=int(e.metrics_memory_gb * 2**30)).take_all()
    for m in scored:
        rows[m.pop("i")].update(m)


def score_request(cfg: RunConfig, r: dict) -> dict:
    """The judge's scoring request for one answer row (text only)."""
    return pool.request(f"{r['model']}:{r.get('mode', GREEDY)}:{r['item_id']}", SCORE_SYSTEM_PROMPT,
                        score_prompt(r["structure"], r["laterality"], r["prompt"], r["ground_truth"], r["answer"]), None,
                        {"structure": r["structure"], "side": r["laterality"], "answer": r["answer"]},
                        temperature=cfg.judge.score_temperature, max_output_tokens=cfg.judge.max_output_tokens)


def judge(cfg: RunConfig, st: Storage, rows: list[dict]) -> None:
    """The LLM judge's accuracy, conciseness and weighted composite of every answer, in place
    (text only, through the shared guarded client)."""
    e = cfg.evaluate
    reqs = [score_request(cfg, r) for r in rows]
    wsum = e.judge_accuracy_weight + e.judge_conciseness_weight
    results = pool.ask_all(cfg, "judge", reqs, JudgeScore)
    merge_audit(st, join(cfg.workdir, "teacher", "audit.jsonl"))
    pool.stop_at_budget(cfg, "judge", results)
    for r, res in zip(rows, results):
        if res["value"]:
            s = json.loads(res["value"])
            r.update(judge_accuracy=s["accuracy"], judge_conciseness=s["conciseness"], judge_reason=s["reason"],
                     judge=(e.judge_accuracy_weight * s["accuracy"] + e.judge_conciseness_weight * s["conciseness"]) / wsum)
        else:
            r.update(judge_accuracy=None, judge_conciseness=None, judge_reason=f"judge failed: {res['error']}", judge=None)


def paired_p(grouped: dict, a: str, b: str) -> tuple[float | None, str | None]:
    """(p, None) of the Wilcoxon signed-rank test of the judge composite of models a and b on
    the items both have, or (None, why not)."""
    missing = [m for m in (a, b) if m not in grouped]
    if missing:
        return None, f"no {' and no '.join(missing)} model in this evaluation"
    ja, jb = ({r["item_id"]: r["judge"] for r in grouped[m] if r["judge"] is not None} for m in (a, b))
    common = sorted(set(ja) & set(jb))
    return M.wilcoxon_test([ja[i] for i in common], [jb[i] for i in common])


def tabulate(cfg: RunConfig, models: dict[str, str], all_rows: list[dict], n_items: int) -> dict:
    """Table 1, the breakdowns per structure and site, and the tests (greedy), then Table 1 and
    the tests per sampling mode: metrics.json."""
    decoding = modes(cfg)
    result = _tabulate_mode(cfg, models, [r for r in all_rows if r["mode"] == GREEDY], n_items)
    result["judge_failed"] = judge_failures(all_rows)
    result["decoding"] = {mode: s.record() for mode, s in decoding.items()}
    result["sampled"] = {}
    for mode in list(decoding)[1:]:
        part = _tabulate_mode(cfg, models, [r for r in all_rows if r["mode"] == mode], n_items)
        result["sampled"][mode] = {k: part[k] for k in ("models", "tests", "tests_not_computed")}
    return result


def judge_failures(rows: list[dict]) -> dict[str, int]:
    """How many answers the judge left unscored: blocked by the model (never retried) or failed."""
    failed = [r["judge_reason"] for r in rows if r.get("judge") is None]
    return {"blocked": sum("blocked by the model" in w for w in failed), "failed": sum("blocked by the model" not in w for w in failed)}


def _tabulate_mode(cfg: RunConfig, models: dict[str, str], rows: list[dict], n_items: int) -> dict:
    grouped = defaultdict(list)
    for r in rows:
        grouped[r["model"]].append(r)

    def per(key: str) -> dict:
        return {v: {m: summarise([r for r in grouped[m] if r[key] == v]) for m in models} for v in sorted({r[key] for r in rows})}

    e = cfg.evaluate
    tests = {"sft_vs_dpo_judge_p": paired_p(grouped, "sft", "dpo"), "base_vs_sft_judge_p": paired_p(grouped, "base", "sft")}
    return {
        "n_test": n_items,
        "models": {m: summarise(grouped[m]) for m in models},
        "per_structure": per("structure"),
        "per_site": per("site"),
        "tests": {k: p for k, (p, _) in tests.items()},
        "tests_not_computed": {k: why for k, (_, why) in tests.items() if why},
        "expert": None,
        "model_uris": models,
        "judge": {"backend": cfg.judge.backend, "model": cfg.judge.model, "weights": [e.judge_accuracy_weight, e.judge_conciseness_weight]},
    }


def estimate(cfg: RunConfig) -> dict:
    """What judging every model's answers would cost, without generating or sending anything
    (`cmevlm evaluate --estimate`): each answer is taken to be as long as the ground truth."""
    st = Storage(cfg.storage)
    items = st.read_parquet(stage_uri(cfg, cfg.evaluate.data)).to_pylist()[: cfg.evaluate.limit or None]
    rows = [{"model": m, "item_id": it["item_id"], "structure": it["structure"], "laterality": it["laterality"],
             "prompt": prompt_text(it["messages"]), "ground_truth": answer_text(it["messages"]), "answer": answer_text(it["messages"])}
            for m in models_to_evaluate(cfg, st) for it in items]
    return pool.estimate(cfg, "judge", [score_request(cfg, r) for r in rows], JudgeScore)


def run(cfg: RunConfig, force: bool = False) -> dict:
    """answer -> score -> judge -> tabulate -> report; skipped when eval/ is complete for the same models."""
    from cmevlm.evaluate import report

    st = Storage(cfg.storage)
    out = join(cfg.workdir, "eval")
    models = models_to_evaluate(cfg, st)
    left_out = check_missing(cfg, st, out, models)
    signature = hashlib.sha256(json.dumps([sorted(models.items()), sorted(modes(cfg))]).encode()).hexdigest()
    if st.is_complete(out) and not force and st.read_manifest(out).get("models_sha256") == signature:
        log.info("evaluate: %s is complete, skipped", out)
        return {**st.read_json(join(out, "metrics.json")), "skipped": True}
    test_uri = stage_uri(cfg, cfg.evaluate.data)
    if not st.is_complete(join(cfg.workdir, "sft")) and test_uri == join(cfg.workdir, "sft/test"):
        raise MissingInput(f"evaluate needs the test set at {test_uri} (run `cmevlm teach`)")
    if not models:
        raise MissingInput("evaluate: none of the models exists")
    t0 = time.time()
    items = st.read_parquet(test_uri).to_pylist()[: cfg.evaluate.limit or None]
    rows = answer(cfg, st, models, items)
    score(cfg, rows)
    judge(cfg, st, rows)
    result = tabulate(cfg, models, rows, len(items))
    result["left_out"] = left_out
    old = st.read_json(join(out, "metrics.json")) if st.exists(join(out, "metrics.json")) else {}
    result["expert"] = old.get("expert")
    st.write_parquet(join(out, "answers.parquet"), pa.Table.from_pylist(rows))
    st.write_json(join(out, "metrics.json"), result)
    report.write(cfg, st, result, rows, {it["item_id"]: it for it in items})
    st.write_manifest(out, [join(out, f) for f in ("metrics.json", "answers.parquet", "report.html", "report.md")],
                      stage="evaluate", models_sha256=signature, seconds=round(time.time() - t0, 2))
    log.info("evaluate: %d items x %d models in %.0f s -> %s", len(items), len(models), time.time() - t0, join(out, "report.html"))
    return result

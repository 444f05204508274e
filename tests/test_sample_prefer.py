"""Five-way sampling and judged preferences: the DPO dataset."""

import json
import shutil

import pytest
import torch

from cmevlm import prefer, sample
from cmevlm.config import load_config
from cmevlm.reviews import needs_review
from cmevlm.model.generate import Setting, decode_image, generate
from cmevlm.model.loading import load_model, load_processor
from cmevlm.rubric import identifies, laterality_error, mentions_significance, rubric_score, stated_side
from cmevlm.storage import Storage, join
from cmevlm.teacher.backends import Verdict
from fake_llm import FakeLLM, gemini_images


def _cfg(workdir, base, *extra):
    return load_config(overrides=[f"workdir={workdir}", f"model.base={base}", "data.image_size=56", "sample.batch_size=4",
                                  "sample.max_new_tokens=12", "judge.batch_size=4", *extra])





def _copy(taught, dest, subs=("frames", "sft", "models")):
    for s in subs:
        shutil.copytree(taught / s, dest / s)
    return dest


def _samples(workdir):
    return {r["item_id"]: r for r in Storage().read_parquet(str(workdir / "samples/parts")).to_pylist()}


def test_left_padded_batch_gives_the_same_greedy_text_as_one_by_one(tiny_model_dir, taught):
    model, proc = load_model(str(tiny_model_dir)), load_processor(str(tiny_model_dir))
    rows = Storage().read_parquet(str(taught / "sft/train")).to_pylist()[:4]
    images = [decode_image(r["images"][0]["bytes"]) for r in rows]
    prompts = [r["messages"][0]["content"][1]["text"] for r in rows]  # templates of different lengths
    assert len({len(p) for p in prompts}) > 1
    batched = generate(model, proc, images, prompts, 10)
    single = [generate(model, proc, [i], [p], 10)[0] for i, p in zip(images, prompts)]
    assert batched == single


def test_five_distinct_settings_recorded_per_answer_and_resume(taught, tmp_path):
    workdir = _copy(taught, tmp_path / "run")
    m = sample.run(_cfg(workdir, taught / "models/sft", "sample.limit=8"))
    assert m["items"] == 8 and m["generated"] == 8
    rows = _samples(workdir)
    for r in rows.values():
        settings = [(a["temperature"], a["top_p"], a["seed"]) for a in r["answers"]]
        assert len(settings) == 5 and len(set(settings)) == 5 and len({s[:2] for s in settings}) == 5
        texts = [a["text"] for a in r["answers"]]
        assert [a["duplicate"] for a in r["answers"]] == [t in texts[:i] for i, t in enumerate(texts)]
        assert all(a["n_tokens"] > 0 for a in r["answers"])
    # A larger pool later, and a run killed after some batches: only what is missing is generated.
    parts = Storage().list_files(str(workdir / "samples/parts"), ".parquet")
    Storage().delete(parts[0])
    Storage().delete(str(workdir / "samples/manifest.json"))
    m = sample.run(_cfg(workdir, taught / "models/sft", "sample.limit=12"))
    assert m["items"] == 12 and m["generated"] == 12 - 8 + 4
    again = _samples(workdir)
    assert {k: v["answers"] for k, v in rows.items() if k in again} == {k: again[k]["answers"] for k in rows if k in again}
    assert sample.run(_cfg(workdir, taught / "models/sft", "sample.limit=12"))["skipped"]


def test_settings_must_be_five_distinct():
    with pytest.raises(Exception, match="5 distinct"):
        load_config(overrides=["sample.settings=[{temperature: 0.7, top_p: 0.9, seed: 1}]"])


@pytest.fixture(scope="module")
def sampled(taught, tmp_path_factory):
    workdir = _copy(taught, tmp_path_factory.mktemp("sampled") / "run")
    sample.run(_cfg(workdir, taught / "models/sft", "sample.limit=12"))
    return workdir


def test_offline_judge_writes_valid_preference_rows(sampled, tmp_path):
    workdir = _copy(sampled, tmp_path / "run", ("frames", "sft", "models", "samples"))
    cfg = _cfg(workdir, workdir / "models/sft", "sample.limit=12", "prefer.review_fraction=0.5")
    m = prefer.run(cfg)
    assert m["pairs"] + m["ties"] == 12 and m["quarantined"] == m["ties"] and m["pairs"] >= 2
    rows = Storage().read_parquet(str(workdir / "preferences")).to_pylist()
    assert all(r["chosen"][0]["content"][0]["text"] != r["rejected"][0]["content"][0]["text"] for r in rows)  # a pair teaches something
    samples = _samples(workdir)
    truth = {x["item_id"]: x["messages"][1]["content"][0]["text"] for x in Storage().read_parquet(str(workdir / "sft/train")).to_pylist()}
    for r in rows:
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert r["prompt"][0]["role"] == "user" and r["images"][0]["bytes"]
        answers = [a["text"] for a in samples[r["item_id"]]["answers"]]
        assert r["rejected"][0]["content"][0]["text"] in answers  # never the ground truth
        assert r["chosen"][0]["content"][0]["text"] in answers + [truth[r["item_id"]]]
        verdict = r["judge_reason"].split(":")[0]  # "accepted X, rejected Y"
        accepted, rejected = verdict.replace("accepted ", "").split(", rejected ")
        assert accepted != rejected
    # the pairs a hash flags (its own seed, not the teacher's); which ones varies with the tmp path
    assert [r["needs_review"] for r in rows] == [needs_review(r["item_id"], 0.5, cfg.seed + 1) for r in rows]
    assert m["needs_review"] == sum(r["needs_review"] for r in rows)
    for line in (workdir / "teacher/audit.jsonl").read_text().splitlines()[-12:]:
        assert [p["kind"] for p in json.loads(line)["parts"]] == ["text"]  # no image, no mask
    # The expert's reviews: swap one pair, reject another.
    ids = [r["item_id"] for r in rows]
    (workdir / "preferences/reviews.jsonl").write_text(
        json.dumps({"item_id": ids[0], "reviewer": "dr", "decision": "swap"}) + "\n"
        + json.dumps({"item_id": ids[1], "reviewer": "dr", "decision": "reject"}) + "\n")
    m = prefer.run(cfg)
    assert (m["pairs"], m["swapped"], m["rejected"], m["requests_sent"]) == (len(rows) - 1, 1, 1, 0)
    after = {r["item_id"]: r for r in Storage().read_parquet(str(workdir / "preferences")).to_pylist()}
    assert after[ids[0]]["chosen"] == rows[0]["rejected"] and ids[1] not in after


def test_gemini_judge_retries_invalid_verdicts_then_quarantines(sampled, tmp_path):
    workdir = _copy(sampled, tmp_path / "run", ("frames", "sft", "models", "samples"))
    calls = []

    def responder(prompt):
        calls.append(prompt)
        if len(calls) <= 3:  # item 1: invalid twice (quarantined); item 2: invalid once, then valid
            return {"accepted": "A", "rejected": "A", "reason": "same"}
        return {"accepted": "B", "rejected": "D", "reason": "B names the structure and side"}

    with FakeLLM(responder=responder) as srv:
        cfg = _cfg(workdir, workdir / "models/sft", "sample.limit=12", "judge.backend=gemini", f"judge.base_url={srv.url}",
                   "judge.max_attempts=2", "judge.concurrency=1", "judge.batch_size=1")
        m = prefer.run(cfg)
        assert m["pairs"] + m["ties"] == 11 and m["quarantined"] == 1 + m["ties"]  # B and D may be the same text: a tie
        assert len(srv.requests) == 12 + 2
        for req in srv.requests:
            assert gemini_images(req["body"]) == []  # the judge never gets an image
            assert "responseSchema" in req["body"]["generationConfig"]
    (q,) = [x for x in map(json.loads, (workdir / "quarantine/prefer.jsonl").read_text().splitlines()) if "malformed" in x["reason"]]
    assert json.loads(q["raw"])["accepted"] == "A"
    rows = Storage().read_parquet(str(workdir / "preferences")).to_pylist()
    assert all(r["judge_reason"].startswith("accepted B, rejected D") for r in rows)


def test_verdict_schema_rules():
    Verdict(accepted="ground_truth", rejected="C", reason="r")
    for bad in ({"accepted": "A", "rejected": "A"}, {"accepted": "A", "rejected": "ground_truth"}, {"accepted": "F", "rejected": "A"}):
        with pytest.raises(Exception):
            Verdict(**bad, reason="r")


def test_preference_rows_load_in_trl_dpo_data_path(sampled, tmp_path, tiny_model_dir):
    from trl import DPOConfig, DPOTrainer

    from cmevlm.train.common import load_dataset

    workdir = _copy(sampled, tmp_path / "run", ("frames", "sft", "models", "samples"))
    prefer.run(_cfg(workdir, workdir / "models/sft", "sample.limit=12"))
    ds = load_dataset(Storage(), str(workdir / "preferences"))
    model, proc = load_model(str(tiny_model_dir)), load_processor(str(tiny_model_dir))
    proc.tokenizer.padding_side = "right"
    args = DPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=2, use_cpu=True, bf16=False, report_to=[],
                     gradient_checkpointing=False, max_length=None, remove_unused_columns=False)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=ds, processing_class=proc)
    batch = next(iter(trainer.get_train_dataloader()))
    assert "pixel_values" in batch and batch["input_ids"].shape[0] == 4  # chosen and rejected of 2 pairs
    loss = trainer.compute_loss(trainer.model, batch)
    assert torch.isfinite(loss) and abs(loss.item() - 0.6931) < 1e-3


def test_rubric():
    t = "The highlighted structure is the pancreas in this left CME. Its border marks the upper limit of mesocolic dissection."
    assert identifies(t, "pancreas") and not identifies(t, "duodenum")
    assert identifies("This is the IMV, seen in a right CME.", "inferior_mesenteric_vein")  # synonym
    assert not identifies("The duodenum lies next to the pancreas.", "pancreas")  # another named first
    assert stated_side(t) == "left" and laterality_error(t, "right") and not laterality_error(t, "left")
    assert not laterality_error("It is the pancreas.", "left")  # no side stated is not a wrong side
    assert mentions_significance(t, "pancreas")
    assert rubric_score(t, "pancreas", "left") == 5.0 and rubric_score(t, "pancreas", "right") == 4.0
    assert rubric_score("pancreas pancreas pancreas pancreas pancreas pancreas pancreas pancreas pancreas", "pancreas", "left") < 3


def test_a_pair_needs_a_strict_preference_and_different_texts():
    same, mixed = ["the duodenum"] * 5, ["the duodenum", "the pancreas", "x", "y", "z"]
    v = {"accepted": "A", "rejected": "B", "strict": True}
    assert prefer.integrity(mixed, "truth", v) == (v, None)
    assert prefer.integrity(mixed, "truth", {**v, "strict": False})[1].startswith("tie: the judge finds A no better")
    assert prefer.integrity(["a", "a", "b", "c", "d"], "truth", v)[1].startswith("tie: accepted A and rejected B are the same text")
    gt = {"accepted": "ground_truth", "rejected": "C", "strict": True}
    assert prefer.integrity(same, "the pancreas", gt) == (gt, None)  # a different, preferred ground truth stands against them
    assert prefer.integrity(same, "the duodenum", gt)[1].startswith("all five answers are the same")
    assert prefer.integrity(same, "the pancreas", v)[1].startswith("all five answers are the same")

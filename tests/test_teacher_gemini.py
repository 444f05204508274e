"""The teacher as Gemini really behaves, against the loopback stand-in: thinking tokens (billed
as output, kept out of the answer's own limit), finish reasons (MAX_TOKENS retried once with
twice the room; SAFETY and prompt blocks quarantined at once), and a cost cap that stops a
stage cleanly and resumes without paying twice."""

import json
from pathlib import Path

import pytest

from cmevlm import teach
from cmevlm.config import TeacherConfig, load_config
from cmevlm.teacher.backends import TeacherAnswer
from cmevlm.teacher.client import TeacherClient, TeacherFailed
from cmevlm.teacher.pool import BudgetExceeded
from fake_llm import FakeLLM
from test_teach import frames_dir  # noqa: F401  (the fixture)
from test_teacher import STORED, _mask, _payload


def _outcomes(run: Path) -> list[dict]:
    return [x for x in (json.loads(line) for line in (run / "teacher/audit.jsonl").read_text().splitlines()) if x["event"] == "outcome"]


def _billed(srv: FakeLLM, pin=0.30, pout=2.50) -> float:
    """What the stand-in's usage says a run costs: input + (answer + thoughts) at the output price."""
    total = 0.0
    for r in srv.requests:
        u = r.get("response_usage")
        if u:
            total += (u.get("promptTokenCount", 0) * pin + (u.get("candidatesTokenCount", 0) + u.get("thoughtsTokenCount", 0)) * pout) / 1e6
    return total


def _client(tmp_path, srv, **kw) -> TeacherClient:
    return TeacherClient(TeacherConfig(backend="gemini", base_url=srv.url, backoff_s=0.0, **kw), str(tmp_path / "run"),
                         stored_mask=STORED.get)


def test_thinking_tokens_are_billed_and_default_thinking_leaves_the_answer_its_tokens(tmp_path):
    with FakeLLM(think=700) as srv:
        c = _client(tmp_path, srv, thinking_budget=None, max_output_tokens=32)  # the model's default thinking, a small answer limit
        a = c.ask(_payload("t1"), TeacherAnswer)
        (out,) = _outcomes(tmp_path / "run")
        body = srv.requests[0]["body"]
    assert a.value.answer and out["thoughts_tokens"] == 700 and out["finish"] == "stop"
    assert body["generationConfig"]["maxOutputTokens"] == 32 + 8192
    expected = (out["input_tokens"] * 0.30 + (out["output_tokens"] + 700) * 2.50) / 1e6
    assert out["cost_usd"] == pytest.approx(expected) and a.cost_usd == pytest.approx(expected)


def test_thinking_off_is_sent_as_a_zero_budget(tmp_path):
    with FakeLLM(think=700) as srv:
        _client(tmp_path, srv).ask(_payload("t2"), TeacherAnswer)  # the default: thinking_budget 0
        gen = srv.requests[0]["body"]["generationConfig"]
    thinking = gen["thinkingConfig"]
    assert thinking.get("thinkingBudget", thinking.get("thinking_budget")) == 0 and gen["maxOutputTokens"] == 512
    assert _outcomes(tmp_path / "run")[0]["thoughts_tokens"] == 0


def test_max_tokens_with_no_text_is_retried_once_with_twice_the_room(tmp_path):
    with FakeLLM(think=700) as srv:
        a = _client(tmp_path, srv, thinking_budget=100, max_output_tokens=16).ask(_payload("t3"), TeacherAnswer)
        limits = [r["body"]["generationConfig"]["maxOutputTokens"] for r in srv.requests]
    assert a.value.answer and limits == [16 + 100, 32 + 100]
    assert [o["finish"] for o in _outcomes(tmp_path / "run")] == ["length", "stop"]


def test_still_out_of_tokens_with_twice_the_room_is_quarantined_after_two_requests(tmp_path):
    with FakeLLM(think=20000) as srv:
        with pytest.raises(TeacherFailed, match="twice the limit"):
            _client(tmp_path, srv, thinking_budget=None, max_output_tokens=16, max_attempts=3).ask(_payload("t3b"), TeacherAnswer)
        assert len(srv.requests) == 2
    assert [o["finish"] for o in _outcomes(tmp_path / "run")] == ["length", "length"]


def test_a_safety_block_is_quarantined_after_one_request(tmp_path):
    with FakeLLM(block_fraction=1.0) as srv:
        with pytest.raises(TeacherFailed, match=r"blocked by the model \(SAFETY\): not retried"):
            _client(tmp_path, srv, max_attempts=3).ask(_payload("t4"), TeacherAnswer)
        assert len(srv.requests) == 1
    with FakeLLM() as srv:
        srv.faults.append("prompt_block")
        with pytest.raises(TeacherFailed, match="PROHIBITED_CONTENT"):
            _client(tmp_path / "b", srv).ask(_payload("t5", mask=_mask(seed=3)), TeacherAnswer)
        assert len(srv.requests) == 1


def _teach_cfg(run, srv, *extra):
    return load_config(overrides=[f"workdir={run}", "data.image_size=56", "teacher.backend=gemini", f"teacher.base_url={srv.url}",
                                  "teacher.backoff_s=0", "ray.num_cpus=2", *extra])


def test_a_thinking_blocking_teacher_answers_every_unblocked_item_and_bills_what_the_audit_says(ray_local, tmp_path, frames_dir):
    """700 thinking tokens unless told otherwise, 15 % of prompts blocked: every unblocked item is
    answered, each blocked prompt is sent once and quarantined with its reason, and the audit's
    cost is the stand-in's bill, thinking included."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(frames_dir, run / "frames")
    with FakeLLM(think=700, block_fraction=0.15) as srv:
        m = teach.run(_teach_cfg(run, srv, "teacher.thinking_budget=null"))
        billed = _billed(srv)
    outcomes = _outcomes(run)
    quarantine = [json.loads(x) for x in (run / "quarantine/teach.jsonl").read_text().splitlines()]
    safety = [q for q in quarantine if "SAFETY" in q["reason"]]
    assert m["blocked"] == len(safety) > 0 and len(quarantine) == len(safety)
    assert m["train"] + m["test"] + len(safety) == len({o["item_id"] for o in outcomes})
    per_item = {}
    for o in outcomes:
        per_item[o["item_id"]] = per_item.get(o["item_id"], 0) + 1
    assert all(per_item[q["item_id"]] <= 2 for q in safety)
    assert sum(o["cost_usd"] for o in outcomes) == pytest.approx(billed, rel=1e-6)
    assert all(o["thoughts_tokens"] == 700 for o in outcomes if o["finish"] == "stop")


def test_a_cost_cap_stops_cleanly_and_the_rerun_pays_for_nothing_twice(ray_local, tmp_path, frames_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(frames_dir, run / "frames")
    with FakeLLM(think=700) as srv:
        with pytest.raises(BudgetExceeded, match=r"teacher.max_cost_usd=\$0.01 reached: \d+ of \d+ requests answered"):
            teach.run(_teach_cfg(run, srv, "teacher.thinking_budget=null", "teacher.max_cost_usd=0.01", "teacher.concurrency=1"))
        first = _outcomes(run)
        spent = sum(o["cost_usd"] for o in first)
        per_request = max(o["cost_usd"] for o in first)
        assert 0.01 - per_request <= spent <= 0.01 + per_request  # within one request's cost of the cap
        before = len(srv.requests)
        m = teach.run(_teach_cfg(run, srv, "teacher.thinking_budget=null", "teacher.max_cost_usd=100"))
        again = _outcomes(run)[len(first):]
    assert m["cached"] == len(first) and m["requests_sent"] == len(again) == len(srv.requests) - before
    assert not {o["item_id"] for o in again} & {o["item_id"] for o in first}  # nothing paid twice


def test_estimate_prints_the_cost_before_anything_is_sent_and_knows_the_cache(ray_local, tmp_path, frames_dir, capsys):
    import shutil

    from cmevlm.cli import main

    run = tmp_path / "run"
    shutil.copytree(frames_dir, run / "frames")
    with FakeLLM(think=700) as srv:
        args = ["teach", "--set", f"workdir={run}", "--set", "data.image_size=56", "--set", "teacher.backend=gemini",
                "--set", f"teacher.base_url={srv.url}", "--set", "teacher.thinking_budget=null", "--estimate"]
        assert main(args) == 0
        first = capsys.readouterr().out
        assert srv.requests == [] and "nothing was sent" in first
        n = int(first.split(": ")[1].split(" requests")[0])
        assert n > 0 and f"{n * 8192:,} thinking tokens" in first and "(0 cached)" in first
        teach.run(_teach_cfg(run, srv, "teacher.thinking_budget=null"))
        assert main(args) == 0
        assert f"0 requests to send ({n} cached)" in capsys.readouterr().out

"""Evaluation: metrics against hand-computed values, the judge over a loopback Gemini server,
the expert sheet round trip, and the report."""

import csv
import json
import shutil
from html.parser import HTMLParser

import pytest


from cmevlm.config import load_config
from cmevlm.evaluate import evaluation, expert
from cmevlm.evaluate.metrics import bertscore_f1, bleu4, mean_std, wilcoxon_p
from cmevlm.storage import Storage
from fake_llm import FakeLLM, gemini_images


def _cfg(workdir, base, *extra):
    return load_config(overrides=[f"workdir={workdir}", f"model.base={base}", "data.image_size=56", "evaluate.max_new_tokens=12",
                                  "evaluate.batch_size=8", "evaluate.limit=10", "evaluate.expert_n=6", "evaluate.sampling=[]", *extra])


@pytest.fixture(scope="module")
def workdir(taught, tmp_path_factory):
    wd = tmp_path_factory.mktemp("eval") / "run"
    for sub in ("frames", "sft", "models"):
        shutil.copytree(taught / sub, wd / sub)
    return wd


def test_bleu_and_bertscore_against_hand_values():
    assert bleu4("the pancreas in a left CME", "the pancreas in a left CME") == pytest.approx(1.0)
    assert bleu4("alpha beta gamma delta", "one two three four") == 0.0
    f = bertscore_f1(["The pancreas lies here.", "zebra"], ["The pancreas lies here.", "The duodenum curves around."])
    assert f[0] == pytest.approx(1.0, abs=1e-4) and f[1] < 0.9
    assert bertscore_f1([""], ["anything"]) == [0.0]


def test_summaries_and_tests():
    assert mean_std([1, 3]) == {"mean": 2.0, "std": 1.0}
    assert wilcoxon_p([1, 2, 3], [1, 2, 3]) == 1.0
    assert wilcoxon_p([1, 2, 3, 4, 5, 6, 7, 8], [2, 3, 4, 5, 6, 7, 8, 9]) < 0.05


class _Parser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])


def test_evaluate_offline_writes_metrics_report_and_answers(workdir, tiny_model_dir):
    cfg = _cfg(workdir, tiny_model_dir)
    m = evaluation.run(cfg)
    assert m["n_test"] == 10 and set(m["models"]) == {"base", "sft"}  # no dpo model yet: left out
    for s in m["models"].values():
        assert {"bleu4", "bertscore_f1", "judge", "structure_accuracy", "laterality_error_rate"} <= set(s)
        assert set(s["bleu4"]) == {"mean", "std", "n", "ci95"} and s["bleu4"]["n"] == 10 and len(s["bleu4"]["ci95"]) == 2
    assert set(m["tests"]) == {"sft_vs_dpo_judge_p", "base_vs_sft_judge_p"} and m["expert"] is None
    assert m["tests"]["base_vs_sft_judge_p"] == 1.0  # the same weights answer the same
    assert set(m["per_structure"]) <= {"preparation_plane", "angels_hair", "inferior_mesenteric_vein", "duodenum", "pancreas"}
    on_disk = json.loads((workdir / "eval/metrics.json").read_text())
    assert on_disk["models"] == m["models"]
    answers = Storage().read_parquet(str(workdir / "eval/answers.parquet")).to_pylist()
    assert len(answers) == 20 and all(1 <= a["judge"] <= 5 for a in answers)
    p = _Parser()
    p.feed((workdir / "eval/report.html").read_text())
    assert "table" in p.tags and len([s for s in p.imgs if s.startswith("data:image/png;base64,")]) >= 2 + cfg.evaluate.report_examples
    assert "| model |" in (workdir / "eval/report.md").read_text()
    assert evaluation.run(cfg)["skipped"]


def test_expert_sheet_round_trip(workdir, tiny_model_dir, tmp_path):
    cfg = _cfg(workdir, tiny_model_dir)
    evaluation.run(cfg)
    s = expert.export_sheet(cfg)
    assert s["items"] == 6 and s["letters"] == "AB"
    sheet = (workdir / "eval/expert_sheet.csv").read_text()
    assert "base" not in sheet.split("\n")[0] and "sft" not in sheet.split("\n")[0]  # blinded
    key = json.loads((workdir / "eval/expert_key.json").read_text())["key"]
    rows = list(csv.DictReader(open(workdir / "eval/expert_sheet.csv")))
    for r in rows:  # the surgeon: sft 5, base 2, and prefers sft (on two items both)
        inv = {m: L for L, m in key[r["item_id"]].items()}
        r[f"score_{inv['sft']}"], r[f"score_{inv['base']}"] = "5", "2"
        r["preferred"] = inv["sft"] if r is not rows[0] and r is not rows[1] else f"{inv['sft']};{inv['base']}"
    filled = tmp_path / "filled.csv"
    with open(filled, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    result = expert.import_sheet(cfg, str(filled))
    assert result["sft"]["score"] == {"mean": 5.0, "std": 0.0} and result["base"]["score"]["mean"] == 2.0
    assert result["sft"]["preferred"] == 6 and result["base"]["preferred"] == 2
    assert json.loads((workdir / "eval/metrics.json").read_text())["expert"]["sft"]["preferred"] == 6
    assert "Expert evaluation" in (workdir / "eval/report.html").read_text()
    rows[0]["score_A"] = "7"
    with open(filled, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(expert.SheetError, match="1-5"):
        expert.import_sheet(cfg, str(filled))


def test_judge_over_gemini_sees_text_only(workdir, tiny_model_dir):
    with FakeLLM(responder=lambda prompt: {"accuracy": 4, "conciseness": 2, "reason": "ok"}) as srv:
        cfg = _cfg(workdir, tiny_model_dir, "judge.backend=gemini", f"judge.base_url={srv.url}", "evaluate.limit=4")
        m = evaluation.run(cfg, force=True)
        assert len(srv.requests) == 4  # base and sft share weights here: identical answers are judged once (cache)
        for req in srv.requests:
            assert gemini_images(req["body"]) == []
            assert "Ground truth:" in json.dumps(req["body"])
    assert m["models"]["sft"]["judge"]["mean"] == pytest.approx(0.8 * 4 + 0.2 * 2)


def test_p_values_and_intervals_read_as_numbers_or_reasons():
    from cmevlm.evaluate.metrics import format_p, mean_std_ci, wilcoxon_test

    assert format_p(0.04321) == "0.0432" and format_p(0.0004) == "< 0.001" and format_p(1.0) == "1"
    assert wilcoxon_test([1.0], [2.0]) == (None, "1 paired item, at least 2 needed")
    assert format_p(None, "no dpo model in this evaluation") == "not computed (no dpo model in this evaluation)"
    s = mean_std_ci([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert s["n"] == 10 and s["ci95"][0] < 5.5 < s["ci95"][1] and s == mean_std_ci(list(range(1, 11)))  # seeded


def test_a_model_of_the_previous_report_missing_now_stops_evaluate(workdir, tiny_model_dir, tmp_path):
    """Re-evaluating in another workdir: model.base, relative, resolves under that workdir; a
    model the last report had and this one lacks stops the stage unless --allow-missing."""
    from cmevlm.cli import main
    from cmevlm.errors import MissingInput

    wd = tmp_path / "again"
    shutil.copytree(workdir, wd)
    shutil.copytree(tiny_model_dir, wd / "models" / "base")
    cfg = _cfg(wd, "models/base", "evaluate.limit=4")
    assert cfg.model.base == f"{wd}/models/base"
    m = evaluation.run(cfg, force=True)
    assert set(m["models"]) == {"base", "sft"} and m["models"]["sft"]["n"] == 4 and len(m["models"]["sft"]["judge"]["ci95"]) == 2
    shutil.rmtree(wd / "models" / "base")
    with pytest.raises(MissingInput, match="previous report had base .* model.base is resolved under the workdir"):
        evaluation.run(_cfg(wd, "models/base", "evaluate.limit=4"), force=True)
    args = ["evaluate", "--set", f"workdir={wd}", "--set", "model.base=models/base", "--set", "data.image_size=56",
            "--set", "evaluate.limit=4", "--set", "evaluate.max_new_tokens=12", "--force"]
    assert main(args) == 2
    assert main([*args, "--allow-missing"]) == 0
    report = (wd / "eval" / "report.md").read_text()
    assert "Left out (missing when this report was written): base" in report and "base vs SFT p = not computed (no base model" in report
    assert "| sft | 4 |" in report


def test_each_sampling_mode_gets_its_own_table_and_tests(workdir, tiny_model_dir):
    """evaluate.sampling: every model also answers under (temperature, top_p, seed); the sampled
    answers live apart from the greedy ones and get their own Table 1 and Wilcoxon line."""
    from cmevlm.evaluate import report

    cfg = _cfg(workdir, tiny_model_dir, "evaluate.limit=4", "evaluate.sampling=[{temperature: 0.7, top_p: 0.9, seed: 5}]")
    m = evaluation.run(cfg, force=True)
    mode = "t0.7_p0.9_s5"
    assert list(m["sampled"]) == [mode] and set(m["sampled"][mode]["models"]) == set(m["models"]) == {"base", "sft"}
    assert all(s["n"] == 4 for s in m["sampled"][mode]["models"].values())
    assert set(m["sampled"][mode]["tests"]) == {"sft_vs_dpo_judge_p", "base_vs_sft_judge_p"}
    rows = Storage().read_parquet(str(workdir / "eval/answers.parquet")).to_pylist()
    assert sorted({(r["model"], r["mode"]) for r in rows}) == [("base", "greedy"), ("base", mode), ("sft", "greedy"), ("sft", mode)]
    assert (workdir / "eval/answers" / f"sft@{mode}").is_dir()
    assert f"## Under sampling ({mode})" in (workdir / "eval/report.md").read_text()
    assert f"Table 1 under sampling ({mode})" in (workdir / "eval/report.html").read_text()
    assert mode in report.sampled_text(m) and report.sampled_text({**m, "sampled": {}}) == ""
    assert evaluation.run(cfg)["skipped"] and not evaluation.run(_cfg(workdir, tiny_model_dir, "evaluate.limit=4")).get("skipped")


def test_answers_the_judge_left_unscored_are_counted_in_the_report():
    from cmevlm.evaluate import report

    rows = [{"judge": 4.0, "judge_reason": "fine"}, {"judge": None, "judge_reason": "judge failed: blocked by the model (SAFETY): not retried"},
            {"judge": None, "judge_reason": "judge failed: invalid JSON after 3 attempts"}]
    counts = evaluation.judge_failures(rows)
    assert counts == {"blocked": 1, "failed": 1}
    assert "1 blocked by the model (not retried), 1 failed" in report.left_out_text({"judge_failed": counts})
    assert report.left_out_text({"judge_failed": {"blocked": 0, "failed": 0}}) is None


def test_the_measures_run_in_ray_actors_and_not_on_the_driver(ray_local):
    """BLEU-4, BERTScore and the rubric measures grow with the test set: they run on a Ray Data
    actor pool with CPU and memory requests (on a cluster: workers, not the 0-CPU head). The
    driver's own CPU time stays a fraction of what the same work costs when done on it, and
    the scores are the same."""
    import random
    import time

    from cmevlm.evaluate import metrics as M

    cfg = load_config(overrides=["evaluate.metrics_batch_size=16"])
    rnd = random.Random(0)
    words = "the pancreas duodenum lies left right of the vein plane angels hair inferior mesenteric here".split()
    rows = [{"answer": " ".join(rnd.choices(words, k=30)), "ground_truth": " ".join(rnd.choices(words, k=30)),
             "structure": "pancreas", "laterality": rnd.choice(["left", "right"])} for _ in range(48)]
    t = time.process_time()
    evaluation.score(cfg, rows)
    driver = time.process_time() - t
    t = time.process_time()
    f1 = M.bertscore_f1([r["answer"] for r in rows], [r["ground_truth"] for r in rows])
    bleu = [M.bleu4(r["answer"], r["ground_truth"]) for r in rows]
    alone = time.process_time() - t
    assert [r["bertscore_f1"] for r in rows] == pytest.approx(f1, abs=1e-5) and [r["bleu4"] for r in rows] == bleu
    assert all({"structure_ok", "laterality_error", "length", "repetition"} <= set(r) for r in rows)
    assert driver < alone / 2, (driver, alone)

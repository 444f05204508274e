"""The expert review app over HTTP (the app's test client) and in headless Chromium: sign-in,
CSRF and cookies, the token off loopback, durable decisions, resume, two tabs, history, images
only from the queues, no case data in logs, and decisions flowing back into the datasets."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from cmevlm import prefer, sample, teach
from cmevlm.config import load_config
from cmevlm.evaluate import evaluation, expert
from cmevlm.errors import ConfigError
from cmevlm.review.app import HEADERS, answered_hosts, create_app, resolve_token, server_config
from cmevlm.reviews import read_history, read_reviews
from cmevlm.storage import Storage
from conftest import free_port, wait_for

# Distinct model names, so that a test can see whether the blinding key reached a page.
MODELS = ("zebramodel", "yakmodel")


def _cfg(workdir, base, *extra):
    return load_config(overrides=[
        f"workdir={workdir}", f"model.base={base}", "data.image_size=56", "sample.batch_size=4", "sample.max_new_tokens=12",
        "sample.limit=8", "judge.batch_size=4", "teacher.review_fraction=0.5", "prefer.review_fraction=1.0",
        "evaluate.max_new_tokens=12", "evaluate.batch_size=8",
        "evaluate.limit=6", "evaluate.expert_n=4", "evaluate.sampling=[]", f"evaluate.models={{{MODELS[0]}: {base}, {MODELS[1]}: models/sft}}", *extra])


@pytest.fixture(scope="module")
def review_run(taught, tmp_path_factory):
    """A workdir with all three queues: answers flagged by teach, pairs flagged by prefer, and
    the expert sheet of an evaluation of two (blinded) models."""
    wd = tmp_path_factory.mktemp("review") / "run"
    shutil.copytree(taught, wd)
    cfg = _cfg(wd, taught / "models/sft")
    assert teach.run(cfg, force=True)["requests_sent"] == 0  # more items flagged, from the cached answers
    sample.run(cfg)
    prefer.run(cfg)
    evaluation.run(cfg)
    expert.export_sheet(cfg)
    return wd


@pytest.fixture
def run_dir(review_run, tmp_path):
    wd = tmp_path / "run"
    shutil.copytree(review_run, wd)
    return wd


def _csrf(html):
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def _sign_in(client, name="Dr Test", token=None):
    page = client.get("/login")
    data = {"csrf": _csrf(page.text), "reviewer": name, "next": "/"}
    if token is not None:
        data["token"] = token
    return client.post("/login", data=data, follow_redirects=False)


def _item_form(client, url):
    page = client.get(url)
    assert page.status_code == 200, page.text
    return page, {"csrf": _csrf(page.text), "item_id": re.search(r'name="item_id" value="([^"]+)"', page.text).group(1),
                  "seen": re.search(r'name="seen" value="(\d+)"', page.text).group(1)}


def _client(run_dir, **kw):
    cfg = _cfg(run_dir, run_dir / "models/sft")
    return cfg, TestClient(create_app(cfg, **kw), base_url="http://127.0.0.1")


# ---------------------------------------------------------------------------------------------
# Sign-in, cookies, CSRF, token


def test_sign_in_sets_a_strict_httponly_session_and_every_post_needs_csrf(run_dir):
    _, c = _client(run_dir)
    r = c.get("/answers/1", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/answers/1"
    assert c.post("/answers/1", data={"decision": "accept"}).status_code == 403  # no session
    first = c.get("/login")
    cookie = first.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
    # no or a wrong CSRF token, or a foreign Origin: refused, nothing written
    assert c.post("/login", data={"reviewer": "x"}).status_code == 403
    assert c.post("/login", data={"reviewer": "x", "csrf": "0" * 64}).status_code == 403
    r = c.post("/login", data={"reviewer": "x", "csrf": _csrf(first.text)}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    old_sid = c.cookies.get("cmevlm_review")
    r = _sign_in(c)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert c.cookies.get("cmevlm_review") != old_sid  # a new session id at sign-in
    assert "HttpOnly" in r.headers["set-cookie"] and "samesite=strict" in r.headers["set-cookie"].lower()
    page, form = _item_form(c, "/answers/1")
    for k, v in HEADERS.items():
        assert page.headers[k] == v
    assert c.post("/answers/1", data={**form, "csrf": "bad", "decision": "accept"}).status_code == 403
    assert c.post("/answers/1", data={**form, "decision": "accept"}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert not (run_dir / "teacher/reviews.jsonl").exists()
    # open redirects through ?next= are not followed
    login = c.get("/login?next=//evil.example/x")
    assert 'name="next" value="/"' in login.text


def test_a_token_is_required_off_loopback(run_dir, monkeypatch):
    monkeypatch.delenv("CMEVLM_REVIEW_TOKEN", raising=False)
    with pytest.raises(ValueError, match="token"):
        resolve_token("0.0.0.0", None)
    assert resolve_token("127.0.0.1", None) is None
    monkeypatch.setenv("CMEVLM_REVIEW_TOKEN", "from-the-environment")
    assert resolve_token("0.0.0.0", None) == "from-the-environment"
    assert resolve_token("0.0.0.0", "given-on-the-command") == "given-on-the-command"
    with pytest.raises(ValueError, match="at least 16 characters"):
        resolve_token("0.0.0.0", "1")  # a token anyone could guess is no token
    assert resolve_token("127.0.0.1", "1") == "1"
    _, c = _client(run_dir, token="s3cret")
    assert 'name="token"' in c.get("/login").text
    assert _sign_in(c, token="wrong").status_code == 401
    assert c.get("/", follow_redirects=False).status_code == 303  # still signed out
    assert _sign_in(c, token="s3cret").status_code == 303
    assert c.get("/").status_code == 200


def test_the_cli_refuses_a_public_address_without_a_token(run_dir, capsys, monkeypatch):
    from cmevlm.cli import main

    monkeypatch.delenv("CMEVLM_REVIEW_TOKEN", raising=False)
    assert main(["review", "--set", f"workdir={run_dir}", "--host", "0.0.0.0"]) == 2
    assert "token" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Decisions


def test_decisions_are_durable_resume_and_can_be_changed_with_history(run_dir):
    cfg, c = _client(run_dir)
    _sign_in(c, "Dr One")
    assert c.get("/answers", follow_redirects=False).headers["location"] == "/answers/1"
    ids = []
    for n, decision in enumerate(("accept", "edit", "reject"), 1):
        _, form = _item_form(c, f"/answers/{n}")
        ids.append(form["item_id"])
        r = c.post(f"/answers/{n}", data={**form, "decision": decision, "text": "The duodenum, edited."}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == f"/answers/{n + 1}"
    lines = [json.loads(x) for x in (run_dir / "teacher/reviews.jsonl").read_text().splitlines()]
    assert [(x["item_id"], x["decision"], x["reviewer"]) for x in lines] == list(zip(ids, ("accept", "edit", "reject"), ["Dr One"] * 3))
    assert lines[1]["text"] == "The duodenum, edited." and "text" not in lines[0] and all(x["ts"] for x in lines)
    # a restarted app resumes at the first undecided item
    _, c2 = _client(run_dir)
    _sign_in(c2, "Dr One")
    assert c2.get("/answers", follow_redirects=False).headers["location"] == "/answers/4"
    assert re.search(r"<b>3</b> of \d+ decided", c2.get("/").text)
    # change item 1 from accept to reject: the last one wins, both stay in the file
    _, form = _item_form(c2, "/answers/1")
    assert form["seen"] == "1"
    c2.post("/answers/1", data={**form, "decision": "reject"})
    assert read_reviews(Storage(), str(run_dir / "teacher/reviews.jsonl"))[ids[0]]["decision"] == "reject"
    assert [r["decision"] for r in read_history(Storage(), str(run_dir / "teacher/reviews.jsonl"), ("accept", "edit", "reject"))
            if r["item_id"] == ids[0]] == ["accept", "reject"]
    page = c2.get("/answers/1").text
    assert "History (2 decisions" in page and "In force: <b>reject</b>" in page
    summary = c2.get("/summary").text
    row = re.search(r'<tr id="row-answers">(.*?)</tr>', summary, re.S).group(1)
    assert re.search(r'class="accept">0<', row) and re.search(r'class="edit">1<', row) and re.search(r'class="reject">2<', row)
    assert "Dr One (3)" in row


def test_two_tabs_never_lose_each_others_decisions(run_dir):
    _, a = _client(run_dir)
    b = TestClient(a.app, base_url="http://127.0.0.1")  # a second browser (own cookie jar) on the same running app
    _sign_in(a, "Dr A")
    _sign_in(b, "Dr B")
    _, fa = _item_form(a, "/preferences/1")
    _, fb = _item_form(b, "/preferences/1")  # both tabs opened the item before either decided
    a.post("/preferences/1", data={**fa, "decision": "accept"})
    r = b.post("/preferences/1", data={**fb, "decision": "swap"})
    assert "had meanwhile been decided (accept by Dr A)" in r.text
    hist = read_history(Storage(), str(run_dir / "preferences/reviews.jsonl"), ("accept", "swap", "reject"))
    assert [(h["decision"], h["reviewer"]) for h in hist] == [("accept", "Dr A"), ("swap", "Dr B")]
    # many clicks at once from both tabs: every one is a whole line in the file
    n_items = len(a.app.state.queues["preferences"].items)
    forms = {(cl, n): _item_form(cl, f"/preferences/{n}")[1] for cl in (a, b) for n in range(1, n_items + 1)}
    codes = []

    def click(client, n, repeat=5):
        for _ in range(repeat):
            codes.append(client.post(f"/preferences/{n}", data={**forms[client, n], "decision": "reject"}).status_code)

    threads = [threading.Thread(target=click, args=key) for key in forms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * len(codes)
    hist = read_history(Storage(), str(run_dir / "preferences/reviews.jsonl"), ("accept", "swap", "reject"))
    assert len(hist) == 2 + 2 * 5 * n_items
    assert a.get("/preferences", follow_redirects=False).headers["location"] == "/preferences/done"


def test_bad_decisions_are_refused_with_a_reason_and_write_nothing(run_dir):
    _, c = _client(run_dir)
    _sign_in(c)
    _, form = _item_form(c, "/answers/1")
    r = c.post("/answers/1", data={**form, "decision": "edit", "text": "   "})
    assert r.status_code == 400 and "an edit needs text" in r.text
    assert c.post("/answers/1", data={**form, "decision": "maybe"}).status_code == 400
    assert c.post("/answers/1", data={**form, "item_id": "someone-else", "decision": "accept"}).status_code == 409
    assert c.post("/answers/999999", data={**form, "decision": "accept"}).status_code == 404
    _, form = _item_form(c, "/expert/1")
    r = c.post("/expert/1", data={**form, "score_A": "4", "preferred": "A"})
    assert r.status_code == 400 and "answer B has no score" in r.text
    r = c.post("/expert/1", data={**form, "score_A": "4", "score_B": "9", "preferred": "A"})
    assert r.status_code == 400
    r = c.post("/expert/1", data={**form, "score_A": "4", "score_B": "3"})
    assert r.status_code == 400 and "preferred" in r.text
    assert not (run_dir / "teacher/reviews.jsonl").exists() and not (run_dir / "eval/expert_reviews.jsonl").exists()


# ---------------------------------------------------------------------------------------------
# Images, the blinding key, logs


def test_images_come_only_from_the_queues(run_dir):
    _, c = _client(run_dir)
    _sign_in(c)
    queue = Storage().read_parquet(str(run_dir / "review/answers.parquet")).to_pylist()
    r = c.get("/image/answers/2")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content == queue[1]["image"]
    assert r.headers["cache-control"] == "no-store"
    for url in ("/image/answers/0", "/image/answers/100000", "/image/../../etc/passwd", "/image/answers/..%2f..%2fetc%2fpasswd",
                "/image/frames/1", "/static/app.py", "/static/..%2fapp.py", "/static/../queues.py", "/%2e%2e/%2e%2e/etc/passwd"):
        r = c.get(url, follow_redirects=False)
        assert r.status_code in (404, 422) and b"root:" not in r.content and b"import" not in r.content, url
    assert c.get("/static/review.css").status_code == 200


def test_expert_scores_stay_blind_and_feed_the_evaluation(run_dir):
    cfg, c = _client(run_dir)
    _sign_in(c)
    key = json.loads((run_dir / "eval/expert_key.json").read_text())
    pages = [c.get("/"), c.get("/summary")]
    for n in range(1, len(key["key"]) + 1):
        page, form = _item_form(c, f"/expert/{n}")
        pages += [page]
        inv = {m: L for L, m in key["key"][form["item_id"]].items()}
        data = {**form, f"score_{inv[MODELS[1]]}": "5", f"score_{inv[MODELS[0]]}": "2", "preferred": inv[MODELS[1]]}
        pages.append(c.post(f"/expert/{n}", data=data))
    for p in pages + [c.get("/expert/1"), c.get("/summary")]:
        assert not any(m in p.text for m in MODELS), "the blinding key reached the browser"
    r = c.post("/expert/merge", data={"csrf": _csrf(c.get("/summary").text)})
    assert "Merged 4 scored items" in r.text
    metrics = json.loads((run_dir / "eval/metrics.json").read_text())["expert"]
    assert metrics[MODELS[1]]["score"] == {"mean": 5.0, "std": 0.0} and metrics[MODELS[1]]["preferred"] == 4
    assert metrics[MODELS[0]]["score"]["mean"] == 2.0 and metrics[MODELS[0]]["n"] == 4
    # the same file through the CLI path
    assert expert.import_sheet(cfg, str(run_dir / "eval/expert_reviews.jsonl"))[MODELS[1]]["n"] == 4


def test_no_case_data_in_logs(run_dir, caplog):
    caplog.set_level(logging.DEBUG)
    cfg, c = _client(run_dir)
    _sign_in(c)
    queue = Storage().read_parquet(str(run_dir / "review/answers.parquet")).to_pylist()
    for n in (1, 2):
        _, form = _item_form(c, f"/answers/{n}")
        c.post(f"/answers/{n}", data={**form, "decision": "edit", "text": "SECRET-EDIT-TEXT"})
        c.get(f"/image/answers/{n}")
    text = caplog.text
    assert "answers #1: edit recorded" in text  # the app does log its decisions
    for row in queue[:2]:
        assert row["item_id"] not in text and row["answer"] not in text and row["prompt"] not in text
    assert "SECRET-EDIT-TEXT" not in text and "procedure" not in text.lower()


# ---------------------------------------------------------------------------------------------
# A surgeon in a real browser: headless Chromium driven through ChromeDriver (Selenium)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
OUTPUT = Path(os.environ.get("CMEVLM_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output")) / "review"


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("headless Chromium is missing: `make install` installs Debian's chromium and chromium-driver (as root)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--window-size=1400,1000",
              f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def review_server(run_dir):
    """`cmevlm review` as a user starts it, on a free loopback port; yields its URL."""
    port = free_port()
    log_file = run_dir.parent / "review-server.log"
    with open(log_file, "w") as log_out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "cmevlm"), "review", "--set", f"workdir={run_dir}", "--port", str(port)],
                                stdout=log_out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(url + "/login", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"cmevlm review did not start:\n{log_file.read_text()}")
                time.sleep(0.3)
        yield url, log_file
        proc.terminate()
        proc.wait(timeout=30)


def test_a_surgeon_reviews_in_headless_chromium_and_the_datasets_follow(run_dir, review_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, server_log = review_server
    OUTPUT.mkdir(parents=True, exist_ok=True)
    d = browser
    wait = WebDriverWait(d, 30)

    def shot(name):
        d.save_screenshot(str(OUTPUT / f"{name}.png"))

    def at(path):
        wait.until(lambda drv: drv.current_url.endswith(path))

    def image_shown():
        wait.until(lambda drv: drv.execute_script("var i = document.getElementById('case-image'); return i.complete && i.naturalWidth > 0"))

    def keys(*k):
        d.find_element(By.TAG_NAME, "body").send_keys(*k)

    # ---- sign in
    d.get(url + "/")
    at("/login?next=/")
    shot("1-login")
    d.find_element(By.ID, "reviewer").send_keys("Dr Browser")
    d.find_element(By.ID, "sign-in").click()
    at("/")
    assert "Dr Browser" in d.page_source
    shot("2-queues")

    # ---- answers: accept (key A), edit (key E, Ctrl+Enter), reject (button)
    d.find_element(By.ID, "nav-answers").click()
    at("/answers/1")
    image_shown()
    d.find_element(By.CSS_SELECTOR, ".viewer").click()  # zoom
    assert d.find_element(By.CSS_SELECTOR, ".viewer").get_attribute("data-zoom") == "2"
    shot("3-answer")
    answer_ids = [d.find_element(By.ID, "item-id").text]
    keys("a")
    at("/answers/2")
    answer_ids.append(d.find_element(By.ID, "item-id").text)
    keys("e")
    text = d.switch_to.active_element
    assert text.get_attribute("id") == "text"
    text.send_keys(Keys.CONTROL, "a")
    text.send_keys("The inferior mesenteric vein runs left of the duodenojejunal flexure; edited by the surgeon.")
    text.send_keys(Keys.CONTROL, Keys.ENTER)
    at("/answers/3")
    answer_ids.append(d.find_element(By.ID, "item-id").text)
    d.find_element(By.ID, "reject").click()
    wait.until(lambda drv: not drv.current_url.endswith("/answers/3"))  # the next undecided, or done
    assert "Saved: reject on item 3" in d.page_source

    # ---- preferences: swap the first flagged pair (key S)
    d.find_element(By.ID, "nav-preferences").click()
    at("/preferences/1")
    n = 1
    while d.find_element(By.ID, "item-id").text in answer_ids:  # a pair whose ground truth the answer reviews leave alone
        n += 1
        d.get(f"{url}/preferences/{n}")
    image_shown()
    shot("4-preference")
    pref_id = d.find_element(By.ID, "item-id").text
    keys("s")
    wait.until(lambda drv: not drv.current_url.endswith(f"/preferences/{n}"))

    # ---- expert: score every blinded answer, prefer A
    d.find_element(By.ID, "nav-expert").click()
    at("/expert/1")
    image_shown()
    expert_id = d.find_element(By.ID, "item-id").text
    letters = [e.get_attribute("id").removeprefix("answer-") for e in d.find_elements(By.CSS_SELECTOR, "section.blinded")]
    assert letters == ["A", "B"]
    for L, s in zip(letters, (4, 2)):
        d.find_element(By.ID, f"score-{L}-{s}").click()
    d.find_element(By.ID, "preferred-A").click()
    shot("5-expert")
    d.find_element(By.ID, "save").click()
    at("/expert/2")

    # ---- the summary counts what was done
    d.find_element(By.ID, "nav-summary").click()
    at("/summary")
    shot("6-summary")
    row = d.find_element(By.ID, "row-answers")
    assert [row.find_element(By.CLASS_NAME, c).text for c in ("accept", "edit", "reject")] == ["1", "1", "1"]
    assert d.find_element(By.ID, "row-preferences").find_element(By.CLASS_NAME, "swap").text == "1"
    assert d.find_element(By.ID, "row-expert").find_element(By.CLASS_NAME, "score").text == "1"
    d.get(url + "/answers/2")
    assert "In force: edit by Dr Browser" in d.find_element(By.ID, "status").text
    shot("7-decided-answer")
    for name in ("1-login", "2-queues", "3-answer", "4-preference", "5-expert", "6-summary", "7-decided-answer"):
        assert (OUTPUT / f"{name}.png").stat().st_size > 5000

    # ---- the server logged no case data
    logged = server_log.read_text()
    assert "answers #3: reject recorded" in logged
    assert not any(i in logged for i in [*answer_ids, pref_id, expert_id])

    # ---- the stages rebuild their datasets with exactly these decisions (no teacher call paid again)
    cfg = _cfg(run_dir, run_dir / "models/sft")
    queue = {r["item_id"]: r for r in Storage().read_parquet(str(run_dir / "review/answers.parquet")).to_pylist()}
    before = {r["item_id"]: r for r in Storage().read_parquet(str(run_dir / "preferences")).to_pylist()}
    m = teach.run(cfg)
    assert (m["reviewed"], m["edited"], m["rejected"], m["requests_sent"]) == (3, 1, 1, 0)
    sft = {r["item_id"]: r for split in ("train", "test") for r in Storage().read_parquet(str(run_dir / "sft" / split)).to_pylist()}
    assert sft[answer_ids[0]]["messages"][1]["content"][0]["text"] == queue[answer_ids[0]]["answer"]
    assert sft[answer_ids[1]]["messages"][1]["content"][0]["text"].endswith("edited by the surgeon.")
    assert answer_ids[2] not in sft
    edited = [i for i, r in sft.items() if r["messages"][1]["content"][0]["text"].endswith("edited by the surgeon.")]
    assert edited == [answer_ids[1]]
    # The judge compares the samples with the SFT answer: where the surgeon edited that answer the
    # question changed and is asked again; a rejected answer leaves the pool. Nothing else is asked.
    sampled = set(Storage().read_parquet(str(run_dir / "samples" / "parts"), columns=["item_id"]).column("item_id").to_pylist())
    edited_in_pool = {answer_ids[1]} & sampled
    m = prefer.run(cfg)
    assert (m["reviewed"], m["swapped"], m["rejected"], m["requests_sent"]) == (1, 1, 0, len(edited_in_pool))
    after = {r["item_id"]: r for r in Storage().read_parquet(str(run_dir / "preferences")).to_pylist()}
    assert set(after) == set(before) - {answer_ids[2]}
    assert after[pref_id]["chosen"] == before[pref_id]["rejected"] and after[pref_id]["rejected"] == before[pref_id]["chosen"]
    assert all(after[i]["chosen"] == before[i]["chosen"] for i in after if i not in {pref_id, *edited_in_pool})
    (score,) = read_history(Storage(), str(run_dir / "eval/expert_reviews.jsonl"), ("score",))
    assert (score["item_id"], score["scores"], score["preferred"], score["reviewer"]) == (expert_id, {"A": 4, "B": 2}, ["A"], "Dr Browser")


def test_a_torn_line_costs_only_itself(run_dir):
    """A write cut short before its newline (a crash, a full disk before this project's appends
    took torn writes back): every page still answers and says what it skipped, and the next
    decision starts on a line of its own instead of being glued onto the torn one."""
    cfg, client = _client(run_dir)
    assert _sign_in(client).status_code == 303
    page, form = _item_form(client, "/answers/1")
    assert client.post("/answers/1", data={**form, "decision": "accept"}, follow_redirects=False).status_code == 303
    reviews = run_dir / "teacher/reviews.jsonl"
    with open(reviews, "a") as f:
        f.write('{"item_id": "x", "decis')  # torn
    for url in ("/", "/answers/2", "/summary"):
        r = client.get(url)
        assert r.status_code == 200 and "torn line" in r.text, url
    page, form = _item_form(client, "/answers/2")
    assert client.post("/answers/2", data={**form, "decision": "reject"}, follow_redirects=False).status_code == 303
    history = read_history(Storage(), str(reviews), ("accept", "edit", "reject"))
    assert [r["decision"] for r in history] == ["accept", "reject"]  # the decision after the torn line is whole
    assert reviews.read_text().splitlines()[1] == '{"item_id": "x", "decis'
    for url in ("/", "/answers/3", "/summary"):
        assert client.get(url).status_code == 200, url


def test_a_rebound_host_name_gets_421_before_anything_is_read(run_dir):
    """DNS rebinding: a page on evil.example that points its name at 127.0.0.1 reaches the app
    with `Host: evil.example`; every route answers 421 before any session or file is touched."""
    cfg, c = _client(run_dir)
    assert _sign_in(c).status_code == 303
    page, form = _item_form(c, "/answers/1")
    before = (run_dir / "teacher/reviews.jsonl").read_bytes() if (run_dir / "teacher/reviews.jsonl").exists() else b""
    evil = {"Host": "evil.example:8090"}
    for url in ("/login", "/", "/answers/1", "/image/answers/1", "/summary", "/static/review.css"):
        assert c.get(url, headers=evil).status_code == 421, url
    assert c.post("/answers/1", data={**form, "decision": "accept"}, headers=evil).status_code == 421
    assert c.post("/login", data={"reviewer": "x"}, headers=evil).status_code == 421
    after = (run_dir / "teacher/reviews.jsonl").read_bytes() if (run_dir / "teacher/reviews.jsonl").exists() else b""
    assert after == before
    for name in ("127.0.0.1:8090", "localhost", "[::1]:8090"):
        assert c.get("/login", headers={"Host": name}).status_code == 200, name
    _, proxied = _client(run_dir, hosts=answered_hosts("127.0.0.1", ("review.hospital.example",)))
    assert proxied.get("/login", headers={"Host": "review.hospital.example"}).status_code == 200
    assert proxied.get("/login", headers={"Host": "evil.example"}).status_code == 421
    with pytest.raises(ConfigError, match="--allowed-host"):
        answered_hosts("0.0.0.0")
    assert answered_hosts("0.0.0.0", ("review.hospital.example",)) == {"review.hospital.example"}


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(run_dir):
    """A client on loopback that sends a new X-Forwarded-For with each guess must not reset its
    sign-in lockout; behind a trusted proxy the forwarded address is the client's."""
    import httpx
    import uvicorn

    cfg = _cfg(run_dir, run_dir / "models/sft")
    for trusted, locked_out in (((), True), (("127.0.0.1",), False)):
        port = free_port()
        server = uvicorn.Server(server_config(create_app(cfg, token="the-right-token-123"), "127.0.0.1", port, trusted))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            assert wait_for(lambda: server.started, 30, 0.1)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                for k in range(5):
                    c.headers["X-Forwarded-For"] = f"10.0.0.{k}"
                    assert _sign_in(c, token="wrong").status_code == 401
                c.headers["X-Forwarded-For"] = "10.0.0.9"
                assert _sign_in(c, token="the-right-token-123").status_code == (429 if locked_out else 303), trusted
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def test_anonymous_visitors_hold_no_server_state_and_cannot_push_a_reviewer_out(run_dir):
    cfg, c = _client(run_dir)
    assert _sign_in(c).status_code == 303
    app = c.app
    before = len(app.state.review.sessions)
    from fastapi.testclient import TestClient

    stranger = TestClient(app, base_url="http://127.0.0.1")
    for _ in range(1001):
        stranger.cookies.clear()
        assert stranger.get("/login").status_code == 200
    assert len(app.state.review.sessions) == before
    assert c.get("/").status_code == 200  # still signed in


def test_sign_in_failures_lock_a_client_out(run_dir):
    _, c = _client(run_dir, token="the-right-token-123")
    for _ in range(5):
        assert _sign_in(c, token="wrong").status_code == 401
    r = _sign_in(c, token="the-right-token-123")
    assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    _, other = _client(run_dir, token="the-right-token-123")  # another app: its own counts
    assert _sign_in(other, token="the-right-token-123").status_code == 303


def test_huge_forms_are_refused_without_growing_the_process(run_dir):
    import psutil

    _, c = _client(run_dir)
    page = c.get("/login")
    body = b"&".join(b"f%d=" % i + b"x" * 2**20 for i in range(200))  # 200 fields of 1 MiB, built before measuring
    rss = psutil.Process().memory_info().rss
    r = c.post("/login", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 413 and "csrf" not in r.text
    assert psutil.Process().memory_info().rss - rss < 100 * 2**20  # the app kept at most 256 KiB of it
    assert c.post("/login", data={"csrf": _csrf(page.text), "reviewer": "Dr Test", "next": "/"}, follow_redirects=False).status_code == 303


def test_idle_sessions_end_and_https_sets_secure_cookies(run_dir):
    import time as _time

    cfg = _cfg(run_dir, run_dir / "models/sft")
    from fastapi.testclient import TestClient

    c = TestClient(create_app(cfg, idle_minutes=0.01, https=True), base_url="https://localhost")
    first = c.get("/login")
    assert "secure" in first.headers["set-cookie"].lower()
    r = c.post("/login", data={"csrf": _csrf(first.text), "reviewer": "Dr Test", "next": "/"}, follow_redirects=False)
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
    assert c.get("/", follow_redirects=False).status_code == 200
    _time.sleep(1.0)
    assert c.get("/", follow_redirects=False).status_code == 303  # idle for longer than 0.6 s: signed out

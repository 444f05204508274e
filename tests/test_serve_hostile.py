"""The serving endpoint under hostile and heavy traffic, over real HTTP on 127.0.0.1 with the
tiny model: every probe a 4xx (or a 200 where the input is valid) counted as such in /metrics,
one bad request batched with good ones failing alone, bodies cut while they stream, keys on
everything but /healthz, real token streaming, schemathesis and hypothesis fuzzing, and a
bounded soak."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cmevlm.cli import main
from cmevlm.config import load_config
from conftest import free_port

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _png(arr, fmt="PNG", mode=None) -> str:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


GOOD_IMAGE = "data:image/png;base64," + _png(np.random.default_rng(0).integers(0, 255, (56, 56, 3), dtype=np.uint8))


def _chat(text="Name the highlighted structure.", image=GOOD_IMAGE, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}]}],
            "max_tokens": 4, **extra}


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from cmevlm.serve import app

    port = free_port()
    cfg = load_config(overrides=[f"workdir={tmp_path_factory.mktemp('hostile')}", f"serve.model={tiny_model_dir}", f"serve.port={port}",
                                 f"serve.api_keys=[{KEY}]", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.2",
                                 "serve.max_tokens_cap=64", "serve.num_cpus_per_replica=0.5", "serve.sampling_defaults=openai", "data.image_size=56", "serve.docs=true",
                                 "serve.max_body_bytes=4194304"])
    app.run(cfg, block=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _post(url, body=None, raw=None, headers=AUTH, timeout=120):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _get(url, headers=AUTH):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _replica_rss() -> int:
    """Resident memory of the deployment's replicas (asked of the actors themselves)."""
    import os

    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "VLMServer" in a["name"]]
    assert names
    pids = [ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).__ray_call__.remote(lambda self: os.getpid())) for a in names]
    return sum(psutil.Process(p).memory_info().rss for p in pids)


def _status_count(server, endpoint, status) -> float:
    text = _get(server + "/metrics")[1].decode()
    line = next((x for x in text.splitlines() if x.startswith(f'cmevlm_requests_total{{endpoint="{endpoint}",status="{status}"}}')), None)
    return float(line.split()[-1]) if line else 0.0


CMYK_MASK = _png(np.pad(np.full((20, 20), 255, np.uint8), 18), fmt="JPEG", mode="CMYK")
FRAME = _png(np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8))

PROBES = [
    ("chat", b"\xff\xfe\x00{\x00}", "not valid JSON"),
    ("chat", b"[" * 50_000 + b"]" * 50_000, "not valid JSON"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]}).encode(), "image_url"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": [1]}}]}]}).encode(), "url"),
    ("chat", json.dumps(_chat(seed=2**70)).encode(), "seed"),
    ("chat", json.dumps(_chat(seed="x", temperature=0.7)).encode(), "seed"),
    ("chat", json.dumps(_chat(stream="false")).encode(), "stream"),
    ("chat", json.dumps(_chat(max_tokens=True)).encode(), "max_tokens"),
    ("chat", json.dumps(_chat(n=100)).encode(), "n"),
    ("chat", json.dumps(_chat(surprise={"nested": [1]})).encode(), None),  # an unknown field is ignored (logged once), as vLLM does
    # A 1 x 300 strip is squared as ingest squares frames (padded to the training size): answered.
    ("chat", json.dumps(_chat(image="data:image/png;base64," + _png(np.zeros((1, 300, 3), np.uint8)))).encode(), None),
    ("chat", json.dumps(_chat(image="data:image/png;base64," + _png(np.zeros((30, 30, 3), np.uint8))[:60])).encode(), "image"),
    ("chat", json.dumps(_chat(text="word " * 5000, max_tokens=64)).encode(), "max_model_len"),
    ("chat", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": GOOD_IMAGE}}] * 2}]}).encode(),
     "max_images_per_request"),
    ("explain", json.dumps({"frame": FRAME, "mask": CMYK_MASK, "max_tokens": 4}).encode(), None),
    ("explain", json.dumps({"frame": FRAME}).encode(), "mask"),
]


@pytest.mark.parametrize("endpoint, raw, fragment", PROBES, ids=[f"{i}-{p[2]}" for i, p in enumerate(PROBES)])
def test_every_probe_is_a_4xx_or_a_valid_200_and_metrics_count_the_status(server, endpoint, raw, fragment):
    url = server + {"chat": "/v1/chat/completions", "explain": "/v1/explain"}[endpoint]
    before = {s: _status_count(server, endpoint, s) for s in (200, 400)}
    status, body = _post(url, raw=raw)
    if fragment is None:  # a CMYK JPEG mask is a valid mask, a 1 x 300 strip a valid frame, an unknown field ignored: answered
        assert status == 200, body
    else:
        assert status == 400 and fragment in json.loads(body)["error"]["message"], body
    assert _status_count(server, endpoint, status) == before[status] + 1


def test_one_bad_request_batched_with_three_good_ones_fails_alone(server):
    bad = [_chat(image="data:image/png;base64," + _png(np.zeros((30, 30, 3), np.uint8))[:60]), _chat(seed="x", temperature=0.7)]
    for b in bad:
        bodies = [b, _chat("One."), _chat("Two."), _chat("Three.")]
        with ThreadPoolExecutor(4) as ex:
            statuses = list(ex.map(lambda body: _post(server + "/v1/chat/completions", body)[0], bodies))
        assert statuses == [400, 200, 200, 200]


def test_24_large_images_are_refused_at_once_without_growing_the_replica(server):
    big = "data:image/png;base64," + _png(np.zeros((4096, 4096, 3), np.uint8))
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}] * 24}], "max_tokens": 4}
    raw = json.dumps(body).encode()
    assert len(raw) < 4 * 2**20
    rss = _replica_rss()
    t0 = time.time()
    status, out = _post(server + "/v1/chat/completions", raw=raw)
    took = time.time() - t0
    print(f"24 images of 4096x4096: {status} in {took * 1000:.0f} ms, replica grew {(_replica_rss() - rss) / 2**20:.0f} MiB")
    message = json.loads(out)["error"]["message"]
    assert status == 400 and "content" in message and "at most 16 items" in message  # refused by its type, before any decoding
    assert took < 1.0 and _replica_rss() - rss < 100 * 2**20, (took, _replica_rss() - rss)


def _raw_http(port: int, head: bytes, chunks, max_send: int) -> tuple[bytes, int]:
    """Send `head`, then chunks until the server answers (or `max_send` bytes went out, or it
    stops reading); returns (the response's first bytes, bytes of body sent)."""
    import select

    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(head)
    sent = 0
    try:
        for chunk in chunks:
            if select.select([s], [], [], 0)[0]:
                break  # the answer is there
            try:
                s.sendall(chunk)
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break  # it stopped reading
            sent += len(chunk)
            if sent >= max_send:
                break
        s.settimeout(30)
        return s.recv(4096), sent
    finally:
        s.close()


def test_bodies_are_cut_while_they_stream(server):
    port = int(server.rsplit(":", 1)[1])
    key = f"Authorization: Bearer {KEY}\r\n".encode()
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + key
    mib = b"x" * 2**20
    rss = _replica_rss()
    got, sent = _raw_http(port, head + b"Transfer-Encoding: chunked\r\n\r\n",
                          (b"%x\r\n%s\r\n" % (len(mib), mib) for _ in range(200)), max_send=200 * 2**20)
    assert got.startswith(b"HTTP/1.1 413"), got[:100]
    print(f"chunked body: 413 after {sent / 2**20:.0f} MiB sent (limit 4 MiB), replica grew {(_replica_rss() - rss) / 2**20:.0f} MiB")
    # How much goes out before the 413 depends on how fast Ray Serve's HTTP proxy takes it in
    # (it buffers a request's body; on an idle machine all 200 MiB go out in ~0.3 s): what is
    # ours to bound is the replica, which keeps at most the limit. The proxy's share is why the
    # README asks for a body limit at the ingress in front of it.
    assert _replica_rss() - rss < 100 * 2**20, _replica_rss() - rss
    t0 = time.time()
    got, _ = _raw_http(port, head + b"Content-Length: 1073741824\r\n\r\n", iter([b"{"]), max_send=1)
    assert got.startswith(b"HTTP/1.1 413") and time.time() - t0 < 5


def test_every_endpoint_but_healthz_needs_a_key(server):
    for path in ("/v1/models", "/metrics", "/openapi.json", "/docs"):
        assert _get(server + path, headers={})[0] == 401, path
        assert _get(server + path, headers={"Authorization": "Bearer wrong"})[0] == 401, path
        assert _get(server + path)[0] == 200, path
    assert _get(server + "/healthz", headers={})[0] == 200
    assert _post(server + "/v1/chat/completions", _chat(), headers={})[0] == 401


def test_a_public_bind_without_keys_refuses_to_start(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("CMEVLM_API_KEYS", raising=False)
    assert main(["serve", "--set", "serve.host=0.0.0.0", "--set", f"serve.model={tiny_model_dir}"]) == 2
    assert "serve.host=0.0.0.0 accepts connections from other machines" in capsys.readouterr().err


def test_stream_true_yields_tokens_as_they_are_generated_with_usage(server):
    ttft_before = _metric_value(server, "cmevlm_time_to_first_token_seconds_count")
    req = urllib.request.Request(server + "/v1/chat/completions", headers={"Content-Type": "application/json", **AUTH},
                                 data=json.dumps(_chat(stream=True, max_tokens=24, temperature=1.0, seed=5,
                                                       stream_options={"include_usage": True})).encode())
    arrivals, events = [], []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: "):
                arrivals.append(time.time())
                events.append(line[6:].strip())
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    content = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) >= 2, chunks  # token by token, not one finished answer
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] >= len(content) and usage["prompt_tokens"] > 0
    assert _metric_value(server, "cmevlm_time_to_first_token_seconds_count") == ttft_before + 1


def _metric_value(server, name) -> float:
    text = _get(server + "/metrics")[1].decode()
    return float(next(x.split()[-1] for x in text.splitlines() if x.startswith(name + " ")))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**80, 2**80) | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
                    max_leaves=20)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(JSON, st.fixed_dictionaries({"messages": JSON}), st.fixed_dictionaries({"frame": JSON, "mask": JSON})),
       endpoint=st.sampled_from(["/v1/chat/completions", "/v1/explain"]))
def test_malformed_bodies_never_get_a_5xx(server, body, endpoint):
    status, out = _post(server + endpoint, body)
    assert 400 <= status < 500 or status == 200, (status, out[:300])


def test_schemathesis_finds_no_server_error(server):
    """Requests generated from the app's own OpenAPI document (bounded), checked for 5xx."""
    import schemathesis
    from hypothesis import given as hgiven
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_dict(json.loads(_get(server + "/openapi.json")[1]))
    for op in schema.get_all_operations():
        operation = op.ok()

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        @hgiven(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(base_url=server, headers=AUTH, checks=[not_a_server_error])

        check()


def test_soak_good_and_bad_mixed_loses_no_good_answer(server):
    """200 requests at concurrency 32, a third of them bad: every good one answered 200, every
    bad one a 400, and the replica's memory bounded."""
    bad = [_chat(seed="x"), _chat(image="data:image/png;base64,@@"), {"messages": []}]
    bodies = [bad[i % 3] if i % 3 == 0 else _chat(f"Item {i}.") for i in range(200)]
    rss = _replica_rss()
    with ThreadPoolExecutor(32) as ex:
        statuses = list(ex.map(lambda b: _post(server + "/v1/chat/completions", b)[0], bodies))
    good = [s for i, s in enumerate(statuses) if i % 3]
    print(f"soak: {len(good)} good all {set(good)}, replica grew {(_replica_rss() - rss) / 2**20:.0f} MiB")
    assert good == [200] * len(good) and [s for i, s in enumerate(statuses) if i % 3 == 0] == [400] * (200 - len(good))
    assert _replica_rss() - rss < 300 * 2**20

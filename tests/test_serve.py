"""The Ray Serve endpoint over real HTTP on 127.0.0.1 with the tiny model: the official openai
client, /v1/explain, auth, every 4xx case, concurrency with batching."""

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
from PIL import Image

from cmevlm.config import load_config
from cmevlm.data.synth import render_frame
from conftest import free_port

KEY = "secret-test-key"


def _png(arr) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(ray_local, tiny_model_dir, tmp_path_factory):
    from ray import serve

    from cmevlm.serve import app

    port = free_port()
    cfg = load_config(overrides=[f"workdir={tmp_path_factory.mktemp('serve')}", f"serve.model={tiny_model_dir}", f"serve.port={port}",
                                 f"serve.api_keys=[{KEY}]", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.2",
                                 "serve.max_tokens_cap=64", "serve.num_cpus_per_replica=0.5", "data.image_size=56"])
    app.run(cfg, block=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def frame_and_mask():
    rng = np.random.default_rng(0)
    frame, masks = render_frame(rng, ["pancreas"], "left", np.zeros(3, np.float32))
    return frame, masks["pancreas"]


def _image_uri(frame) -> str:
    return "data:image/png;base64," + _png(frame[::4, ::4].copy())


def _post(url, body, key=KEY, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _messages(uri, text="Identify the highlighted anatomical structure."):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": text}]}]


def test_openai_client_chat_with_an_image(server, frame_and_mask):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    r = client.chat.completions.create(model="cmevlm", messages=_messages(_image_uri(frame_and_mask[0])), max_tokens=8)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8
    many = client.chat.completions.create(model="cmevlm", messages=_messages(_image_uri(frame_and_mask[0])), max_tokens=6, n=2, temperature=1.0)
    assert len(many.choices) == 2
    assert [m.id for m in client.models.list().data] == ["cmevlm"]


def test_openai_client_streaming(server, frame_and_mask):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    # Sampled (the random tiny model's greedy answers are often empty); the same seed gives the same text.
    kw = dict(model="cmevlm", messages=_messages(_image_uri(frame_and_mask[0])), max_tokens=8, temperature=1.0, seed=3)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert len(chunks) >= 4 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_explain(server, frame_and_mask):
    frame, mask = frame_and_mask
    status, body = _post(server + "/v1/explain", {"frame": _png(frame), "mask": _png(mask.astype(np.uint8) * 255),
                                                   "structure": "pancreas", "laterality": "left", "max_tokens": 8})
    assert status == 200 and set(body) >= {"answer", "structure", "model", "latency_ms"}
    assert body["structure"] == "pancreas" and body["latency_ms"] > 0


def test_wrong_or_missing_key_gets_401(server, frame_and_mask):
    body = {"model": "cmevlm", "messages": _messages(_image_uri(frame_and_mask[0]))}
    assert _post(server + "/v1/chat/completions", body, key="wrong")[0] == 401
    assert _post(server + "/v1/chat/completions", body, key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope").chat.completions.create(model="cmevlm", messages=body["messages"])


@pytest.mark.parametrize("body, fragment", [
    ({"messages": []}, "messages: List should have at least 1 item"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.org/x.png"}}]}]}, "remote image URLs are refused"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, "invalid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}]}]}, "not a readable image"),
    ({"messages": [{"role": "user", "content": "no image here"}]}, "no image"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"max_tokens": 10_000, "messages": [{"role": "user", "content": "x"}]}, "exceeds the cap"),
    ({"temperature": 7, "messages": [{"role": "user", "content": "x"}]}, "temperature"),
])
def test_bad_requests_get_400_with_a_message(server, body, fragment):
    status, out = _post(server + "/v1/chat/completions", body)
    assert status == 400 and fragment in out["error"]["message"]


def test_malformed_json_and_huge_images_and_bodies(server):
    status, out = _post(server + "/v1/chat/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in out["error"]["message"]
    big = np.zeros((4200, 4200), np.uint8)  # 17.6 Mpx > the 16.8 Mpx default limit
    status, out = _post(server + "/v1/explain", {"frame": _png(big), "mask": _png(big)})
    assert status == 400 and "exceeds the limit" in out["error"]["message"]
    status, out = _post(server + "/v1/chat/completions", None, raw=b'{"pad": "' + b"x" * (20 * 2**20) + b'"}')
    assert status == 413
    status, out = _post(server + "/v1/explain", {"frame": _png(np.zeros((20, 20, 3), np.uint8)), "mask": _png(np.zeros((20, 20), np.uint8))})
    assert status == 400 and "empty mask" in out["error"]["message"]


def test_sixteen_parallel_requests_are_batched(server, frame_and_mask):
    uri = _image_uri(frame_and_mask[0])
    results = []

    def one(k):
        results.append(_post(server + "/v1/chat/completions", {"messages": _messages(uri, f"Describe it ({k})."), "max_tokens": 6}))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200] * 16
    metrics = urllib.request.urlopen(urllib.request.Request(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})).read().decode()
    sizes = {float(line.split("le=\"")[1].split("\"")[0]): float(line.split()[-1]) for line in metrics.splitlines()
             if line.startswith("cmevlm_batch_size_bucket") and "+Inf" not in line}
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("cmevlm_batch_size_count")))
    assert count > sizes[1.0], "no batch of more than one request was observed"
    assert 'cmevlm_requests_total{endpoint="chat",status="200"}' in metrics


def test_healthz(server):
    with urllib.request.urlopen(server + "/healthz") as r:
        assert json.loads(r.read())["status"] == "ok"

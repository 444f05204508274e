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

KEY = "secret-test-key-0001"


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
                                 "serve.max_tokens_cap=64", "serve.num_cpus_per_replica=0.5", "serve.sampling_defaults=openai", "data.image_size=56"])
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


# ---------------------------------------------------------------------------------------------
# What clients nobody here wrote send (the official openai SDK; lm-eval, guidellm, LangChain
# send the same fields): vLLM's OpenAI server is the reference.


def _client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY)


def test_text_only_chat_and_the_newer_roles_are_answered(server):
    r = _client(server).chat.completions.create(model="cmevlm", max_tokens=4, messages=[
        {"role": "developer", "content": "You are a surgical assistant."},
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": None}, {"role": "user", "content": "Which structure?"}])
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].message.content, str)


def test_stop_strings_end_the_answer_where_they_begin_streamed_or_not(server, frame_and_mask):
    c = _client(server)
    kw = dict(model="cmevlm", messages=_messages(_image_uri(frame_and_mask[0])), max_tokens=24, temperature=1.0, seed=11)
    full = c.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 6, full
    stop = full[3:6]
    cut = c.chat.completions.create(**kw, stop=[stop, "never-there"])
    assert cut.choices[0].message.content == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(c.chat.completions.create(**kw, stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == full[:full.index(stop)]
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_unknown_fields_are_ignored_and_sampling_fields_are_honoured(server, frame_and_mask):
    c = _client(server)
    kw = dict(model="cmevlm", messages=_messages(_image_uri(frame_and_mask[0])), max_tokens=6)
    r = c.chat.completions.create(**kw, frequency_penalty=0.5, presence_penalty=0.5, store=False, temperature=0.7, seed=1,
                                  extra_body={"top_k": 20, "min_p": 0.05, "ignore_eos": True, "some_future_field": {"a": 1}})
    assert r.usage.completion_tokens == 6  # ignore_eos: the whole budget
    chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True},
                                            extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    assert all(ch.usage is not None for ch in chunks)  # usage in every chunk, as vLLM's continuous_usage_stats
    status, body = _post(server + "/v1/chat/completions", {"messages": _messages(_image_uri(frame_and_mask[0])), "max_tokens": "6"})
    assert status == 400 and body["error"]["param"] == "max_tokens"  # known fields stay strictly typed


def test_without_a_seed_sampling_differs_and_a_tiny_temperature_is_greedy(server, frame_and_mask):
    c = _client(server)
    kw = dict(model="cmevlm", messages=_messages(_image_uri(frame_and_mask[0])), max_tokens=16)
    texts = {c.chat.completions.create(**kw, temperature=1.0).choices[0].message.content for _ in range(4)}
    assert len(texts) > 1, texts
    greedy = c.chat.completions.create(**kw, temperature=0.0).choices[0].message.content
    assert c.chat.completions.create(**kw, temperature=1e-300).choices[0].message.content == greedy


def test_errors_come_in_openais_shape(server):
    c = _client(server)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError, match="tools"):
        c.chat.completions.create(model="cmevlm", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                  tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert c.models.retrieve("cmevlm").id == "cmevlm"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("other")
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        req = urllib.request.Request(server + path, method=method, headers={"Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == status and set(json.loads(err.value.read())["error"]) == {"message", "type", "param", "code"}
    assert _post(server + "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
                 key=None, raw=None)[0] == 401
    lower = urllib.request.Request(server + "/v1/models", headers={"Authorization": f"bearer {KEY}"})
    assert urllib.request.urlopen(lower, timeout=30).status == 200  # the scheme is case-insensitive
    assert urllib.request.urlopen(server + "/health", timeout=30).status == 200


def test_a_text_too_long_for_the_context_is_refused_before_tokenizing(server):
    status, body = _post(server + "/v1/chat/completions", {"messages": [{"role": "system", "content": "x" * 2_000_000},
                                                                        {"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 400 and "characters" in body["error"]["message"] and body["error"]["param"] == "messages"


def test_short_api_keys_refuse_to_start(tiny_model_dir, capsys):
    from cmevlm.cli import main

    assert main(["serve", "--set", "serve.api_keys=[short-key]", "--set", f"serve.model={tiny_model_dir}"]) == 2
    assert "shorter than 16 characters" in capsys.readouterr().err


def _metrics_text(server) -> str:
    return urllib.request.urlopen(urllib.request.Request(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"})).read().decode()


def _metric(server, name) -> float:
    """One unlabelled series' value (0 when it is not there yet)."""
    line = next((x for x in _metrics_text(server).splitlines() if x.startswith(name + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def test_a_client_that_goes_away_stops_its_generation_and_counts_499(server, frame_and_mask):
    import socket

    from conftest import wait_for

    def count(status):
        return _metric(server, f'cmevlm_requests_total{{endpoint="chat",status="{status}"}}')

    before, errors = count("499"), count("500")
    body = json.dumps({"messages": _messages(_image_uri(frame_and_mask[0])), "max_tokens": 64, "n": 8, "temperature": 1.0,
                       "ignore_eos": True, "stream": True}).encode()
    port = int(server.rsplit(":", 1)[1])
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # streaming began
        s.close()
    unstreamed = json.loads(body)
    unstreamed["stream"] = False
    raw = json.dumps(unstreamed).encode()
    queued = _metric(server, "cmevlm_queue_wait_seconds_count")
    s = socket.create_connection(("127.0.0.1", port), timeout=60)  # and one that is not streamed, gone before its answer
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw)
    # until its 8 choices are in a batch, being generated (8 x 64 tokens take seconds)
    wait_for(lambda: _metric(server, "cmevlm_queue_wait_seconds_count") >= queued + 8, 60, poll_s=0.02)
    s.close()
    r = _client(server).chat.completions.create(model="cmevlm", messages=_messages(_image_uri(frame_and_mask[0])), max_tokens=1)
    assert r.choices[0].finish_reason in ("stop", "length")
    wait_for(lambda: count("499") >= before + 4, 60, poll_s=0.5)
    assert count("499") == before + 4 and count("500") == errors, (count("499"), count("200"), count("500"))


def test_unset_sampling_fields_default_to_the_served_models_generation_config(tiny_model_dir):
    from cmevlm.config import load_config
    from cmevlm.serve.app import generation_config
    from cmevlm.serve.requests import generation_params, sampling_defaults
    from cmevlm.serve.schemas import ChatRequest

    cfg = load_config(overrides=[f"serve.model={tiny_model_dir}"])
    defaults = sampling_defaults(generation_config(cfg, str(tiny_model_dir)))  # the real repo's file: 0.1 / 0.001 / top_k 1
    req = ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    p = generation_params(req, cfg, defaults)
    assert (p["temperature"], p["top_p"], p["top_k"]) == (0.1, 0.001, 1)
    given = generation_params(ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "temperature": 0.8, "top_p": 0.9}),
                              cfg, defaults)
    assert (given["temperature"], given["top_p"], given["top_k"]) == (0.8, 0.9, 1)
    assert generation_params(req, cfg, sampling_defaults(None))["temperature"] == 1.0  # OpenAI's, as serve.sampling_defaults=openai


def test_legacy_completions_take_a_prompt_as_it_is(server):
    c = _client(server)
    r = c.completions.create(model="cmevlm", prompt="The pancreas lies", max_tokens=5, temperature=1.0, seed=4)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
    again = c.completions.create(model="cmevlm", prompt="The pancreas lies", max_tokens=5, temperature=1.0, seed=4)
    assert again.choices[0].text == r.choices[0].text
    with pytest.raises(openai.BadRequestError, match="echo"):
        c.completions.create(model="cmevlm", prompt="x", max_tokens=2, echo=True)

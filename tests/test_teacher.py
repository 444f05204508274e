"""TeacherClient with the real SDKs against a loopback server: guard, audit, cache, retries."""

import io
import json
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from PIL import Image

from cmevlm.config import TeacherConfig
from cmevlm.data.composite import encode_png
from cmevlm.storage import Storage
from cmevlm.teacher.backends import TeacherAnswer
from cmevlm.teacher.client import TeacherClient, TeacherFailed
from cmevlm.teacher.limiter import RateLimiter, local_waiter
from cmevlm.teacher.payload import Part, Payload, PrivacyViolation, build_payload, guard, mask_for_teacher
from fake_llm import gemini_images, gemini_texts, openai_images

PROMPT = "Side: left CME.\nHighlighted structure: pancreas.\nWrite the answer."


def _mask(h=64, w=80, seed=0):
    m = np.zeros((h, w), np.uint8)
    r = np.random.default_rng(seed)
    y, x = r.integers(0, h // 2), r.integers(0, w // 2)
    m[y:y + h // 3, x:x + w // 3] = 255
    return encode_png(m)


# What the ingest stage stored per item (<workdir>/frames): each mask a test builds a payload
# with is stored here first, as ingest would have; the guard asks only this.
STORED: dict[str, bytes] = {}


def _client(tmp_path, srv, backend="gemini", **kw):
    cfg = TeacherConfig(backend=backend, base_url=srv.url + ("/v1" if backend == "openai" else ""), timeout_s=1.0,
                        http_attempts=3, backoff_s=0.01, **kw)
    return TeacherClient(cfg, str(tmp_path / "run"), stored_mask=STORED.get)


def _payload(item="item1", mask=None, text=PROMPT):
    STORED[item] = mask if mask is not None else _mask()
    return build_payload(item, "You are a surgeon.", text, STORED[item], 448)


def _audit(tmp_path, event="outcome"):
    """The audit's records of one kind: `outcome` (one per request answered or failed) or `sent`."""
    lines = [json.loads(line) for line in (tmp_path / "run/teacher/audit.jsonl").read_text().splitlines()]
    return [x for x in lines if x["event"] == event]


def _assert_only_text_and_binary_pngs(images):
    for mime, data in images:
        assert mime == "image/png"
        img = Image.open(io.BytesIO(data))
        assert img.mode == "L" and set(np.unique(np.asarray(img)).tolist()) == {0, 255}


def test_gemini_answer_audit_and_cache(tmp_path, fake_llm):
    c = _client(tmp_path, fake_llm)
    a = c.ask(_payload(), TeacherAnswer)
    assert "pancreas" in a.value.answer and not a.cached and a.requests == 1
    assert a.cost_usd == pytest.approx((a.input_tokens * 0.30 + a.output_tokens * 2.50) / 1e6)
    (req,) = fake_llm.requests
    assert ":generateContent" in req["path"] and req["headers"].get("x-goog-api-key") == "test-gemini-key"
    assert any("pancreas" in t for t in gemini_texts(req["body"]))
    _assert_only_text_and_binary_pngs(gemini_images(req["body"]))
    assert req["body"]["generationConfig"]["responseMimeType"] == "application/json"
    (line,) = _audit(tmp_path)
    assert line["item_id"] == "item1" and line["backend"] == "gemini" and [p["kind"] for p in line["parts"]] == ["text", "mask"]
    assert {"response_sha256", "input_tokens", "output_tokens", "cost_usd", "time", "model"} <= set(line)
    again = _client(tmp_path, fake_llm).ask(_payload(), TeacherAnswer)  # a new process would see the same cache
    assert again.cached and again.value == a.value and len(fake_llm.requests) == 1 and len(_audit(tmp_path)) == 1


def test_cache_key_covers_the_mask_and_the_prompt(tmp_path, fake_llm):
    c = _client(tmp_path, fake_llm)
    c.ask(_payload(), TeacherAnswer)
    c.ask(_payload(mask=_mask(seed=1)), TeacherAnswer)
    c.ask(_payload(text=PROMPT + " Shorter."), TeacherAnswer)
    assert len(fake_llm.requests) == 3


def test_sdk_retries_429_and_503(tmp_path, fake_llm):
    fake_llm.faults += ["429", "503"]
    a = _client(tmp_path, fake_llm).ask(_payload(), TeacherAnswer)
    assert "pancreas" in a.value.answer
    assert [r["status"] for r in fake_llm.requests] == [429, 503, 200]


def test_malformed_json_is_retried_then_quarantined_with_the_raw_text(tmp_path, fake_llm):
    fake_llm.faults += ["malformed"]
    a = _client(tmp_path, fake_llm).ask(_payload(), TeacherAnswer)
    assert a.requests == 2 and len(_audit(tmp_path)) == 2
    fake_llm.faults += ["malformed"] * 3
    with pytest.raises(TeacherFailed) as e:
        _client(tmp_path, fake_llm, max_attempts=3).ask(_payload("item2", mask=_mask(seed=2)), TeacherAnswer)
    assert "malformed" in e.value.reason and e.value.raw == "this is {not json"


@pytest.mark.parametrize("fault", ["timeout", "drop"])
def test_timeouts_and_dropped_connections_are_retried(tmp_path, fake_llm, fault):
    fake_llm.faults += [fault]
    a = _client(tmp_path, fake_llm).ask(_payload(), TeacherAnswer)
    assert "pancreas" in a.value.answer and len(fake_llm.answered()) == 1
    errors = [line for line in _audit(tmp_path) if "error" in line]
    assert len(_audit(tmp_path)) - len(errors) == 1


def test_unavailable_teacher_fails_the_item_not_the_run(tmp_path, fake_llm):
    fake_llm.faults += ["503"] * 20
    with pytest.raises(TeacherFailed, match="after 2 attempts"):
        _client(tmp_path, fake_llm, max_attempts=2).ask(_payload(), TeacherAnswer)
    assert not (tmp_path / "run/teacher/cache").exists()


def test_openai_backend(tmp_path, fake_llm):
    a = _client(tmp_path, fake_llm, backend="openai", model="llama-vision").ask(_payload(), TeacherAnswer)
    assert "pancreas" in a.value.answer
    (req,) = fake_llm.requests
    assert req["path"] == "/v1/chat/completions" and req["body"]["model"] == "llama-vision"
    assert req["body"]["response_format"] == {"type": "json_object"}
    _assert_only_text_and_binary_pngs(openai_images(req["body"]))
    assert len(openai_images(req["body"])) == 1


# ---- the privacy guard ------------------------------------------------------------------------

def _frame_png(seed=0, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    return encode_png(arr if mode == "RGB" else arr[..., 0])


@pytest.mark.parametrize("make, why", [
    (lambda: _frame_png(), "not single-channel"),  # a frame or a composite
    (lambda: _frame_png(mode="L"), "not exactly 0 and 255"),  # a grey frame
    (lambda: b"\xff\xd8\xff\xe0 a jpeg", "not a PNG"),
    (lambda: encode_png((np.arange(500 * 500).reshape(500, 500) % 2 * 255).astype(np.uint8)), "larger than"),
])
def test_guard_blocks_anything_but_a_binary_mask_and_sends_nothing(tmp_path, fake_llm, make, why):
    STORED["item1"] = _mask()
    bad = Payload("item1", "sys", (Part("text", text=PROMPT), Part("mask", data=make())))
    with pytest.raises(PrivacyViolation, match=why):
        _client(tmp_path, fake_llm).ask(bad, TeacherAnswer)
    assert fake_llm.requests == [] and not (tmp_path / "run/teacher/audit.jsonl").exists()


def test_guard_blocks_another_items_mask_and_extra_images(tmp_path, fake_llm):
    p = _payload("item1")
    other = mask_for_teacher(_mask(seed=7), 448)
    swapped = Payload(p.item_id, p.system, (p.parts[0], Part("mask", data=other)))
    with pytest.raises(PrivacyViolation, match="hash mismatch"):
        _client(tmp_path, fake_llm).ask(swapped, TeacherAnswer)
    twice = Payload(p.item_id, p.system, (*p.parts, p.parts[1]))
    with pytest.raises(PrivacyViolation, match="at most one mask"):
        guard(twice, 448, STORED.get)
    smuggled = Payload(p.item_id, p.system, (Part("image", data=_frame_png()),))
    with pytest.raises(PrivacyViolation, match="not allowed"):
        guard(smuggled, 448, STORED.get)
    assert fake_llm.requests == []


def test_builder_downscales_masks_to_mask_size():
    big = np.zeros((900, 1200), np.uint8)
    big[100:500, 200:800] = 255
    p = build_payload("i", "s", "t", encode_png(big), mask_size=300)
    img = Image.open(io.BytesIO(p.mask))
    assert max(img.size) == 300
    guard(p, 300, {"i": encode_png(big)}.get)  # the stored mask at full size: compared at mask_size


def test_send_mask_false_sends_text_only(tmp_path, fake_llm):
    p = build_payload("i", "s", PROMPT, None, 448)
    _client(tmp_path, fake_llm).ask(p, TeacherAnswer)
    assert gemini_images(fake_llm.requests[0]["body"]) == []


@pytest.fixture(scope="module")
def shared_llm():
    from fake_llm import FakeLLM

    with FakeLLM() as srv:
        yield srv


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=hst.integers(0, 10_000), h=hst.integers(16, 120), w=hst.integers(16, 120), thresh=hst.integers(1, 254))
def test_property_no_request_carries_more_than_text_and_a_binary_png(tmp_path_factory, shared_llm, seed, h, w, thresh):
    """Random frames and masks of any shape: whatever the builder makes, the server sees only
    text and one 0/255 PNG, and the frame's bytes appear nowhere in the request."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = (frame[..., 0] > thresh).astype(np.uint8) * 255
    if not mask.any() or mask.all():
        return
    shared_llm.requests.clear()
    STORED["it"] = encode_png(mask)
    _client(tmp_path_factory.mktemp("prop"), shared_llm).ask(build_payload("it", "s", PROMPT, STORED["it"], 448), TeacherAnswer)
    (req,) = shared_llm.requests
    imgs = gemini_images(req["body"])
    assert len(imgs) == 1
    _assert_only_text_and_binary_pngs(imgs)
    assert frame.tobytes()[:64] not in req["raw"] and encode_png(frame) not in req["raw"]


# ---- the rate limiter ---------------------------------------------------------------------------

def test_limiter_spaces_requests_and_tokens():
    now = [0.0]
    lim = RateLimiter(rpm=60, tpm=6000, clock=lambda: now[0])
    assert [lim.reserve(10) for _ in range(3)] == [0.0, 1.0, 2.0]  # one request a second
    lim2 = RateLimiter(rpm=6000, tpm=600, clock=lambda: now[0])
    assert lim2.reserve(100) == 0.0 and lim2.reserve(100) == pytest.approx(10.0)  # 100 tokens = 10 s of a 600 TPM quota


def test_limiter_holds_the_configured_rpm_across_threads(tmp_path, fake_llm):
    """Four threads share one limiter at 1200 RPM: 16 requests cannot span less than 15
    intervals of 50 ms at the server."""
    cfg = TeacherConfig(backend="gemini", base_url=fake_llm.url, rpm=1200)
    wait = local_waiter(RateLimiter(cfg.rpm, cfg.tpm))
    clients = [TeacherClient(cfg, str(tmp_path / "run"), wait=wait, stored_mask=STORED.get) for _ in range(4)]
    threads = [threading.Thread(target=lambda c=c, k=k: [c.ask(_payload(f"i{k}-{j}", mask=_mask(seed=k * 10 + j)), TeacherAnswer) for j in range(4)])
               for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    times = sorted(r["time"] for r in fake_llm.requests)
    assert len(times) == 16
    assert times[-1] - times[0] >= 15 * 0.05 * 0.95
    gaps = np.diff(times)
    assert (gaps > 0.03).sum() >= 13  # spaced, not bursts


def test_audit_parts_merge_on_object_storage(s3_bucket, tmp_path, fake_llm):
    from cmevlm.teacher.client import merge_audit

    cfg = TeacherConfig(backend="gemini", base_url=fake_llm.url)
    run = s3_bucket + "/run"
    for k in range(2):
        c = TeacherClient(cfg, run, stored_mask=STORED.get)
        c.ask(_payload(f"i{k}", mask=_mask(seed=k)), TeacherAnswer)
        c.audit.flush()
    assert merge_audit(Storage(), run + "/teacher/audit.jsonl") == 2
    assert Storage().list_files(run + "/teacher/audit.jsonl.d") == []


# ---- a guard that trusts no byte ------------------------------------------------------------


def _crafted(pixels: np.ndarray, how: str) -> bytes:
    """The item's mask pixels in a hand-made PNG that carries something else besides."""
    from PIL import PngImagePlugin

    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    if how == "text_chunk":
        info = PngImagePlugin.PngInfo()
        info.add_text("secret", "patient frame " * 300)
        img.save(buf, format="PNG", pnginfo=info)
    elif how == "exif":
        exif = Image.Exif()
        exif[0x010E] = "x" * 4000
        img.save(buf, format="PNG", exif=exif)
    elif how == "trailing":
        img.save(buf, format="PNG")
        buf.write(encode_png(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)))  # a PNG after IEND
    elif how == "palette":
        img.convert("P").save(buf, format="PNG")
    elif how == "sixteen_bit":
        Image.fromarray(pixels.astype(np.uint16) * 257).save(buf, format="PNG")
    elif how == "apng":
        img.save(buf, format="PNG", save_all=True, append_images=[Image.fromarray(255 - pixels)], duration=100)
    elif how == "optimized":  # (PIL writes no interlaced PNG; an optimised one has other filters and zlib settings)
        img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


CRAFTS = ("text_chunk", "exif", "trailing", "palette", "sixteen_bit", "apng", "optimized")


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=hst.integers(0, 1000), how=hst.sampled_from(CRAFTS),
       text=hst.sampled_from([PROMPT, PROMPT + " data:image/png;base64,iVBORw0KGgo=", PROMPT + " " + "QUJD" * 80 + "+/9=",
                              PROMPT + " " + "pancreas" * 40]))
def test_every_byte_that_leaves_is_text_or_a_fresh_encoding_of_the_items_mask(seed, how, text):
    """Hand-built payloads: the item's own mask pixels wrapped in text/EXIF chunks, data after
    IEND, a palette, 16 bits, APNG frames, other zlib settings; texts with a data: URI or a base64 run.
    The guard either refuses, or returns a payload whose only image is the canonical 0/255
    encoding of the item's pixels and whose texts are the texts given."""
    item = _mask(seed=seed)
    built = _payload(mask=item, text=PROMPT)
    pixels = np.asarray(Image.open(io.BytesIO(built.mask)))
    crafted = Payload(built.item_id, built.system, (Part("text", text=text), Part("mask", data=_crafted(pixels, how))))
    try:
        out = guard(crafted, 448, {built.item_id: item}.get)
    except PrivacyViolation:
        return
    assert "data:" not in text and "QUJD" not in text  # those must be refused
    (t, m) = out.parts
    assert t.kind == "text" and t.text == text and m.kind == "mask"
    assert m.data == encode_png(pixels, compress_level=9) == built.mask  # nothing of the crafted file survives


def test_the_audit_is_written_ahead_of_every_request(tmp_path, fake_llm):
    """A `sent` record (what leaves, hashed) is on disk before the request leaves, its outcome
    after, with the same request_id."""
    client = _client(tmp_path, fake_llm)
    seen = []
    send = client.backend.send

    def spy(payload, schema):  # what the log holds at the moment the request leaves
        seen.append([json.loads(x)["event"] for x in (tmp_path / "run/teacher/audit.jsonl").read_text().splitlines()])
        return send(payload, schema)

    client.backend.send = spy
    client.ask(_payload("w1"), TeacherAnswer)
    assert seen == [["sent"]]
    (sent,), (outcome,) = _audit(tmp_path, "sent"), _audit(tmp_path)
    assert sent["request_id"] == outcome["request_id"] and sent["parts"] == outcome["parts"]
    assert [p["kind"] for p in sent["parts"]] == ["text", "mask"] and all(len(p["sha256"]) == 64 for p in sent["parts"])


def test_an_expired_batch_job_leaves_every_payload_audited_as_sent(tmp_path, fake_llm):
    cfg = TeacherConfig(backend="gemini", base_url=fake_llm.url, batch=True, batch_poll_s=0.01)
    client = TeacherClient(cfg, str(tmp_path / "run"), stored_mask=STORED.get)
    fake_llm.batch_end = "BATCH_STATE_EXPIRED"
    payloads = [_payload(f"b{k}", mask=_mask(seed=k)) for k in range(3)]
    with pytest.raises(RuntimeError, match="EXPIRED"):
        client.ask_batch(payloads, TeacherAnswer, str(tmp_path / "run/teacher/batches"))
    sent = _audit(tmp_path, "sent")
    assert [s["item_id"] for s in sent] == ["b0", "b1", "b2"] and _audit(tmp_path) == []
    assert [p["sha256"] for p in sent[0]["parts"]] == [p.describe()["sha256"] for p in payloads[0].parts]


def _encodings(raw: bytes, width: int, group: int):
    """A frame's bytes written every way a payload could smuggle them through text."""
    import base64

    b64, url, hx = base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("="), raw.hex()
    return {
        "base64": b64,
        "wrapped": "\n".join(b64[i:i + width] for i in range(0, len(b64), width)),
        "split": " ".join(b64[i:i + group] for i in range(0, len(b64), group)),
        "urlsafe": url,
        "urlsafe split": "\r\n".join(url[i:i + width] for i in range(0, len(url), width)),
        "hex": hx,
        "hex split": " ".join(hx[i:i + group * 2] for i in range(0, len(hx), group * 2)),
        "data uri": "data:image/png;name=f.png;base64,\n" + "\n".join(b64[i:i + width] for i in range(0, len(b64), width)),
        "data uri split": "data : image / png ; charset=x ; base64 , " + b64[:40],
        "data uri, no base64": "data:image/png,%89PNG%0D%0A",
    }


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=hst.integers(0, 10_000), side=hst.integers(24, 64), width=hst.sampled_from([60, 64, 76, 120]),
       group=hst.integers(2, 16), how=hst.sampled_from(["base64", "wrapped", "split", "urlsafe", "urlsafe split", "hex", "hex split",
                                                          "data uri", "data uri split", "data uri, no base64"]),
       where=hst.sampled_from(["text", "system"]))
def test_a_frame_in_text_is_refused_however_it_is_encoded(seed, side, width, group, how, where):
    """The guard normalises before it looks: a frame (random pixels, as PNG or JPEG) in base64
    wrapped at any width or split into groups, base64url, hex, or a data: URI with parameters and
    line breaks, in a text part or in the system prompt, never passes."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG" if seed % 2 else "JPEG")
    smuggled = f"{PROMPT}\nReference: {_encodings(buf.getvalue(), width, group)[how]}\nThanks."
    honest = _payload()
    payload = Payload(honest.item_id, smuggled if where == "system" else honest.system,
                      (Part("text", text=PROMPT if where == "system" else smuggled), *honest.parts[1:]))
    with pytest.raises(PrivacyViolation):
        guard(payload, 448, STORED.get)


def test_honest_prompts_and_answers_still_pass_the_guard():
    """What the project sends: its prompt templates with every structure and side, and long
    clinical prose with numbers, pass unchanged."""
    from cmevlm.anatomy import STRUCTURES
    from cmevlm.teacher import prompts

    prose = ("The inferior mesenteric vein runs 2 to 3 cm lateral to the duodenojejunal flexure and is divided at the lower "
             "border of the pancreas in CME; the ileocolic vessels arise from the superior mesenteric axis at level L2 ") * 4
    texts = [prose, "ICG 0.25 mg/kg T3N1M0 " * 20, *(v for k, v in vars(prompts).items() if k.isupper() and isinstance(v, str))]
    texts += [f"Side: {side} CME.\nHighlighted structure: {s}.\nWrite the answer." for s in STRUCTURES for side in ("left", "right")]
    for text in texts:
        out = guard(_payload(text=text), 448, STORED.get)
        assert out.parts[0].text == text


def test_a_dithered_frame_never_passes_as_the_items_mask_whatever_the_payload_declares(tmp_path, fake_llm):
    """A hand-built payload whose mask part is a frame dithered to 0/255 (recognisable at
    448x448): the payload has no say in what the mask must be; the stored one decides."""
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 255, (448, 448), dtype=np.uint8)
    dithered = encode_png(((frame > rng.integers(0, 255, frame.shape)) * 255).astype(np.uint8))
    _payload("item9")  # item9's own mask is stored, as ingest stores it
    hostile = build_payload("item9", "You are a surgeon.", PROMPT, dithered, 448)  # the builder itself would wrap it
    with pytest.raises(PrivacyViolation, match="not this item's stored mask"):
        _client(tmp_path, fake_llm).ask(hostile, TeacherAnswer)
    with pytest.raises(PrivacyViolation, match="not this item's stored mask"):  # nor for an item with no stored mask
        guard(build_payload("unknown-item", "s", PROMPT, dithered, 448), 448, STORED.get)
    assert fake_llm.requests == []


def test_the_client_reads_each_items_mask_from_the_ingested_frames(tmp_path, fake_llm):
    import pyarrow as pa

    from cmevlm.storage import Storage

    mask = _mask(seed=11)
    Storage().write_parquet(str(tmp_path / "run/frames/shards/part-0.parquet"),
                            pa.table({"item_id": ["f1"], "mask": [mask], "composite": [b"never read"]}))
    client = TeacherClient(TeacherConfig(backend="gemini", base_url=fake_llm.url, backoff_s=0.01), str(tmp_path / "run"))
    assert "pancreas" in client.ask(build_payload("f1", "s", PROMPT, mask, 448), TeacherAnswer).value.answer
    with pytest.raises(PrivacyViolation, match="stored mask"):
        client.ask(build_payload("f1", "s", PROMPT + " again", _mask(seed=12), 448), TeacherAnswer)

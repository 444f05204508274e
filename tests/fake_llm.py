"""A loopback HTTP server that speaks the Gemini and OpenAI wire protocols, for tests and benches.

The real SDKs (google-genai, openai) talk to it through their `base_url`. It logs every request
(path, headers, parsed body), can add latency, and injects faults from a queue: HTTP 429/503,
a stall past the client's timeout, a dropped connection, or a 200 whose text is not JSON.

    with FakeLLM() as srv:   # srv.url, srv.requests, srv.faults.extend(["429", "malformed"])
        ...
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GEMINI_PATH = re.compile(r"^/(?P<version>v1\w*)/models/(?P<model>[^:/]+):generateContent$")
BATCH_CREATE = re.compile(r"^/(?P<version>v1\w*)/models/(?P<model>[^:/]+):batchGenerateContent$")
BATCH_GET = re.compile(r"^/(?P<version>v1\w*)/(?P<name>batches/[^/?]+)$")


def default_answer(prompt: str) -> dict:
    m = re.search(r"^Highlighted structure: (.+?)\.$", prompt, re.M)
    side = re.search(r"^Side: (\w+) CME", prompt, re.M)
    name = m.group(1) if m else "structure"
    return {"answer": f"The highlighted structure is the {name} in this {side.group(1) if side else 'left'} CME. Fake expert answer."}


def gemini_texts(body: dict) -> list[str]:
    out = [p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", []) if "text" in p]
    si = body.get("systemInstruction") or body.get("system_instruction")
    if si:
        out += [p.get("text", "") for p in si.get("parts", [])]
    return out


def gemini_images(body: dict) -> list[tuple[str, bytes]]:
    """(mime type, bytes) of every inline part of a generateContent body."""
    out = []
    for c in body.get("contents", []):
        for p in c.get("parts", []):
            blob = p.get("inlineData") or p.get("inline_data")
            if blob:
                # the SDK sends URL-safe base64
                out.append((blob.get("mimeType") or blob.get("mime_type"), base64.urlsafe_b64decode(blob["data"].replace("+", "-").replace("/", "_"))))
    return out


def openai_images(body: dict) -> list[tuple[str, bytes]]:
    out = []
    for msg in body.get("messages", []):
        content = msg.get("content")
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                url = part["image_url"]["url"]
                head, data = url.split(",", 1)
                out.append((head[5:].split(";")[0], base64.b64decode(data)))
    return out


def openai_texts(body: dict) -> list[str]:
    out = []
    for msg in body.get("messages", []):
        content = msg.get("content")
        if isinstance(content, str):
            out.append(content)
        else:
            out += [p.get("text", "") for p in content or [] if p.get("type") == "text"]
    return out


class FakeLLM:
    def __init__(self, latency: float = 0.0, responder=default_answer, think: int = 0, block_fraction: float = 0.0):
        """`think`: thinking tokens a Gemini reply spends unless the request's thinkingBudget is
        lower (as 2.5 models do by default); thoughts count against maxOutputTokens, and a reply
        whose thoughts and answer do not fit ends MAX_TOKENS with no text. `block_fraction`: the
        share of prompts (by hash, so the same prompt always) answered with a SAFETY block."""
        self.latency, self.responder = latency, responder
        self.think, self.block_fraction = think, block_fraction
        self.requests: list[dict] = []
        self.faults: list[str] = []
        self.batches: dict[str, dict] = {}  # name -> {"responses": [...], "polls": n}
        self.batch_end = "BATCH_STATE_SUCCEEDED"  # or BATCH_STATE_EXPIRED: a job that ends unanswered
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def answered(self) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["status"] == 200]

    def blocked(self, prompt: str) -> bool:
        import hashlib

        return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % 1000 < self.block_fraction * 1000

    def _gemini_response(self, body: dict, model: str, fault: str | None) -> dict:
        prompt = "\n".join(gemini_texts(body))
        gen = body.get("generationConfig") or body.get("generation_config") or {}
        limit = gen.get("maxOutputTokens") or 8192
        thinking = gen.get("thinkingConfig") or {}
        budget = thinking.get("thinkingBudget", thinking.get("thinking_budget"))  # the SDK sends either spelling
        thoughts = min(self.think, budget) if budget is not None else self.think
        usage = {"promptTokenCount": len(prompt) // 4, "thoughtsTokenCount": thoughts}
        if fault == "prompt_block":
            return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": usage, "modelVersion": model}
        if self.blocked(prompt):
            return {"candidates": [{"finishReason": "SAFETY", "index": 0, "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}]}],
                "usageMetadata": {**usage, "thoughtsTokenCount": 0}, "modelVersion": model}
        text = "this is {not json" if fault == "malformed" else json.dumps(self.responder(prompt))
        if thoughts + len(text) // 4 > limit:  # thinking spent the budget: no text at all
            return {"candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "MAX_TOKENS", "index": 0}],
                    "usageMetadata": {**usage, "thoughtsTokenCount": min(thoughts, limit), "candidatesTokenCount": 0},
                    "modelVersion": model}
        return {
            "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {**usage, "candidatesTokenCount": len(text) // 4,
                              "totalTokenCount": len(prompt) // 4 + len(text) // 4 + thoughts},
            "modelVersion": model,
        }

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_unparsed": raw.decode("latin-1")}
                with fake.lock:
                    fault = fake.faults.pop(0) if fake.faults else None
                    record = {"path": self.path, "headers": dict(self.headers), "body": body, "raw": raw, "time": time.time(), "fault": fault, "status": "pending"}
                    fake.requests.append(record)
                if fake.latency:
                    time.sleep(fake.latency)
                if fault in ("429", "503", "500"):
                    record["status"] = int(fault)
                    return self._send(int(fault), {"error": {"code": int(fault), "message": "injected", "status": "UNAVAILABLE"}})
                if fault == "timeout":
                    record["status"] = "timeout"
                    time.sleep(3.0)
                    return self._send(200, {})
                if fault == "drop":
                    record["status"] = "drop"
                    self.close_connection = True
                    self.connection.close()
                    return
                record["status"] = 200
                m = GEMINI_PATH.match(self.path.split("?")[0])
                if m:
                    resp = fake._gemini_response(body, m["model"], fault)
                    record["response_usage"] = resp.get("usageMetadata")
                    return self._send(200, resp)
                m = BATCH_CREATE.match(self.path.split("?")[0])
                if m:
                    reqs = body["batch"]["inputConfig"]["requests"]["requests"]
                    with fake.lock:
                        name = f"batches/{len(fake.batches) + 1}"
                        fake.batches[name] = {"polls": 0, "responses": [
                            {"response": fake._gemini_response(r["request"], m["model"], fault if k == 0 else None), "metadata": r.get("metadata")}
                            for k, r in enumerate(reqs)]}
                    return self._send(200, {"name": name, "metadata": {"state": "BATCH_STATE_PENDING", "model": m["model"]}})
                if self.path.split("?")[0].endswith("/chat/completions"):
                    prompt = "\n".join(openai_texts(body))
                    text = "this is {not json" if fault == "malformed" else json.dumps(fake.responder(prompt))
                    return self._send(200, {
                        "id": f"chatcmpl-{len(fake.requests)}", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model", "fake"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4,
                                  "total_tokens": len(prompt) // 4 + len(text) // 4},
                    })
                record["status"] = 404
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self):
                m = BATCH_GET.match(self.path.split("?")[0])
                with fake.lock:
                    fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": {}, "raw": b"", "time": time.time(),
                                          "fault": None, "status": 200 if m else 404})
                    job = fake.batches.get(m["name"]) if m else None
                if job is None:
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                job["polls"] += 1
                if job["polls"] < 2:  # running at the first poll: the client must wait
                    return self._send(200, {"name": m["name"], "metadata": {"state": "BATCH_STATE_RUNNING"}})
                if fake.batch_end != "BATCH_STATE_SUCCEEDED":
                    return self._send(200, {"name": m["name"], "metadata": {"state": fake.batch_end}})
                return self._send(200, {"name": m["name"], "metadata": {
                    "state": "BATCH_STATE_SUCCEEDED", "output": {"inlinedResponses": {"inlinedResponses": job["responses"]}}}})

            def _send(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

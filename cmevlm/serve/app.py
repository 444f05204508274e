"""The Ray Serve application: an OpenAI-compatible chat endpoint and the clinical /v1/explain.

    cmevlm serve --config configs/demo.yaml [--set serve.model=models/dpo] [--port 8000]
    # RayService serveConfigV2: import_path: cmevlm.serve.app:build_app, args: {config: /etc/cmevlm/run.yaml}

One deployment; each replica loads the model once (local path or s3://) and batches
concurrent requests into one `generate` call per sampling setting (`@serve.batch`). Replicas
autoscale between serve.min_replicas and serve.max_replicas; on a cluster each takes a GPU of
the serving pool. /v1/explain builds the composite with the ingest overlay code, so what the
model sees in the clinic is what it learned from.

Endpoints: POST /v1/chat/completions (stream: true gives server-sent events), POST /v1/explain,
GET /v1/models, GET /healthz (ready once the model is loaded), GET /metrics (Prometheus).
"""

# No `from __future__ import annotations` here: FastAPI must see the real Request type.

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from ray import serve

from cmevlm.config import RunConfig, load_config
from cmevlm.serve.requests import BadRequest, chat_conversation, check_auth, explain_inputs, generation_params

log = logging.getLogger("cmevlm.serve")
api = FastAPI(title="cmevlm", description="Anatomy explanation for Complete Mesocolic Excision, served inside the hospital.")


@dataclass
class Job:
    conversation: list[dict]
    images: list
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    result: tuple = field(default=())


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    return reg, {
        "requests": Counter("cmevlm_requests_total", "HTTP requests", ["endpoint", "status"], registry=reg),
        "latency": Histogram("cmevlm_request_latency_seconds", "Request latency", ["endpoint"], registry=reg,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)),
        "tokens": Counter("cmevlm_tokens_total", "Tokens", ["kind"], registry=reg),
        "batch": Histogram("cmevlm_batch_size", "Requests per generate batch", registry=reg, buckets=(1, 2, 4, 8, 16, 32, 64)),
    }


def _sse(rid: str, created: int, model: str, results):
    """Server-sent events in the OpenAI streaming shape: a role chunk, word chunks, a final
    chunk with finish_reason, then [DONE]."""
    for i, (text, _, _) in enumerate(results):
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
        yield f"data: {json.dumps({**base, 'choices': [{'index': i, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None}]})}\n\n"
        words = text.split(" ")
        for k, w in enumerate(words):
            piece = w if k == 0 else " " + w
            yield f"data: {json.dumps({**base, 'choices': [{'index': i, 'delta': {'content': piece}, 'finish_reason': None}]})}\n\n"
        yield f"data: {json.dumps({**base, 'choices': [{'index': i, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
    yield "data: [DONE]\n\n"


# Helpers above stay above: Serve ships this class to replicas with the globals it sees here.
@serve.deployment
@serve.ingress(api)
class VLMServer:
    def __init__(self, cfg_json: str, model_uri: str):
        from cmevlm.model.loading import load

        self.cfg = RunConfig.model_validate_json(cfg_json)
        s = self.cfg.serve
        self.model, self.processor = load(self.cfg, model_uri, dtype=s.dtype, num_gpus=s.num_gpus_per_replica)
        self.keys = s.api_keys or [k for k in os.environ.get("CMEVLM_API_KEYS", "").split(",") if k]
        self.registry, self.m = _metrics()
        self.generate_batch.set_max_batch_size(s.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.ready = True

    # -- batching ---------------------------------------------------------------------------

    @serve.batch  # its size and wait come from serve.max_batch_size / batch_wait_timeout_s (set in __init__)
    async def generate_batch(self, jobs: list[Job]) -> list[tuple[str, int, int]]:
        """One generate call per (temperature, top_p, max_tokens) group of the batch."""
        from cmevlm.model.generate import Setting, generate_chat

        self.m["batch"].observe(len(jobs))
        out: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j.temperature, j.top_p, j.max_tokens), []).append(i)
        for (temp, top_p, max_tokens), idx in groups.items():
            setting = Setting(temp, top_p, jobs[idx[0]].seed) if temp > 0 else None
            images = [img for i in idx for img in jobs[i].images]
            res = await asyncio.to_thread(generate_chat, self.model, self.processor, [jobs[i].conversation for i in idx], images, max_tokens, setting)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    async def _complete(self, conv, images, p: dict) -> list[tuple[str, int, int]]:
        seeds = [p["seed"] if p["seed"] is not None else k for k in range(p["n"])]
        jobs = [Job(conv, images, p["max_tokens"], p["temperature"], p["top_p"], seed) for seed in seeds]
        return await asyncio.gather(*[self.generate_batch(j) for j in jobs])

    # -- plumbing ---------------------------------------------------------------------------

    async def _guarded(self, request: Request, endpoint: str, handler):
        t0 = time.time()
        status = 200
        try:
            check_auth(request.headers.get("authorization"), self.keys)
            length = int(request.headers.get("content-length") or 0)
            if length > self.cfg.serve.max_body_bytes:
                async for _ in request.stream():  # drain without keeping it, so the client reads the 413
                    pass
                raise BadRequest(413, f"request body of {length} bytes exceeds {self.cfg.serve.max_body_bytes}")
            raw = await request.body()
            if len(raw) > self.cfg.serve.max_body_bytes:
                raise BadRequest(413, f"request body exceeds {self.cfg.serve.max_body_bytes} bytes")
            try:
                body = json.loads(raw or b"{}")
            except json.JSONDecodeError as e:
                raise BadRequest(400, f"body is not valid JSON: {e.msg}") from None
            if not isinstance(body, dict):
                raise BadRequest(400, "body must be a JSON object")
            if self.cfg.serve.log_requests:
                log.info("%s request: %s", endpoint, {k: v for k, v in body.items() if k not in ("frame", "mask")})
            return await handler(body)
        except BadRequest as e:
            status = e.status
            return JSONResponse({"error": {"message": e.message, "type": "invalid_request_error", "code": e.status}}, status_code=e.status)
        finally:
            self.m["requests"].labels(endpoint, str(status)).inc()
            self.m["latency"].labels(endpoint).observe(time.time() - t0)

    # -- endpoints --------------------------------------------------------------------------

    @api.get("/healthz")
    def healthz(self):
        return {"status": "ok", "model": self.cfg.serve.name} if getattr(self, "ready", False) else JSONResponse({"status": "loading"}, 503)

    @api.get("/v1/models")
    def models(self):
        return {"object": "list", "data": [{"id": self.cfg.serve.name, "object": "model", "created": 0, "owned_by": "cmevlm"}]}

    @api.get("/metrics")
    def metrics(self):
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(self.registry).decode(), media_type="text/plain; version=0.0.4")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        async def handle(body):
            p = generation_params(body, self.cfg)
            conv, images = chat_conversation(body, self.cfg)
            results = await self._complete(conv, images, p)
            prompt_tokens = results[0][2]
            completion = sum(r[1] for r in results)
            self.m["tokens"].labels("prompt").inc(prompt_tokens)
            self.m["tokens"].labels("completion").inc(completion)
            rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            if p["stream"]:
                return StreamingResponse(_sse(rid, created, self.cfg.serve.name, results), media_type="text/event-stream")
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": self.cfg.serve.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length" if n >= p["max_tokens"] else "stop"} for i, (text, n, _) in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
            }

        return await self._guarded(request, "chat", handle)

    @api.post("/v1/explain")
    async def explain(self, request: Request):
        async def handle(body):
            t0 = time.time()
            conv, composite = explain_inputs(body, self.cfg)
            p = generation_params({"max_tokens": body.get("max_tokens", self.cfg.serve.default_max_tokens)}, self.cfg)
            (text, n, prompt_tokens), = await self._complete(conv, [composite], p)
            self.m["tokens"].labels("prompt").inc(prompt_tokens)
            self.m["tokens"].labels("completion").inc(n)
            return {"answer": text, "structure": body.get("structure"),
                    "laterality": body.get("laterality"), "model": self.cfg.serve.name, "latency_ms": round(1000 * (time.time() - t0), 1)}

        return await self._guarded(request, "explain", handle)


def application(cfg: RunConfig):
    """The bound Serve application for a run config."""
    from cmevlm.storage import stage_uri

    s = cfg.serve
    model_uri = stage_uri(cfg, s.model)
    actor = {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica}
    if s.accelerator_type:
        actor["accelerator_type"] = s.accelerator_type
    return VLMServer.options(
        name="VLMServer",
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "initial_replicas": max(1, s.min_replicas), "target_ongoing_requests": s.target_ongoing_requests},
        ray_actor_options=actor,
        max_ongoing_requests=max(2 * s.max_batch_size, 16),
    ).bind(cfg.model_dump_json(), model_uri)


def build_app(args: dict):
    """RayService entry point: `import_path: cmevlm.serve.app:build_app` with
    `args: {config: /etc/cmevlm/run.yaml, set: [serve.model=s3://...]}`."""
    return application(load_config(args.get("config"), args.get("set", [])))


def run(cfg: RunConfig, port: int | None = None, block: bool = True):
    """Start Serve on `serve.host:port` and deploy; blocks until interrupted when `block`."""
    from cmevlm.cluster import connect

    connect(cfg.ray)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": port or s.port})
    serve.run(application(cfg), name="cmevlm", route_prefix="/")
    log.info("serving %s on http://%s:%d", s.model, s.host, port or s.port)
    if not block:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()

"""The Ray Serve application: an OpenAI-compatible chat endpoint and the clinical /v1/explain.

    cmevlm serve --config configs/demo.yaml [--set serve.model=models/dpo] [--port 8000]
    # RayService serveConfigV2: import_path: cmevlm.serve.app:build_app, args: {config: /etc/cmevlm/run.yaml}

One deployment; each replica loads the model once (local path or s3://). A request is read
(its body counted as it streams and cut at serve.max_body_bytes), typed (cmevlm.serve.schemas:
a wrong field is a 400 naming it), decoded and prepared for the model on its own; only then
does it join a batch (`@serve.batch`), so one bad request never fails another. A batch runs
one `generate` per sampling setting and streams each row's tokens to its request as they are
generated (`stream: true`). A generation error fails only its batch, logged with the request
ids. Replicas autoscale between serve.min_replicas and serve.max_replicas; on a cluster each
takes a GPU of the serving pool. /v1/explain builds the composite with the ingest overlay
code, so what the model sees in the clinic is what it learned from.

Endpoints: POST /v1/chat/completions, POST /v1/completions (legacy, text only), POST
/v1/explain, GET /v1/models and /v1/models/{id}, GET /metrics (Prometheus; a key unless
serve.public_metrics), GET /openapi.json and /docs (only with serve.docs), GET /healthz and
/health (no key: ready once the model is loaded). Errors are OpenAI's shape. Every other endpoint needs
a key (`Authorization: Bearer ...`) whenever keys are set, and a non-loopback bind without
keys refuses to start.
"""

# No `from __future__ import annotations` here: FastAPI must see the real Request type.

import asyncio
import logging
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from cmevlm.config import RunConfig, load_config
from cmevlm.serve.requests import (BadRequest, chat_conversation, check_bind, check_key, check_length, check_prompt_size,
                                   explain_inputs, generation_params, parse, read_body, sampling_defaults, serving_keys)
from cmevlm.serve.schemas import MAX_SEED, ChatRequest, CompletionRequest, ExplainRequest, unknown_fields
from cmevlm.serve.sse import sse_chunks

log = logging.getLogger("cmevlm.serve")
api = FastAPI(title="cmevlm", description="Anatomy explanation for Complete Mesocolic Excision, served inside the hospital.",
              docs_url=None, redoc_url=None, openapi_url=None)


def _metrics():
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    reg = CollectorRegistry()
    fast = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
    return reg, {
        "requests": Counter("cmevlm_requests_total", "HTTP requests by endpoint and the status answered", ["endpoint", "status"], registry=reg),
        "latency": Histogram("cmevlm_request_latency_seconds", "Request latency", ["endpoint"], registry=reg,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)),
        "ttft": Histogram("cmevlm_time_to_first_token_seconds", "From a streamed request's arrival to its first token", registry=reg, buckets=fast),
        "queue": Histogram("cmevlm_queue_wait_seconds", "From a prepared request to the start of its batch", registry=reg, buckets=fast),
        "tokens": Counter("cmevlm_tokens_total", "Tokens", ["kind"], registry=reg),
        "batch": Histogram("cmevlm_batch_size", "Requests per generate batch", registry=reg, buckets=(1, 2, 4, 8, 16, 32, 64)),
        "replicas": Gauge("cmevlm_replicas", "Running replicas of the deployment (as this replica last saw them)", registry=reg),
    }


REGISTRY, METRICS = _metrics()


@dataclass
class Job:
    """One choice of one request, prepared, waiting for a batch."""

    rid: str
    prepared: dict  # model inputs of this request alone (cmevlm.model.streaming.prepare)
    p: dict  # its generation parameters (cmevlm.serve.requests.generation_params)
    seed: int | None  # None: any fresh seed (the request gave none)
    control: object  # cmevlm.model.streaming.RowControl: its stop strings and cancel flag
    sink: Callable | None = None  # receives the streamed pieces, then None
    enqueued: float = field(default_factory=time.time)

    def group(self) -> tuple:
        """What one generate call must share: every sampling setting, and the seed when given."""
        p = self.p
        return (p["temperature"], p["top_p"], p["top_k"], p["min_p"], p["penalties"], p["ignore_eos"], p["max_tokens"], self.seed)


class GenerationFailed(Exception):
    pass


class ClientGone(Exception):
    """The client disconnected before its answer: its rows were stopped (499 in /metrics)."""


ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """An error in OpenAI's shape, whatever the status."""
    body = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param, "code": code}
    return JSONResponse({"error": body}, status_code=status)


@api.exception_handler(404)
@api.exception_handler(405)
async def _http_error(request: Request, exc):
    """Unknown paths and methods in OpenAI's error shape, not FastAPI's {"detail": ...}."""
    return _error(exc.status_code, f"{request.method} {request.url.path}: {getattr(exc, 'detail', '') or 'not found'}")


def _cancel(jobs: list) -> None:
    for j in jobs:
        j.control.cancelled.set()


def generation_config(cfg: RunConfig, model_uri: str) -> dict | None:
    """The served model's generation_config.json (its sampling defaults), or None."""
    import json

    from cmevlm.storage import Storage, join

    st, uri = Storage(cfg.storage), join(model_uri, "generation_config.json")
    return json.loads(st.read_text(uri)) if st.exists(uri) else None


def openapi_schema() -> dict:
    """The OpenAPI document, with the typed request bodies (the handlers read raw bodies to
    count their bytes, so FastAPI cannot infer them)."""
    from fastapi.openapi.utils import get_openapi

    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version="1", description=api.description, routes=api.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatRequest, CompletionRequest, ExplainRequest):
            s = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(s.pop("$defs", {}))
            components[model.__name__] = s
        api.openapi_schema = schema
    return api.openapi_schema


def _body(model) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _replica_count() -> int | None:
    """Running replicas of this deployment, asked of Serve's controller; None when it cannot be
    reached (the gauge then keeps its last value and the scrape still answers)."""
    import ray

    try:
        controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        details = ray.get(controller.get_serve_instance_details.remote(), timeout=5)
        deployment = details["applications"]["cmevlm"]["deployments"]["VLMServer"]
        return sum(1 for r in deployment["replicas"] if r["state"] == "RUNNING")
    except Exception as e:  # noqa: BLE001 - metrics must never fail the scrape
        log.warning("replica count unavailable: %s: %s", type(e).__name__, e)
        return None


# Helpers above stay above: Serve ships this class to replicas with the globals it sees here.
@serve.deployment
@serve.ingress(api)
class VLMServer:
    def __init__(self, cfg_json: str, model_uri: str):
        from cmevlm.model.loading import image_geometry, load

        self.cfg = RunConfig.model_validate_json(cfg_json)
        self.keys = serving_keys(self.cfg)
        s = self.cfg.serve
        self.model, self.processor = load(self.cfg, model_uri, dtype=s.dtype, num_gpus=s.num_gpus_per_replica)
        self.processor.tokenizer.padding_side = "left"
        self.geometry = image_geometry(self.cfg, model_uri)  # every image is brought to it (requests.py)
        self.generate_batch.set_max_batch_size(s.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(s.batch_wait_timeout_s)
        self.defaults = sampling_defaults(generation_config(self.cfg, model_uri) if s.sampling_defaults == "model" else None)
        self.unknown_seen: set[str] = set()
        self.ready = True

    # -- batching ---------------------------------------------------------------------------

    @serve.batch  # its size and wait come from serve.max_batch_size / batch_wait_timeout_s (set in __init__)
    async def generate_batch(self, jobs: list[Job]) -> list:
        """One generate call per (temperature, top_p, max_tokens) group; a failing group fails
        alone (its requests get a GenerationFailed), the others are answered."""
        from cmevlm.model.generate import Setting
        from cmevlm.model.streaming import generate_prepared

        now = time.time()
        for j in jobs:
            METRICS["queue"].observe(now - j.enqueued)
        METRICS["batch"].observe(len(jobs))
        out: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault(j.group(), []).append(i)
        for (temp, top_p, top_k, min_p, penalties, ignore_eos, max_tokens, seed), idx in groups.items():
            group = [jobs[i] for i in idx]
            penalty = self.cfg.model.repetition_penalty
            seed = secrets.randbits(63) if seed is None else seed  # reproducible only when the request gave one
            sampling = Setting(temp, top_p, seed, top_k, repetition_penalty=penalty) if temp > 0 else Setting.greedy(penalty)
            sinks = [j.sink or (lambda piece: None) for j in group] if any(j.sink for j in group) else None
            try:
                res = await asyncio.to_thread(generate_prepared, self.model, self.processor.tokenizer, [j.prepared for j in group],
                                              max_tokens, sampling, sinks, [j.control for j in group], min_p, penalties, ignore_eos)
            except Exception as e:
                log.exception("generation failed for the batch of requests %s", sorted({j.rid for j in group}))
                res = [GenerationFailed(f"generation failed ({type(e).__name__}); request {j.rid}") for j in group]
                for j in group:
                    if j.sink:
                        j.sink(None)
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _prepare(self, conv, images, max_tokens: int) -> dict:
        """One request's model inputs, in a worker thread: what the processor refuses (a 1 x 300
        image, an absurd aspect ratio) is this request's 400, and so is a prompt too long."""
        from cmevlm.model.streaming import prepare

        try:
            prepared = prepare(self.processor, conv, images)
        except (ValueError, TypeError) as e:
            raise BadRequest(400, f"the image cannot be processed: {e}") from None
        check_length(int(prepared["input_ids"].shape[1]), max_tokens, self.cfg)
        return prepared

    def _jobs(self, rid: str, prepared: dict, p: dict) -> list[Job]:
        """One job per choice: a given seed s makes choices s, s+1, ... (each reproducible)."""
        from cmevlm.model.streaming import RowControl

        return [Job(rid, prepared, p, None if p["seed"] is None else (p["seed"] + k) % (MAX_SEED + 1), RowControl(p["stop"]))
                for k in range(p["n"])]

    async def _answer(self, jobs: list[Job], request: Request | None = None) -> list[tuple]:
        """Every job's result; when the client goes away first, its rows are stopped (ClientGone)."""
        work = asyncio.ensure_future(asyncio.gather(*[self.generate_batch(j) for j in jobs]))
        try:
            while request is not None and not work.done():
                await asyncio.wait([work], timeout=0.25)
                if not work.done() and await request.is_disconnected():
                    raise ClientGone()
            results = await asyncio.shield(work)
        except (ClientGone, asyncio.CancelledError):  # gone: Serve's proxy cancels the handler, or the ASGI disconnect
            _cancel(jobs)
            raise
        failed = next((r for r in results if isinstance(r, GenerationFailed)), None)
        if failed:
            raise failed
        return results

    def _stream(self, jobs: list[Job], rid: str, created: int, p: dict, t0: float):
        """Attach a sink to every job and return the SSE generator that forwards their pieces
        (closed early by a client that went away: its rows are stopped)."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for i, j in enumerate(jobs):
            j.sink = lambda piece, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, piece))
        task = asyncio.ensure_future(asyncio.gather(*[self.generate_batch(j) for j in jobs]))
        events = sse_chunks(rid, created, self.cfg.serve.name, len(jobs), queue, task, p["include_usage"],
                            on_first=lambda: METRICS["ttft"].observe(time.time() - t0), stop=p["stop"],
                            continuous=p["continuous_usage"], prompt_tokens=int(jobs[0].prepared["input_ids"].shape[1]))

        async def guarded():
            status = "499"  # unless it ends: the client went away mid-stream
            try:
                async for e in events:
                    yield e
                status = "200"
            finally:
                if status == "499":
                    _cancel(jobs)
                METRICS["requests"].labels("chat", status).inc()

        return guarded()

    # -- plumbing ---------------------------------------------------------------------------

    async def _guarded(self, request: Request, endpoint: str, handler, key: bool = True):
        """Key check (all but /healthz), client errors as OpenAI-shaped JSON, a failed batch as
        a 500 with the request id, and the status really answered in /metrics. (Checks live
        here, not in route dependencies or middleware: Serve ships this class to replicas with
        copies of module globals.)"""
        t0, status, streamed = time.time(), 500, False
        try:
            if key:
                check_key(request.headers.get("authorization"), self.keys)
            response = await handler()
            status, streamed = getattr(response, "status_code", 200), isinstance(response, StreamingResponse)
            return response
        except BadRequest as e:
            status = e.status
            return _error(e.status, e.message, e.param, e.code)
        except ClientGone:
            status = 499  # nginx's "client closed request": nobody reads this answer
            return Response(status_code=499)
        except asyncio.CancelledError:
            status = 499  # Serve cancelled the handler: its client went away
            raise
        except GenerationFailed as e:
            return _error(500, str(e))
        finally:
            if not streamed:  # a stream counts itself when it ends (200, or 499 when its client went away)
                METRICS["requests"].labels(endpoint, str(status)).inc()
            METRICS["latency"].labels(endpoint).observe(time.time() - t0)

    # -- endpoints --------------------------------------------------------------------------

    @api.get("/healthz")
    @api.get("/health")  # vLLM's name; guidellm probes it
    async def healthz(self, request: Request):
        async def handle():
            return {"status": "ok", "model": self.cfg.serve.name} if getattr(self, "ready", False) else JSONResponse({"status": "loading"}, 503)

        return await self._guarded(request, "healthz", handle, key=False)

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "cmevlm", "max_model_len": self.cfg.serve.max_model_len}

    def _check_model(self, name: str | None) -> None:
        """A request naming another model is a 404 (model_not_found), as OpenAI answers it."""
        s = self.cfg.serve
        if name is not None and name not in (s.name, *s.model_aliases):
            raise BadRequest(404, f"The model `{name}` does not exist: this server serves `{s.name}`", param="model", code="model_not_found")

    @api.get("/v1/models")
    async def models(self, request: Request):
        async def handle():
            return {"object": "list", "data": [self._model_card(self.cfg.serve.name)]}

        return await self._guarded(request, "models", handle)

    @api.get("/v1/models/{model_id:path}")
    async def model(self, request: Request, model_id: str):
        async def handle():
            self._check_model(model_id)
            return self._model_card(model_id)

        return await self._guarded(request, "models", handle)

    @api.get("/metrics")
    async def metrics(self, request: Request):
        async def handle():
            from prometheus_client import generate_latest

            # (set here, not in the helper: Serve ships this class with its own copy of METRICS)
            if (running := await asyncio.to_thread(_replica_count)) is not None:
                METRICS["replicas"].set(running)
            return PlainTextResponse(generate_latest(REGISTRY).decode(), media_type="text/plain; version=0.0.4")

        return await self._guarded(request, "metrics", handle, key=not self.cfg.serve.public_metrics)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request):
        async def handle():
            return openapi_schema() if self.cfg.serve.docs else _error(404, "not found (serve.docs is off)")

        return await self._guarded(request, "openapi", handle)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request):
        async def handle():
            from fastapi.openapi.docs import get_swagger_ui_html

            if not self.cfg.serve.docs:
                return _error(404, "not found (serve.docs is off)")
            return HTMLResponse(get_swagger_ui_html(openapi_url="/openapi.json", title="cmevlm").body)

        return await self._guarded(request, "docs", handle)

    @api.post("/v1/chat/completions", openapi_extra=_body(ChatRequest))
    async def chat(self, request: Request):
        return await self._guarded(request, "chat", lambda: self._chat(request, time.time()))

    async def _chat(self, request: Request, t0: float):
        req = parse(ChatRequest, await read_body(request, self.cfg.serve.max_body_bytes))
        self._check_model(req.model)
        self._warn_unknown(unknown_fields(req))
        if self.cfg.serve.log_requests:  # off by default: patient data stays out of logs
            log.info("chat request: %s", [m.content if isinstance(m.content, str) else [getattr(x, "text", "<image>") for x in m.content]
                                          for m in req.messages])
        p = generation_params(req, self.cfg, self.defaults)
        conv, images = await asyncio.to_thread(chat_conversation, req, self.cfg, self.geometry)
        prepared = await asyncio.to_thread(self._prepare, conv, images, p["max_tokens"])
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        jobs = self._jobs(rid, prepared, p)
        if p["stream"]:
            return StreamingResponse(self._stream(jobs, rid, created, p, t0), media_type="text/event-stream")
        results = await self._answer(jobs, request)
        prompt_tokens, completion = results[0][2], sum(r[1] for r in results)
        METRICS["tokens"].labels("prompt").inc(prompt_tokens)
        METRICS["tokens"].labels("completion").inc(completion)
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": req.model or self.cfg.serve.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": None}
                        for i, (text, _, _, reason) in enumerate(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion},
        }

    def _warn_unknown(self, names: list[str]) -> None:
        """Unknown request fields are ignored; each name is logged once per replica."""
        new = [n for n in names if n not in self.unknown_seen]
        if new:
            self.unknown_seen.update(new)
            log.warning("ignored unknown request fields: %s", ", ".join(new))

    @api.post("/v1/completions", openapi_extra=_body(CompletionRequest))
    async def completions(self, request: Request):
        return await self._guarded(request, "completions", lambda: self._complete(request))

    async def _complete(self, request: Request):
        """OpenAI's legacy completion: the prompt tokenized as it is, no template, no image."""
        req = parse(CompletionRequest, await read_body(request, self.cfg.serve.max_body_bytes))
        self._check_model(req.model)
        self._warn_unknown(unknown_fields(req))
        check_prompt_size(req.prompt, self.cfg)
        p = generation_params(req, self.cfg, self.defaults)
        prepared = dict(await asyncio.to_thread(self.processor.tokenizer, [req.prompt], return_tensors="pt"))
        check_length(int(prepared["input_ids"].shape[1]), p["max_tokens"], self.cfg)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        results = await self._answer(self._jobs(rid, prepared, p), request)
        prompt_tokens, completion = results[0][2], sum(r[1] for r in results)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": req.model or self.cfg.serve.name,
                "choices": [{"index": i, "text": text, "finish_reason": reason, "logprobs": None} for i, (text, _, _, reason) in enumerate(results)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}}

    @api.post("/v1/explain", openapi_extra=_body(ExplainRequest))
    async def explain(self, request: Request):
        return await self._guarded(request, "explain", lambda: self._explain(request, time.time()))

    async def _explain(self, request: Request, t0: float):
        req = parse(ExplainRequest, await read_body(request, self.cfg.serve.max_body_bytes))
        p = generation_params(req, self.cfg)
        conv, composite = await asyncio.to_thread(explain_inputs, req, self.cfg, self.geometry)
        prepared = await asyncio.to_thread(self._prepare, conv, [composite], p["max_tokens"])
        (text, n, prompt_tokens, _), = await self._answer(self._jobs(f"explain-{uuid.uuid4().hex[:24]}", prepared, p), request)
        METRICS["tokens"].labels("prompt").inc(prompt_tokens)
        METRICS["tokens"].labels("completion").inc(n)
        return {"answer": text, "structure": req.structure, "laterality": req.laterality, "model": self.cfg.serve.name,
                "latency_ms": round(1000 * (time.time() - t0), 1)}


def application(cfg: RunConfig):
    """The bound Serve application for a run config; refuses a non-loopback bind without keys."""
    from cmevlm.storage import stage_uri

    check_bind(cfg)
    s = cfg.serve
    model_uri = stage_uri(cfg, s.model)
    actor = {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica}
    if s.accelerator_type:
        actor["accelerator_type"] = s.accelerator_type
    return VLMServer.options(
        name="VLMServer",
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                            "initial_replicas": max(1, s.min_replicas), "target_ongoing_requests": s.target_ongoing_requests,
                            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
                            "look_back_period_s": s.look_back_period_s},
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

    app = application(cfg)  # first: a bind it refuses starts nothing
    connect(cfg.ray)
    s = cfg.serve
    serve.start(http_options={"host": s.host, "port": port or s.port})
    serve.run(app, name="cmevlm", route_prefix="/")
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

"""The review web app: FastAPI, server-rendered pages, one small script, nothing from a CDN.

    cmevlm review --config configs/demo.yaml [--port 8090] [--host 127.0.0.1] [--token T]

Pages: `/` (the three queues and their progress), `/<queue>` (resumes at the first undecided
item), `/<queue>/<n>` (one item, its decision and history), `/summary` (counts per decision and
reviewer). Every click is one fsync'd line in the queue's reviews file (cmevlm/reviews.py).

Security, for a hospital workstation with patient images on screen:
- binds 127.0.0.1 by default; any other address needs a token (`--token` or
  CMEVLM_REVIEW_TOKEN), asked once on the sign-in page, then a server-side session whose cookie
  is HttpOnly and SameSite=Strict;
- every POST carries a CSRF token tied to the session, and a foreign Origin is refused;
- images come from the queues (Parquet in the workdir) by position: no path from a URL ever
  reaches the filesystem;
- pages are `no-store` under a strict Content-Security-Policy; logs name queues, positions and
  decisions, never case identifiers, prompts, answers or edits (uvicorn's access log is off).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from collections import Counter, OrderedDict
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from cmevlm.config import RunConfig
from cmevlm.review.queues import Queue, load_queues

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
COOKIE = "cmevlm_review"
TOKEN_ENV = "CMEVLM_REVIEW_TOKEN"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
STATIC = {"review.css": "text/css; charset=utf-8", "review.js": "text/javascript; charset=utf-8"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # not no-referrer: under it Chromium sends "Origin: null" on same-origin form posts
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",  # patient images stay out of the browser's disk cache
}
NAME_MAX = 80


def resolve_token(host: str, token: str | None) -> str | None:
    """The token the app asks for: `token`, else $CMEVLM_REVIEW_TOKEN; required off loopback."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if host not in LOOPBACK and not token:
        raise ValueError(f"binding {host} exposes patient images beyond this machine: give a token "
                         f"(--token or {TOKEN_ENV}) or bind 127.0.0.1")
    return token


class Sessions:
    """Server-side sessions: the cookie carries a random id only. Bounded, oldest dropped."""

    def __init__(self, limit: int = 1000):
        self.secret = secrets.token_bytes(32)
        self.limit = limit
        self._s: OrderedDict[str, dict] = OrderedDict()

    def new(self, reviewer: str | None = None) -> str:
        sid = secrets.token_urlsafe(32)
        self._s[sid] = {"reviewer": reviewer, "flash": []}
        while len(self._s) > self.limit:
            self._s.popitem(last=False)
        return sid

    def get(self, sid: str | None) -> dict | None:
        return self._s.get(sid) if sid else None

    def drop(self, sid: str | None) -> None:
        self._s.pop(sid, None)

    def csrf(self, sid: str) -> str:
        return hmac.new(self.secret, sid.encode(), hashlib.sha256).hexdigest()


def _set_cookie(response: Response, sid: str) -> None:
    response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/")


def _safe_next(target: str | None) -> str:
    """Only a local path: no open redirect through ?next=."""
    return target if target and target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _next_undecided(q: Queue, latest: dict, after: int) -> int | None:
    n = len(q.items)
    return next((i for i in [*range(after + 1, n + 1), *range(1, after + 1)] if q.items[i - 1]["item_id"] not in latest), None)


def _review_from_form(q: Queue, form, reviewer: str) -> dict:
    """The decision a form carries, in the reviews file's shape (checked again by the writer)."""
    review = {"item_id": form.get("item_id", ""), "reviewer": reviewer}
    if q.name == "expert":
        scores = {}
        for L in q.letters:
            raw = form.get(f"score_{L}")
            if raw not in {"1", "2", "3", "4", "5"}:
                raise ValueError(f"score every answer from 1 to 5 (answer {L} has no score)")
            scores[L] = int(raw)
        preferred = sorted({p for p in form.getlist("preferred") if p in scores})
        if not preferred:
            raise ValueError("mark one or more preferred answers")
        return {**review, "decision": "score", "scores": scores, "preferred": preferred}
    review["decision"] = form.get("decision", "")
    if review["decision"] == "edit":
        review["text"] = (form.get("text") or "").strip()
    return review


def create_app(cfg: RunConfig, token: str | None = None, config_args: str = "") -> FastAPI:
    """The app over `cfg.workdir`. `token`: required at sign-in when set. `config_args`: the
    `--config FILE` the summary page adds to the commands that rebuild the datasets."""
    queues = load_queues(cfg)
    sessions = Sessions()
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app = FastAPI(title="cmevlm review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queues, app.state.sessions = queues, sessions

    # -- pages -----------------------------------------------------------------------------

    def page(request: Request, template: str, status: int = 200, known: dict | None = None, **ctx) -> Response:
        """Render `template` with the nav's progress per queue; `known`: {queue: latest decisions}
        this request has read already (each reviews file is read once per page)."""
        sid, session = request.state.sid, request.state.session
        nav = []
        for name, q in queues.items():
            done, total = q.progress(known[name] if known and name in known else q.state()[0])
            nav.append({"name": name, "title": q.title, "done": done, "total": total, "missing": q.missing})
        flash, session["flash"] = session["flash"], []
        return templates.TemplateResponse(request, template, {
            "nav": nav, "reviewer": session["reviewer"], "csrf": sessions.csrf(sid), "flash": flash, **ctx}, status_code=status)

    def check_csrf(request: Request, form) -> None:
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
            raise PermissionError("cross-origin POST refused")
        if not hmac.compare_digest(str(form.get("csrf", "")), sessions.csrf(request.state.sid)):
            raise PermissionError("CSRF check failed: reload the page and try again")

    def item_page(request: Request, q: Queue, n: int, status: int = 200, error: str | None = None, form=None) -> Response:
        latest, history = q.state()
        item = q.items[n - 1]
        hist = history.get(item["item_id"], [])
        return page(request, f"{q.name}.html", status, {q.name: latest}, queue=q, n=n, item=item,
                    current=hist[-1] if hist else None, history=hist, seen=len(hist), error=error, form=form, done=q.progress(latest)[0],
                    prev=n - 1 if n > 1 else None, next=n + 1 if n < len(q.items) else None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        sid = request.cookies.get(COOKIE)
        session = sessions.get(sid)
        fresh = None
        if path.startswith("/static/"):
            response = await call_next(request)
        elif path == "/login":
            if session is None:  # a pre-sign-in session, so that the sign-in form has a CSRF token too
                fresh = sid = sessions.new()
                session = sessions.get(sid)
            request.state.sid, request.state.session = sid, session
            response = await call_next(request)
        elif session is None or not session["reviewer"]:
            response = (RedirectResponse(f"/login?next={quote(path)}", 303) if request.method == "GET"
                        else PlainTextResponse("sign in first", 403))
        else:
            request.state.sid, request.state.session = sid, session
            response = await call_next(request)
        for k, v in HEADERS.items():
            response.headers.setdefault(k, v)
        if fresh:
            _set_cookie(response, fresh)
        return response

    @app.exception_handler(PermissionError)
    async def forbidden(request: Request, exc: PermissionError):
        return PlainTextResponse(str(exc), 403)

    @app.get("/static/{name}")
    def static(name: str):
        if name not in STATIC:  # an allow-list: nothing else of the disk is reachable
            return PlainTextResponse("not found", 404)
        return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name], headers={"Cache-Control": "max-age=3600"})

    @app.get("/login")
    def login_form(request: Request, next: str = "/"):
        return templates.TemplateResponse(request, "login.html", {
            "csrf": sessions.csrf(request.state.sid), "next": _safe_next(next), "needs_token": bool(token), "error": None,
            "reviewer": request.state.session["reviewer"], "nav": None, "flash": []})

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        check_csrf(request, form)
        name = " ".join(str(form.get("reviewer", "")).split())[:NAME_MAX]
        error = None
        if token and not hmac.compare_digest(str(form.get("token", "")).encode(), token.encode()):
            await asyncio.sleep(0.5)  # slows guessing; the token is the only secret here
            error, status = "That token is not this app's token.", 401
        elif not name:
            error, status = "Your name goes on every decision: please enter it.", 400
        if error:
            log.warning("review: sign-in refused (%s)", "token" if status == 401 else "no name")
            return templates.TemplateResponse(request, "login.html", {
                "csrf": sessions.csrf(request.state.sid), "next": _safe_next(form.get("next")), "needs_token": bool(token),
                "error": error, "reviewer": None, "nav": None, "flash": []}, status_code=status)
        sessions.drop(request.state.sid)  # a new id at sign-in: no session fixation
        sid = sessions.new(reviewer=name)
        response = RedirectResponse(_safe_next(form.get("next")), 303)
        _set_cookie(response, sid)
        log.info("review: a reviewer signed in")
        return response

    @app.post("/logout")
    async def logout(request: Request):
        check_csrf(request, await request.form())
        sessions.drop(request.state.sid)
        response = RedirectResponse("/login", 303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/")
    def index(request: Request):
        return page(request, "index.html")  # the nav's progress is the page

    @app.get("/summary")
    def summary(request: Request):
        rows, known = [], {}
        for name, q in queues.items():
            latest, history = q.state()
            known[name] = latest
            ids = {it["item_id"] for it in q.items}
            done, total = q.progress(latest)
            rows.append({"name": name, "title": q.title, "done": done, "total": total, "counts": q.counts(latest),
                         "reviewers": Counter(r["reviewer"] for i, r in latest.items() if i in ids),
                         "changes": sum(len(h) for i, h in history.items() if i in ids) - done})
        return page(request, "summary.html", known=known, rows=rows, config_args=config_args, workdir=cfg.workdir)

    @app.post("/expert/merge")
    async def merge_expert(request: Request):
        check_csrf(request, await request.form())
        from cmevlm.evaluate.expert import SheetError, import_sheet

        q = queues["expert"]
        try:
            import_sheet(cfg, q.log.uri)
            n = q.progress(q.state()[0])[0]
            request.state.session["flash"].append(("ok", f"Merged {n} scored items into eval/metrics.json and eval/report.html."))
            log.info("review: expert scores merged (%d items)", n)
        except (SheetError, FileNotFoundError, ValueError) as e:
            request.state.session["flash"].append(("error", f"Could not merge: {e}"))
        return RedirectResponse("/summary", 303)

    @app.get("/image/{queue}/{n}")
    def image(queue: str, n: int):
        q = queues.get(queue)
        if q is None or not 1 <= n <= len(q.items):
            return PlainTextResponse("not found", 404)
        png = q.image(n - 1)
        if not png:
            return PlainTextResponse("no image for this item", 404)
        return Response(png, media_type="image/png")

    @app.get("/{queue}")
    def resume(queue: str):
        q = queues.get(queue)
        if q is None:
            return PlainTextResponse("not found", 404)
        n = q.first_undecided(q.state()[0])
        return RedirectResponse(f"/{queue}/{n}" if n else f"/{queue}/done", 303)

    @app.get("/{queue}/done")
    def queue_done(request: Request, queue: str):
        q = queues.get(queue)
        if q is None:
            return PlainTextResponse("not found", 404)
        latest, _ = q.state()
        return page(request, "done.html", known={q.name: latest}, queue=q, counts=q.counts(latest), done=q.progress(latest)[0])

    @app.get("/{queue}/{n}")
    def item(request: Request, queue: str, n: int):
        q = queues.get(queue)
        if q is None or not 1 <= n <= len(q.items):
            return PlainTextResponse("not found", 404)
        return item_page(request, q, n)

    @app.post("/{queue}/{n}")
    async def decide(request: Request, queue: str, n: int):
        q = queues.get(queue)
        if q is None or not 1 <= n <= len(q.items):
            return PlainTextResponse("not found", 404)
        form = await request.form()
        check_csrf(request, form)
        item_id = q.items[n - 1]["item_id"]
        if form.get("item_id") != item_id:
            return PlainTextResponse("This queue was rebuilt after the page was opened: reload it.", 409)
        try:
            saved = q.log.append(_review_from_form(q, form, request.state.session["reviewer"]))
        except ValueError as e:
            return item_page(request, q, n, 400, error=str(e), form=form)
        latest, history = q.state()
        done, total = q.progress(latest)
        log.info("review: %s #%d: %s recorded (%d/%d decided)", q.name, n, saved["decision"], done, total)
        flash = request.state.session["flash"]
        flash.append(("ok", f"Saved: {saved['decision']} on item {n}."))
        seen = int(raw) if (raw := str(form.get("seen") or "0")).isdigit() else 0
        between = history[item_id][seen:-1]
        if between:  # another tab or reviewer decided this item after this page was opened
            who = ", ".join(f"{r['decision']} by {r['reviewer']}" for r in between)
            flash.append(("warn", f"Item {n} had meanwhile been decided ({who}); yours is now the one in force, "
                                  "and all are kept in its history."))
        nxt = _next_undecided(q, latest, n)
        return RedirectResponse(f"/{queue}/{nxt}" if nxt else f"/{queue}/done", 303)

    return app


def run(cfg: RunConfig, host: str = "127.0.0.1", port: int = 8090, token: str | None = None, config_args: str = "") -> None:
    import uvicorn

    app = create_app(cfg, resolve_token(host, token), config_args)
    for name, q in app.state.queues.items():
        latest, _ = q.state()
        done, total = q.progress(latest)
        log.info("review: %s: %d/%d decided%s", name, done, total, f" (empty: {q.missing})" if q.missing else "")
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="warning")

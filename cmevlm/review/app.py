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
import time
from collections import Counter, OrderedDict
from pathlib import Path
from urllib.parse import parse_qsl, quote

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import FormData

from cmevlm.config import RunConfig
from cmevlm.errors import ConfigError
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


MIN_TOKEN = 16  # characters of a token off loopback
FORM_MAX_BYTES = 256 * 1024  # every form of the app is a few fields; an edited answer is a few KB
THROTTLE_FAILURES, THROTTLE_WINDOW_S = 5, 600.0  # sign-in failures per client before a lockout, and for how long


def resolve_token(host: str, token: str | None) -> str | None:
    """The token the app asks for: `token`, else $CMEVLM_REVIEW_TOKEN; required off loopback,
    and then at least MIN_TOKEN characters."""
    token = token or os.environ.get(TOKEN_ENV) or None
    if host not in LOOPBACK and not token:
        raise ConfigError(f"binding {host} exposes patient images beyond this machine: give a token "
                          f"(--token or {TOKEN_ENV}) or bind 127.0.0.1")
    if host not in LOOPBACK and len(token) < MIN_TOKEN:
        raise ConfigError(f"binding {host} needs a token of at least {MIN_TOKEN} characters (this one has {len(token)})")
    return token


def answered_hosts(host: str, allowed: tuple[str, ...] = ()) -> frozenset[str]:
    """The Host names the app answers to: the bound address (every loopback name when it is
    loopback) and `allowed` (the names a proxy or the hospital's DNS uses). A page on another
    name that rebinds it to this address (DNS rebinding) gets 421 before anything is read."""
    names = {host.lower(), *(a.lower() for a in allowed)} | (LOOPBACK if host in LOOPBACK else set())
    if host in ("0.0.0.0", "::") and not allowed:
        raise ConfigError(f"binding {host} answers to any name: give the names it is reached by (--allowed-host NAME)")
    return frozenset(names - {"0.0.0.0", "::"})


def host_of(header: str) -> str:
    """The host part of a Host header (`name:port`, `[::1]:port`), lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Sessions:
    """Server-side sessions of signed-in reviewers only: the cookie carries a random id; a
    session idle for `idle_s` ends. Anonymous visitors hold no server state: the sign-in form's
    CSRF token is tied to a signed cookie (`pre_cookie`), so no number of visits can push a
    reviewer out. Bounded all the same, oldest dropped."""

    def __init__(self, idle_s: float = 30 * 60, limit: int = 1000):
        self.secret = secrets.token_bytes(32)
        self.idle_s, self.limit = idle_s, limit
        self._s: OrderedDict[str, dict] = OrderedDict()

    def new(self, reviewer: str) -> str:
        sid = secrets.token_urlsafe(32)
        self._s[sid] = {"reviewer": reviewer, "flash": [], "seen": time.monotonic()}
        while len(self._s) > self.limit:
            self._s.popitem(last=False)
        return sid

    def get(self, sid: str | None) -> dict | None:
        session = self._s.get(sid) if sid else None
        if session is not None and time.monotonic() - session["seen"] > self.idle_s:
            self.drop(sid)
            return None
        if session is not None:
            session["seen"] = time.monotonic()
        return session

    def drop(self, sid: str | None) -> None:
        self._s.pop(sid, None)

    def __len__(self) -> int:
        return len(self._s)

    def _mac(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()

    def csrf(self, sid: str) -> str:
        return self._mac(f"session|{sid}")

    def pre_cookie(self) -> tuple[str, str]:
        """(cookie value, sign-in CSRF token) for an anonymous visitor: signed, stored nowhere."""
        nonce = secrets.token_urlsafe(16)
        return f"{nonce}.{self._mac(f'pre|{nonce}')}", self._mac(f"login|{nonce}")

    def pre_csrf(self, cookie: str | None) -> str | None:
        """The sign-in CSRF token a genuine pre-auth cookie stands for; None for a forged one."""
        nonce, _, mac = (cookie or "").partition(".")
        if not nonce or not hmac.compare_digest(mac, self._mac(f"pre|{nonce}")):
            return None
        return self._mac(f"login|{nonce}")


class Throttle:
    """Sign-in failures per client: THROTTLE_FAILURES within THROTTLE_WINDOW_S lock it out for
    the rest of that window (429, even with the right token)."""

    def __init__(self):
        self._fails: dict[str, list[float]] = {}

    def locked_for(self, client: str) -> float:
        now = time.monotonic()
        recent = [t for t in self._fails.get(client, []) if now - t < THROTTLE_WINDOW_S]
        self._fails[client] = recent
        return THROTTLE_WINDOW_S - (now - recent[0]) if len(recent) >= THROTTLE_FAILURES else 0.0

    def fail(self, client: str) -> None:
        self._fails.setdefault(client, []).append(time.monotonic())
        if len(self._fails) > 10_000:  # bounded: forget the oldest clients
            self._fails.pop(next(iter(self._fails)))

    def reset(self, client: str) -> None:
        self._fails.pop(client, None)


PRE_COOKIE = "cmevlm_review_pre"


def _set_cookie(response: Response, value: str, secure: bool, name: str = COOKIE) -> None:
    response.set_cookie(name, value, httponly=True, samesite="strict", path="/", secure=secure)


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


class SignInRequired(Exception):
    """Raised by the `signed_in` dependency: GET redirects to the sign-in page, anything else 403."""


class ReviewApp:
    """What every route shares: the queues, the sessions, the templates, the sign-in token."""

    def __init__(self, cfg: RunConfig, token: str | None, config_args: str, idle_minutes: float = 30, https: bool = False):
        self.cfg, self.token, self.config_args = cfg, token, config_args
        self.secure = https  # served over HTTPS (directly or behind the hospital's proxy): Secure cookies
        self.queues = load_queues(cfg)
        self.sessions = Sessions(idle_s=60 * idle_minutes)
        self.throttle = Throttle()
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))

    def page(self, request: Request, template: str, status: int = 200, known: dict | None = None, **ctx) -> Response:
        """Render `template` with the nav's progress per queue; `known`: {queue: latest decisions}
        this request has read already (each reviews file is read once per page)."""
        sid, session = request.state.sid, request.state.session
        nav = []
        for name, q in self.queues.items():
            done, total = q.progress(known[name] if known and name in known else q.state()[0])
            nav.append({"name": name, "title": q.title, "done": done, "total": total, "missing": q.missing})
        flash, session["flash"] = session["flash"], []
        flash += [("warn", f"The reviews file has a torn line, skipped: {w}") for q in self.queues.values() for w in q.log.warnings]
        return self.templates.TemplateResponse(request, template, {
            "nav": nav, "reviewer": session["reviewer"], "csrf": self.sessions.csrf(sid), "flash": flash, **ctx}, status_code=status)

    def login_page(self, request: Request, next_: str, error: str | None = None, status: int = 200) -> Response:
        return self.templates.TemplateResponse(request, "login.html", {
            "csrf": request.state.csrf, "next": _safe_next(next_), "needs_token": bool(self.token),
            "error": error, "reviewer": None, "nav": None, "flash": []}, status_code=status)

    def item_page(self, request: Request, q: Queue, n: int, status: int = 200, error: str | None = None, form=None) -> Response:
        latest, history = q.state()
        item = q.items[n - 1]
        hist = history.get(item["item_id"], [])
        return self.page(request, f"{q.name}.html", status, {q.name: latest}, queue=q, n=n, item=item,
                         current=hist[-1] if hist else None, history=hist, seen=len(hist), error=error, form=form,
                         done=q.progress(latest)[0], prev=n - 1 if n > 1 else None, next=n + 1 if n < len(q.items) else None)


# ---------------------------------------------------------------------------------------------
# Dependencies


def review_app(request: Request) -> ReviewApp:
    return request.app.state.review


def pre_auth(request: Request, ra: ReviewApp = Depends(review_app)) -> None:
    """An anonymous visitor's sign-in CSRF token, from its signed pre-auth cookie (a new one when
    it has none or a forged one); nothing is stored on the server."""
    expected = ra.sessions.pre_csrf(request.cookies.get(PRE_COOKIE))
    if expected is None:
        request.state.fresh_pre, expected = ra.sessions.pre_cookie()
    request.state.csrf = expected


def signed_in(request: Request, ra: ReviewApp = Depends(review_app)) -> str:
    """The signed-in reviewer's name; SignInRequired otherwise (or once the session went idle)."""
    sid = request.cookies.get(COOKIE)
    session = ra.sessions.get(sid)
    if session is None:
        raise SignInRequired()
    request.state.sid, request.state.session, request.state.csrf = sid, session, ra.sessions.csrf(sid)
    return session["reviewer"]


async def read_form(request: Request) -> FormData:
    """The urlencoded form, its body counted while it streams and refused past FORM_MAX_BYTES
    (413), so no form can grow the process."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > FORM_MAX_BYTES):
        raise HTTPException(413, "form too large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > FORM_MAX_BYTES:
            raise HTTPException(413, "form too large")
        chunks.append(chunk)
    try:
        return FormData(parse_qsl(b"".join(chunks).decode("utf-8"), keep_blank_values=True, max_num_fields=100))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "malformed form") from None


async def csrf_form(request: Request):
    """The POSTed form, once its Origin and CSRF token (the one the session or the pre-auth
    cookie stands for, set by signed_in / pre_auth) are checked (PermissionError -> 403)."""
    origin = request.headers.get("origin")
    if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host')}":
        raise PermissionError("cross-origin POST refused")
    form = await read_form(request)
    if not hmac.compare_digest(str(form.get("csrf", "")), request.state.csrf):
        raise PermissionError("CSRF check failed: reload the page and try again")
    return form


def a_queue(queue: str, ra: ReviewApp = Depends(review_app)) -> Queue:
    q = ra.queues.get(queue)
    if q is None:
        raise HTTPException(404, "not found")
    return q


def queue_item(n: int, q: Queue = Depends(a_queue)) -> tuple[Queue, int]:
    """(queue, position) of an existing item: the one 404 for every item route."""
    if not 1 <= n <= len(q.items):
        raise HTTPException(404, "not found")
    return q, n


# ---------------------------------------------------------------------------------------------
# Routes

public = APIRouter()
reviewer = APIRouter(dependencies=[Depends(signed_in)])


@public.get("/static/{name}")
def static(name: str):
    if name not in STATIC:  # an allow-list: nothing else of the disk is reachable
        return PlainTextResponse("not found", 404)
    return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name], headers={"Cache-Control": "max-age=3600"})


@public.get("/login", dependencies=[Depends(pre_auth)])
def login_form(request: Request, next: str = "/", ra: ReviewApp = Depends(review_app)):
    return ra.login_page(request, next)


def _client_key(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@public.post("/login", dependencies=[Depends(pre_auth)])
async def login(request: Request, form=Depends(csrf_form), ra: ReviewApp = Depends(review_app)):
    client = _client_key(request)
    if (wait := ra.throttle.locked_for(client)) > 0:
        log.warning("review: sign-in refused (too many failures from one client)")
        return PlainTextResponse(f"too many failed sign-ins: try again in {wait:.0f} s", 429, headers={"Retry-After": str(int(wait) + 1)})
    name = " ".join(str(form.get("reviewer", "")).split())[:NAME_MAX]
    error = None
    if ra.token and not hmac.compare_digest(str(form.get("token", "")).encode(), ra.token.encode()):
        ra.throttle.fail(client)
        await asyncio.sleep(0.5)  # slows guessing; the token is the only secret here
        error, status = "That token is not this app's token.", 401
    elif not name:
        error, status = "Your name goes on every decision: please enter it.", 400
    if error:
        log.warning("review: sign-in refused (%s)", "token" if status == 401 else "no name")
        return ra.login_page(request, form.get("next"), error, status)
    ra.throttle.reset(client)
    response = RedirectResponse(_safe_next(form.get("next")), 303)
    _set_cookie(response, ra.sessions.new(reviewer=name), ra.secure)  # a new id at sign-in: no session fixation
    response.delete_cookie(PRE_COOKIE, path="/")
    log.info("review: a reviewer signed in")
    return response


@reviewer.post("/logout")
async def logout(request: Request, form=Depends(csrf_form), ra: ReviewApp = Depends(review_app)):
    ra.sessions.drop(request.state.sid)
    response = RedirectResponse("/login", 303)
    response.delete_cookie(COOKIE, path="/")
    return response


@reviewer.get("/")
def index(request: Request, ra: ReviewApp = Depends(review_app)):
    return ra.page(request, "index.html")  # the nav's progress is the page


@reviewer.get("/summary")
def summary(request: Request, ra: ReviewApp = Depends(review_app)):
    rows, known = [], {}
    for name, q in ra.queues.items():
        latest, history = q.state()
        known[name] = latest
        ids = {it["item_id"] for it in q.items}
        done, total = q.progress(latest)
        rows.append({"name": name, "title": q.title, "done": done, "total": total, "counts": q.counts(latest),
                     "reviewers": Counter(r["reviewer"] for i, r in latest.items() if i in ids),
                     "changes": sum(len(h) for i, h in history.items() if i in ids) - done})
    return ra.page(request, "summary.html", known=known, rows=rows, config_args=ra.config_args, workdir=ra.cfg.workdir)


@reviewer.post("/expert/merge")
async def merge_expert(request: Request, form=Depends(csrf_form), ra: ReviewApp = Depends(review_app)):
    from cmevlm.evaluate.expert import SheetError, import_sheet

    q = ra.queues["expert"]
    try:
        import_sheet(ra.cfg, q.log.uri)
        n = q.progress(q.state()[0])[0]
        request.state.session["flash"].append(("ok", f"Merged {n} scored items into eval/metrics.json and eval/report.html."))
        log.info("review: expert scores merged (%d items)", n)
    except (SheetError, FileNotFoundError, ValueError) as e:
        request.state.session["flash"].append(("error", f"Could not merge: {e}"))
    return RedirectResponse("/summary", 303)


@reviewer.get("/image/{queue}/{n}")
def image(qn: tuple[Queue, int] = Depends(queue_item)):
    q, n = qn
    png = q.image(n - 1)
    if not png:
        return PlainTextResponse("no image for this item", 404)
    return Response(png, media_type="image/png")


@reviewer.get("/{queue}")
def resume(q: Queue = Depends(a_queue)):
    n = q.first_undecided(q.state()[0])
    return RedirectResponse(f"/{q.name}/{n}" if n else f"/{q.name}/done", 303)


@reviewer.get("/{queue}/done")
def queue_done(request: Request, q: Queue = Depends(a_queue), ra: ReviewApp = Depends(review_app)):
    latest, _ = q.state()
    return ra.page(request, "done.html", known={q.name: latest}, queue=q, counts=q.counts(latest), done=q.progress(latest)[0])


@reviewer.get("/{queue}/{n}")
def item(request: Request, qn: tuple[Queue, int] = Depends(queue_item), ra: ReviewApp = Depends(review_app)):
    return ra.item_page(request, *qn)


@reviewer.post("/{queue}/{n}")
async def decide(request: Request, qn: tuple[Queue, int] = Depends(queue_item), form=Depends(csrf_form),
                 name: str = Depends(signed_in), ra: ReviewApp = Depends(review_app)):
    q, n = qn
    item_id = q.items[n - 1]["item_id"]
    if form.get("item_id") != item_id:
        return PlainTextResponse("This queue was rebuilt after the page was opened: reload it.", 409)
    try:
        saved = q.log.append(_review_from_form(q, form, name))
    except ValueError as e:
        return ra.item_page(request, q, n, 400, error=str(e), form=form)
    except OSError as e:  # a full disk, a lost mount: the append took its bytes back
        log.error("review: %s #%d: a decision could not be written (%s)", q.name, n, type(e).__name__)
        return ra.item_page(request, q, n, 503, error=f"Not saved: the reviews file could not be written ({e.strerror or e}). "
                                                      "Nothing was recorded; try again.", form=form)
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
    return RedirectResponse(f"/{q.name}/{nxt}" if nxt else f"/{q.name}/done", 303)


async def _host_check(request: Request, call_next):
    """Before any route, session or file: the Host must be one this app answers to."""
    hosts = request.app.state.hosts
    if host_of(request.headers.get("host", "")) not in hosts:
        log.warning("review: a request for another host name was refused (421)")
        return PlainTextResponse(f"misdirected request: this app answers to {', '.join(sorted(hosts))}", 421)
    return await call_next(request)


async def _headers(request: Request, call_next):
    """Every response: the security headers, and the pre-auth cookie a visitor was given."""
    response = await call_next(request)
    for k, v in HEADERS.items():
        response.headers.setdefault(k, v)
    if fresh := getattr(request.state, "fresh_pre", None):
        _set_cookie(response, fresh, request.app.state.review.secure, PRE_COOKIE)
    return response


def create_app(cfg: RunConfig, token: str | None = None, config_args: str = "", idle_minutes: float = 30,
               https: bool = False, hosts: frozenset[str] = frozenset(LOOPBACK)) -> FastAPI:
    """The app over `cfg.workdir`. `token`: required at sign-in when set. `config_args`: the
    `--config FILE` the summary page adds to the commands that rebuild the datasets.
    `idle_minutes`: a session unused that long ends. `https`: the app is reached over HTTPS
    (itself or the hospital's proxy), so cookies carry the Secure flag. `hosts`: the Host
    names it answers to (answered_hosts)."""
    app = FastAPI(title="cmevlm review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = ReviewApp(cfg, token, config_args, idle_minutes, https)
    app.state.queues = app.state.review.queues
    app.state.hosts = hosts
    app.middleware("http")(_headers)
    app.middleware("http")(_host_check)  # added last: runs first

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, exc: SignInRequired):
        if request.method == "GET":
            return RedirectResponse(f"/login?next={quote(request.url.path)}", 303)
        return PlainTextResponse("sign in first", 403)

    @app.exception_handler(PermissionError)
    async def forbidden(request: Request, exc: PermissionError):
        return PlainTextResponse(str(exc), 403)

    @app.exception_handler(HTTPException)
    async def not_found(request: Request, exc: HTTPException):
        return PlainTextResponse(str(exc.detail), exc.status_code)

    app.include_router(public)
    app.include_router(reviewer)
    return app


def server_config(app: FastAPI, host: str, port: int, trusted_proxies: tuple[str, ...] = ()):
    """uvicorn's settings: X-Forwarded-For / -Proto are read only from `trusted_proxies` (the
    hospital's proxy); from anyone else they are ignored, so a client cannot pick the address
    its sign-in failures are counted under (uvicorn otherwise trusts them from 127.0.0.1)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning",
                          proxy_headers=bool(trusted_proxies), forwarded_allow_ips=",".join(trusted_proxies) or "")


def run(cfg: RunConfig, host: str = "127.0.0.1", port: int = 8090, token: str | None = None, config_args: str = "",
        idle_minutes: float = 30, https: bool = False, allowed_hosts: tuple[str, ...] = (), trusted_proxies: tuple[str, ...] = ()) -> None:
    import uvicorn

    app = create_app(cfg, resolve_token(host, token), config_args, idle_minutes, https, answered_hosts(host, allowed_hosts))
    for name, q in app.state.queues.items():
        latest, _ = q.state()
        done, total = q.progress(latest)
        log.info("review: %s: %d/%d decided%s", name, done, total, f" (empty: {q.missing})" if q.missing else "")
    uvicorn.Server(server_config(app, host, port, trusted_proxies)).run()

"""The chat web server: one model shared by all requests, answers streamed as SSE.

Endpoints
  GET  /                  our chat page (static/index.html: one file, no external assets)
  GET  /health            status, model info, limits, load
  POST /chat/completions  nanochat's request shape; streams `data: {"token": ...}` events,
                          then `data: {"done": true}` (so nanochat's own page works too)
  POST /choice            for a multiple-choice question (lines "A. ..", "B. .."): the
                          letter the model picks and its probability
  POST /v1/chat/completions, GET /v1/models   the OpenAI-compatible API (openai_api.py)

Hardening, and why
  * nanochat's limits (MAX_* in requests.py) are checked before any work; every violation is a 4xx
    with {"error": "..."} naming the field, never a 5xx or a hung connection.
  * One model, one generation at a time: torch runs in a worker thread that holds
    `model_lock`. Requests beyond `max_pending` (running + waiting) get 429 at once with
    Retry-After rather than queueing without bound (429 and not 503: the server is fine,
    the client should slow down).
  * A client that goes away stops its generation (checked between tokens), so an
    abandoned tab does not keep the model busy.
  * A reply that runs out of the card's memory releases it and is answered with 507 and the
    JSON error (requests.OUT_OF_MEMORY_STATUS says why that status); a stream waits for its
    first token before the 200 goes out, so that is the answer wherever the reply failed before
    saying anything, and a stream that fails later ends with an error event. The server goes on.
  * Text leaves the server only as complete UTF-8 (see generation.IncrementalDecoder).
  * Request bodies over max_body_bytes are refused with 413 before they are parsed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sciassist.common import check_fields, setting
from sciassist.data.answers import question_options
from sciassist.serve.generation import ChatSettings
from sciassist.serve.web.openai_api import add_openai_routes
from sciassist.serve.web.requests import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_MAX_TOKENS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_MAX_TOKENS,
    MIN_TEMPERATURE,
    MIN_TOP_K,
    BodySizeLimit,
    ChatRequest,
    HostAllowList,
    error_response,
    format_validation_error,
)
from sciassist.serve.web.state import ChatState, Sampling, generation_events, opening

log = logging.getLogger("sciassist.serve.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"



@dataclass
class ServerSettings(ChatSettings):
    """The sampling defaults (used when a request does not say; a fixed seed makes every
    request reproducible), within the limits the API puts on a request, and the server's limits."""

    temperature: float = setting(0.6, "default sampling temperature of a request (0 = greedy)",
                                 at_least=MIN_TEMPERATURE, at_most=MAX_TEMPERATURE)
    top_k: int = setting(50, "sample from the k likeliest", at_least=MIN_TOP_K, at_most=MAX_TOP_K)
    max_tokens: int = setting(512, "longest answer in tokens", at_least=MIN_MAX_TOKENS, at_most=MAX_MAX_TOKENS)
    max_pending: int = setting(4, "generations running + waiting for the model; more get HTTP 429", at_least=1)
    max_body_bytes: int = setting(DEFAULT_MAX_BODY_BYTES, "larger request bodies get HTTP 413 before parsing",
                                  at_least=1)
    allow_origins: list[str] = setting([], "allow this origin cross-site (CORS; default: same origin only)",
                                       flags=("--allow_origin",))
    allowed_hosts: list[str] = setting([], "answer requests addressed to this host name too (loopback names always "
                                           "are; * = any name)", flags=("--allow_host",))


def _sse(payload: dict) -> str:
    # ensure_ascii=False: the browser decodes UTF-8 anyway, and it keeps events small.
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _nanochat_events(events):
    """nanochat's stream: data: {"token": ...} events (or {"error": ...}), then data: {"done": true}."""
    async for kind, value in events:
        if kind == "end":
            yield _sse({"done": True})
        else:
            yield _sse({kind: value.message if kind == "error" else value})


# ---------------------------------------------------------------------------------------
# The app


def add_error_handlers(app: FastAPI) -> None:
    """Every error as the same JSON body (error_response): bad requests, HTTP errors, and an
    unexpected exception (logged, its type only in the reply)."""

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        status, message = format_validation_error(exc)
        return error_response(status, message, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None),
                              path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", path=request.url.path)


def create_app(loaded, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around one loaded model (sciassist.checkpoints.LoadedModel)."""
    settings = settings or ServerSettings()
    check_fields(settings)  # settings built in code: the checks the command line makes
    app = FastAPI(title="SciAssist chat", docs_url=None, redoc_url=None, openapi_url=None)
    state = ChatState(loaded, settings)
    app.state.chat = state
    add_error_handlers(app)
    index_html = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    # The page needs nothing from elsewhere; the policy makes sure it never loads anything.
    page_headers = {
        "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",  # no other page may frame this one (clickjacking)
        "Cache-Control": "no-cache",
    }

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index():
        return HTMLResponse(index_html, headers=page_headers)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        return state.health()

    @app.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        sampling = Sampling.of(body, settings)
        prompt = state.render([m.model_dump() for m in body.messages], sampling.max_tokens)
        ticket = state.gate.try_enter()
        if ticket is None:
            return state.busy()
        failure, events = await opening(generation_events(state, request, prompt, sampling, ticket))
        if failure is not None:
            return error_response(failure.status, failure.message, headers=failure.headers, path=request.url.path)
        return StreamingResponse(
            _nanochat_events(events),
            media_type="text/event-stream",
            # no-transform / X-Accel-Buffering: proxies must not hold tokens back.
            headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"},
        )

    @app.post("/choice")
    async def choice(body: ChatRequest):
        question = body.messages[-1].content
        options = question_options(question)
        letters = [letter for letter, _ in options]
        if not letters:
            return {"letter": None, "probability": None, "probabilities": {}, "num_choices": 0}
        state.render([{"role": "user", "content": question}], 1)  # a 400 if it does not fit the context
        ticket = state.gate.try_enter()
        if ticket is None:
            return state.busy()
        probabilities = await asyncio.get_running_loop().run_in_executor(
            state.executor, state.choice_probabilities, question, options, ticket)
        state.count("choices")
        best = max(range(len(letters)), key=lambda i: probabilities[i])
        return {
            "letter": letters[best],
            "probability": float(probabilities[best]),
            "probabilities": {letter: float(p) for letter, p in zip(letters, probabilities, strict=True)},
            "num_choices": len(letters),
        }

    if settings.allow_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.allow_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    add_openai_routes(app, state)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostAllowList, allowed=settings.allowed_hosts)
    return app


# ---------------------------------------------------------------------------------------
# Running the server inside another program (tests, a notebook cell)


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread, e.g. from a notebook or a test.

    The socket is bound before the thread starts (port 0 = any free port), so `url` is
    known at once and there is no race for the port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> BackgroundServer:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.socket.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

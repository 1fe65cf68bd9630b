"""The chat web server: one model shared by all requests, answers streamed as SSE.

Endpoints
  GET  /                  our chat page (static/index.html: one file, no external assets)
  GET  /health            status, model info, limits, load
  POST /chat/completions  nanochat's request shape; streams `data: {"token": ...}` events,
                          then `data: {"done": true}` (so nanochat's own page works too)
  POST /choice            for a multiple-choice question (lines "A. ..", "B. .."): the
                          letter the model picks and its probability

Hardening, and why
  * nanochat's limits (MAX_* in requests.py) are checked before any work; every violation is a 4xx
    with {"error": "..."} naming the field, never a 5xx or a hung connection.
  * One model, one generation at a time: torch runs in a worker thread that holds
    `model_lock`. Requests beyond `max_pending` (running + waiting) get 429 at once with
    Retry-After rather than queueing without bound (429 and not 503: the server is fine,
    the client should slow down).
  * A client that goes away stops its generation (checked between tokens), so an
    abandoned tab does not keep the model busy.
  * Text leaves the server only as complete UTF-8 (see chat_cli.IncrementalDecoder).
  * Request bodies over max_body_bytes are refused with 413 before they are parsed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanochat.engine import Engine
from sciassist.common import setting
from sciassist.data.answers import question_options
from sciassist.eval.scoring import choice_scores, letter_probabilities, softmax
from sciassist.serve.chat_cli import ChatSettings, PromptTooLong, inference_context, render_prompt, stream_reply
from sciassist.serve.web.requests import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_MAX_TOKENS,
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MAX_TOTAL_CHARS,
    MIN_MAX_TOKENS,
    MIN_TEMPERATURE,
    MIN_TOP_K,
    BodySizeLimit,
    ChatRequest,
    HostAllowList,
    error_response,
    format_validation_error,
)

log = logging.getLogger("sciassist.serve.web")

STATIC_DIR = Path(__file__).resolve().parent / "static"

# How often a waiting stream checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerSettings(ChatSettings):
    """The sampling defaults (used when a request does not say; a fixed seed makes every
    request reproducible) and the server's limits."""

    top_k: int = setting(50, "sample from the k likeliest")
    max_pending: int = setting(4, "generations running + waiting for the model; more get HTTP 429")
    max_body_bytes: int = setting(DEFAULT_MAX_BODY_BYTES, "larger request bodies get HTTP 413 before parsing")
    allow_origins: list[str] = setting([], "allow this origin cross-site (CORS; default: same origin only)",
                                       flags=("--allow_origin",))
    allowed_hosts: list[str] = setting([], "answer requests addressed to this host name too (loopback names always "
                                           "are; * = any name)", flags=("--allow_host",))


def settings_problem(settings: ServerSettings) -> str | None:
    """What makes these settings unusable (defaults outside the API's limits), or None."""
    if not (MIN_TEMPERATURE <= settings.temperature <= MAX_TEMPERATURE
            and settings.top_k is not None and MIN_TOP_K <= settings.top_k <= MAX_TOP_K
            and MIN_MAX_TOKENS <= settings.max_tokens <= MAX_MAX_TOKENS):
        return (f"defaults must respect the API limits: temperature {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}, "
                f"top_k {MIN_TOP_K}..{MAX_TOP_K}, max_tokens {MIN_MAX_TOKENS}..{MAX_MAX_TOKENS}")
    if settings.max_pending < 1:
        return "--max_pending must be >= 1"
    return None


# ---------------------------------------------------------------------------------------
# Shared model state


class Ticket:
    """One admitted request. Released exactly once: by the worker when it lets go of the
    model, or when the response is dropped before the worker ever started."""

    def __init__(self, gate: Gate):
        self._gate = gate
        self._released = False

    def release(self) -> None:
        with self._gate._lock:
            if not self._released:
                self._released = True
                self._gate.count -= 1

    def __del__(self):  # a streaming response the server never iterated
        self.release()


class Gate:
    """Admission bound: at most `limit` requests hold or wait for the model."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        # Re-entrant: Ticket.__del__ may run from the garbage collector while this very
        # thread holds the lock (a ticket caught in a reference cycle).
        self._lock = threading.RLock()

    def try_enter(self) -> Ticket | None:
        with self._lock:
            if self.count >= self.limit:
                return None
            self.count += 1
        return Ticket(self)


class ChatState:
    """The loaded model and everything that serialises access to it."""

    def __init__(self, loaded, settings: ServerSettings):
        self.loaded = loaded
        self.settings = settings
        self.engine = Engine(loaded.model, loaded.tokenizer)
        self.model_lock = threading.Lock()  # held by the worker thread running torch
        self.gate = Gate(settings.max_pending)
        # One thread per admitted request: a waiting request parks its own thread on the
        # lock and never starves the event loop's default pool.
        self.executor = ThreadPoolExecutor(max_workers=max(1, settings.max_pending), thread_name_prefix="sciassist-gen")
        self.stats = {"completions": 0, "cancelled": 0, "failed": 0, "choices": 0, "pieces": 0}
        self._stats_lock = threading.Lock()

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def render(self, messages: list[dict], max_tokens: int):
        """The prompt ids of a conversation; a leading system message replaces the server's
        system prompt. A 400 if it cannot fit."""
        loaded, system_prompt = self.loaded, self.settings.system_prompt
        if messages and messages[0]["role"] == "system":
            system_prompt, messages = messages[0]["content"], messages[1:]
        try:
            return render_prompt(loaded.tokenizer, messages, system_prompt, loaded.sequence_len, max_tokens)
        except PromptTooLong as err:
            raise HTTPException(400, str(err)) from None
        except ValueError as err:  # the tokenizer's own conversation checks
            raise HTTPException(400, f"messages: {err}") from None

    def busy(self) -> JSONResponse:
        return error_response(
            429,
            f"busy: {self.settings.max_pending} requests are already running or waiting for the model; retry shortly",
            headers={"Retry-After": "1"},
        )

    def health(self) -> dict:
        settings = self.settings
        return {
            "status": "ok",
            "ready": True,
            # the run's folder name, not its path: the page needs no more about this machine
            "model": {**self.loaded.info(), "checkpoint": self.loaded.choice.checkpoint_dir.name},
            "system_prompt": settings.system_prompt,
            "defaults": {"temperature": settings.temperature, "top_k": settings.top_k,
                         "max_tokens": settings.max_tokens},
            "limits": {
                "max_messages": MAX_MESSAGES,
                "max_message_chars": MAX_MESSAGE_CHARS,
                "max_total_chars": MAX_TOTAL_CHARS,
                "temperature": [MIN_TEMPERATURE, MAX_TEMPERATURE],
                "top_k": [MIN_TOP_K, MAX_TOP_K],
                "max_tokens": [MIN_MAX_TOKENS, MAX_MAX_TOKENS],
                "max_pending": settings.max_pending,
            },
            "pending": self.gate.count,
            "stats": dict(self.stats),
        }

    def choice_probabilities(self, question: str, options: list[tuple[str, str]], ticket: Ticket) -> list[float]:
        """Probabilities of a question's options, scored as fine-tuning and evaluation see a
        question (system prompt + this question alone), so they mean what the eval report's do.
        Runs in a worker thread; a model fine-tuned on text_first answers names the option
        before its letter, so each option's whole answer line is scored."""
        loaded, system_prompt = self.loaded, self.settings.system_prompt
        content = (system_prompt + "\n\n" + question) if system_prompt else question
        prompt = [[{"role": "user", "content": content}]]
        try:
            with self.model_lock, inference_context(loaded.model):
                if loaded.meta.get("answer_format", "letter_first") == "text_first":
                    scores = choice_scores(loaded.model, loaded.tokenizer, prompt, [[text for _, text in options]],
                                           answer_format="text_first")
                    return softmax(scores[0])
                return letter_probabilities(loaded.model, loaded.tokenizer, prompt, [len(options)])[0]
        finally:
            ticket.release()

    def acquire_model(self, stop: threading.Event) -> bool:
        """Wait for the model; give up (False) if the client left while waiting."""
        while not self.model_lock.acquire(timeout=DISCONNECT_POLL_S):
            if stop.is_set():
                return False
        if stop.is_set():
            self.model_lock.release()
            return False
        return True


def _sse(payload: dict) -> str:
    # ensure_ascii=False: the browser decodes UTF-8 anyway, and it keeps events small.
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class Sampling:
    """How one request's reply is sampled (the request's values, else the server's defaults)."""

    temperature: float
    top_k: int | None
    max_tokens: int
    seed: int

    @classmethod
    def of(cls, body, settings: ServerSettings, max_tokens: int | None = None) -> Sampling:
        seed = body.seed if body.seed is not None else settings.seed
        given = body.max_tokens if max_tokens is None else max_tokens
        return cls(temperature=settings.temperature if body.temperature is None else body.temperature,
                   top_k=settings.top_k if body.top_k is None else body.top_k,
                   max_tokens=settings.max_tokens if given is None else given,
                   seed=secrets.randbits(31) if seed is None else seed)


async def generation_events(state: ChatState, request: Request, prompt, sampling: Sampling, ticket: Ticket):
    """The events of one reply, generated by a worker thread that holds the model: ("notice",
    text), ("token", text)..., then ("error", message) if generation failed, and ("end",
    outcome) with stream_reply's outcome. Stops early, freeing the model, when the client goes
    away or the consumer closes this generator (e.g. at a stop sequence)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    outcome: dict = {"tokens": 0, "finish_reason": "cancelled"}

    def emit(kind: str, value=None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shutting down): nobody to tell
            stop.set()

    def work() -> None:
        try:
            if not state.acquire_model(stop):
                state.count("cancelled")
                return
            try:
                pieces = 0
                for piece in stream_reply(state.engine, state.loaded.tokenizer, prompt.ids,
                                          min(sampling.max_tokens, prompt.max_new_tokens),
                                          temperature=sampling.temperature, top_k=sampling.top_k, seed=sampling.seed,
                                          should_stop=stop.is_set, outcome=outcome):
                    pieces += 1
                    emit("token", piece)
                state.count("pieces", pieces)
                state.count("cancelled" if stop.is_set() else "completions")
            finally:
                state.model_lock.release()
        except Exception as err:  # reported in-stream: the 200 status has already gone out
            log.exception("generation failed")
            state.count("failed")
            emit("error", f"generation failed: {type(err).__name__}: {err}")
        finally:
            ticket.release()
            emit("end", outcome)

    started = False
    try:
        if prompt.dropped_messages:
            yield "notice", f"dropped the {prompt.dropped_messages // 2} oldest turn(s) to fit the model's context"
        state.executor.submit(work)
        started = True
        while True:
            try:
                kind, value = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            yield kind, value
            if kind == "end" or (kind == "token" and await request.is_disconnected()):
                return
    finally:
        # Runs on normal end, on disconnect and on cancellation alike; must not await.
        stop.set()
        if not started:
            ticket.release()


async def _nanochat_events(events):
    """nanochat's stream: data: {"token": ...} events, then data: {"done": true}."""
    async for kind, value in events:
        yield _sse({"done": True} if kind == "end" else {kind: value})


# ---------------------------------------------------------------------------------------
# The app


def create_app(loaded, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app around one loaded model (sciassist.checkpoints.LoadedModel)."""
    settings = settings or ServerSettings()
    app = FastAPI(title="SciAssist chat", docs_url=None, redoc_url=None, openapi_url=None)
    state = ChatState(loaded, settings)
    app.state.chat = state

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        status, message = format_validation_error(exc)
        return error_response(status, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

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
        return StreamingResponse(
            _nanochat_events(generation_events(state, request, prompt, sampling, ticket)),
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

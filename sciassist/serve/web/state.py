"""The model a server shares between its requests, and one reply's generation: admission
(Gate, Ticket), the model lock and its worker threads (ChatState), how a reply is sampled
(Sampling), its stream of events (generation_events) and its opening (opening: a reply that
fails before its first token is answered with an HTTP status), whichever endpoint asked."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse

from nanochat.engine import Engine
from sciassist import memory
from sciassist.common import compute_dtype
from sciassist.eval.scoring import BatchSize, choice_scores, letter_probabilities, softmax
from sciassist.serve.generation import (
    PromptTooLong,
    ReplyOutOfMemory,
    inference_context,
    render_prompt,
    stream_reply,
)
from sciassist.serve.web.requests import (
    MAX_MAX_TOKENS,
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MAX_TOTAL_CHARS,
    MIN_MAX_TOKENS,
    MIN_TEMPERATURE,
    MIN_TOP_K,
    OUT_OF_MEMORY_ADVICE,
    OUT_OF_MEMORY_HEADERS,
    OUT_OF_MEMORY_STATUS,
    error_response,
)

log = logging.getLogger("sciassist.serve.web")

# How often a waiting stream checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


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

    def __init__(self, loaded, settings):
        self.loaded = loaded
        self.settings = settings
        self.engine = Engine(loaded.model, loaded.tokenizer, compute_dtype(loaded.model.get_device()))
        self.model_lock = threading.Lock()  # held by the worker thread running torch
        self.gate = Gate(settings.max_pending)
        # One thread per admitted request: a waiting request parks its own thread on the
        # lock and never starves the event loop's default pool.
        self.executor = ThreadPoolExecutor(max_workers=max(1, settings.max_pending), thread_name_prefix="sciassist-gen")
        self.stats = {"completions": 0, "cancelled": 0, "failed": 0, "out_of_memory": 0, "choices": 0, "pieces": 0}
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

    def busy(self, path: str = "") -> JSONResponse:
        return error_response(
            429,
            f"busy: {self.settings.max_pending} requests are already running or waiting for the model; retry shortly",
            headers={"Retry-After": "1"}, path=path,
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
        batches = BatchSize(say=log.warning)  # a question's rows halve on out-of-memory like an evaluation's
        try:
            with self.model_lock, inference_context(loaded.model):
                if loaded.meta.get("answer_format", "letter_first") == "text_first":
                    scores = choice_scores(loaded.model, loaded.tokenizer, prompt, [[text for _, text in options]],
                                           batch_size=batches, answer_format="text_first")
                    return softmax(scores[0])
                return letter_probabilities(loaded.model, loaded.tokenizer, prompt, [len(options)],
                                            batch_size=batches)[0]
        except memory.OutOfMemory as err:  # halving released what the rows held
            self.count("out_of_memory")
            card = memory.card_of(loaded.model.get_device())
            raise HTTPException(OUT_OF_MEMORY_STATUS, f"out of memory on {card.describe() if card else 'the device'} "
                                f"scoring this question ({err}); a shorter question may fit",
                                headers=OUT_OF_MEMORY_HEADERS) from None
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


@dataclass
class Sampling:
    """How one request's reply is sampled (the request's values, else the server's defaults)."""

    temperature: float
    top_k: int | None
    max_tokens: int
    seed: int

    @classmethod
    def of(cls, body, settings, max_tokens: int | None = None) -> Sampling:
        seed = body.seed if body.seed is not None else settings.seed
        given = body.max_tokens if max_tokens is None else max_tokens
        return cls(temperature=settings.temperature if body.temperature is None else body.temperature,
                   top_k=settings.top_k if body.top_k is None else body.top_k,
                   max_tokens=settings.max_tokens if given is None else given,
                   seed=secrets.randbits(31) if seed is None else seed)


@dataclass(frozen=True)
class Failure:
    """Why a reply failed: the HTTP status it is answered with while no byte has gone out (see
    opening), its message and headers."""

    status: int
    message: str
    headers: dict | None = None


async def generation_events(state: ChatState, request: Request, prompt, sampling: Sampling, ticket: Ticket):
    """The events of one reply, generated by a worker thread that holds the model: ("notice",
    text), ("token", text)..., then ("error", Failure) if generation failed (507 when it ran
    out of the card's memory, whose hold is released by then; 500 for anything else), and
    ("end", outcome) with stream_reply's outcome. Stops early, freeing the model, when the
    client goes away or the consumer closes this generator (e.g. at a stop sequence)."""
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
        except ReplyOutOfMemory as err:  # the server goes on: the next request has the memory back
            log.warning("%s", err)
            state.count("out_of_memory")
            emit("error", Failure(OUT_OF_MEMORY_STATUS, f"{err}; {OUT_OF_MEMORY_ADVICE}", OUT_OF_MEMORY_HEADERS))
        except Exception as err:  # noqa: BLE001 - reported as an event: the endpoint answers with it
            log.exception("generation failed")
            state.count("failed")
            emit("error", Failure(500, f"generation failed: {type(err).__name__}: {err}"))
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


async def opening(events):
    """Await a reply's events up to its first token, failure or end, so that a reply that fails
    before saying anything (running out of memory happens at the prompt, where the cache for
    the whole reply is made) is answered with its HTTP status rather than a 200 and an error
    event. Returns (the Failure or None, the events: those awaited, then the rest); on a
    Failure, the events are closed."""
    early = []
    async for kind, value in events:
        early.append((kind, value))
        if kind != "notice":
            break
    failure = next((value for kind, value in early if kind == "error"), None)
    if failure is not None:
        await events.aclose()

    async def replay():
        for event in early:
            yield event
        async for event in events:
            yield event

    return failure, replay()

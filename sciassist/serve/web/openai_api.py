"""The OpenAI-compatible chat API: POST /v1/chat/completions (streamed or not) and GET /v1/models,
so any OpenAI client (the `openai` package, LangChain, curl scripts) can talk to the tutor.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="sciassist", messages=[{"role": "user", "content": "..."}])

The same model, limits and admission as /chat/completions (sciassist.serve.web.server): at most
MAX_MESSAGES messages of MAX_MESSAGE_CHARS, MAX_TOTAL_CHARS in all, temperature 0..2, top_k
1..200, max_tokens 1..4096, HTTP 429 past --max_pending. Errors use OpenAI's shape. What differs
from OpenAI's service, on purpose: one model is served whatever `model` names (its name is in
the reply); `n` must be 1; `top_p` must be 1 (use `top_k`, as vLLM also accepts); penalties,
logit_bias, tools and response_format are not supported and are refused when set; a leading
system (or developer) message replaces the server's system prompt; `stop` holds up to 4 strings,
and the reply ends before the first of them.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

from sciassist.serve.web.requests import (
    MAX_MAX_TOKENS,
    MAX_MESSAGE_CHARS,
    MAX_MESSAGES,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MIN_MAX_TOKENS,
    MIN_TEMPERATURE,
    MIN_TOP_K,
    ChatMessage,
    conversation_problem,
)
from sciassist.serve.web.state import ChatState, Sampling, generation_events, opening

MAX_STOP_SEQUENCES = 4
# OpenAI parameters this server does not implement: refused when given a non-default value,
# rather than silently ignored.
UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "logprobs": False,
               "top_logprobs": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
               "response_format": None}


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "name"
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def as_chat_message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return ChatMessage.model_construct(role="system" if self.role == "developer" else self.role, content=text)


class OpenAIChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked against UNSUPPORTED; the rest ignored, as OpenAI does
    model: StrictStr | None = None
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float | None = Field(default=None, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=MIN_TOP_K, le=MAX_TOP_K, strict=True)
    max_tokens: int | None = Field(default=None, ge=MIN_MAX_TOKENS, le=MAX_MAX_TOKENS, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=MIN_MAX_TOKENS, le=MAX_MAX_TOKENS, strict=True)
    stop: StrictStr | list[StrictStr] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=1, le=1, strict=True)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, strict=True)

    @model_validator(mode="after")
    def _check(self):
        messages = [m.as_chat_message() for m in self.messages]
        for index, message in enumerate(messages):
            if len(message.content) > MAX_MESSAGE_CHARS:
                raise ValueError(f"messages[{index}].content: {len(message.content)} characters, at most "
                                 f"{MAX_MESSAGE_CHARS} allowed")
        problem = conversation_problem(messages)
        if problem:
            raise ValueError(problem)
        if self.top_p is not None and self.top_p != 1:
            raise ValueError("top_p below 1 is not supported here; use top_k (1..200) instead")
        for name, default in UNSUPPORTED.items():
            if (self.model_extra or {}).get(name, default) not in (default, None):
                raise ValueError(f"{name} is not supported by this server")
        if len(self.stop_sequences()) > MAX_STOP_SEQUENCES or any(not s for s in self.stop_sequences()):
            raise ValueError(f"stop takes at most {MAX_STOP_SEQUENCES} non-empty strings")
        return self

    def chat_messages(self) -> list[dict]:
        return [m.as_chat_message().model_dump() for m in self.messages]

    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def reply_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class StopText:
    """Cuts a streamed reply before the first stop sequence: text that could still be the
    start of one is held back until the next piece decides."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, piece: str) -> str:
        self.held += piece
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held, self.hit = self.held[:min(found)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def _finish_reason(outcome: dict, stopper: StopText) -> str:
    return "stop" if stopper.hit or outcome.get("finish_reason") == "stop" else "length"


def _usage(prompt, outcome: dict) -> dict:
    completion = int(outcome.get("tokens", 0))
    return {"prompt_tokens": len(prompt.ids), "completion_tokens": completion,
            "total_tokens": len(prompt.ids) + completion}


async def _collect(events, stopper: StopText):
    """(text, outcome, error) of a whole reply; error: the state.Failure, or None."""
    parts, outcome, error = [], {}, None
    async for kind, value in events:
        if kind == "token" and not stopper.hit:
            parts.append(stopper.feed(value))
            if stopper.hit:
                break  # closing the events stops the generation
        elif kind == "error":
            error = value
        elif kind == "end":
            outcome = value
    if not stopper.hit:
        parts.append(stopper.flush())
    return "".join(parts), outcome, error


def _chunk(ident, created, model, delta, finish_reason=None):
    payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(events, stopper: StopText, ident, created, model, prompt, include_usage):
    yield _chunk(ident, created, model, {"role": "assistant", "content": ""})
    outcome = {}
    async for kind, value in events:
        if kind == "token":
            text = stopper.feed(value)
            if text:
                yield _chunk(ident, created, model, {"content": text})
            if stopper.hit:
                break
        elif kind == "error":  # after the 200: the error object OpenAI's clients read from a stream
            error = {"message": value.message, "type": "server_error", "param": None, "code": value.status}
            yield f"data: {json.dumps({'error': error}, ensure_ascii=False)}\n\n"
        elif kind == "end":
            outcome = value
    tail = "" if stopper.hit else stopper.flush()
    if tail:
        yield _chunk(ident, created, model, {"content": tail})
    yield _chunk(ident, created, model, {}, _finish_reason(outcome, stopper))
    if include_usage:
        usage = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                 "usage": _usage(prompt, outcome)}
        yield f"data: {json.dumps(usage)}\n\n"
    yield "data: [DONE]\n\n"


def add_openai_routes(app: FastAPI, state: ChatState) -> None:
    model_name = state.loaded.choice.name

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "sciassist"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: OpenAIChatRequest, request: Request):
        sampling = Sampling.of(body, state.settings, max_tokens=body.reply_budget())
        prompt = state.render(body.chat_messages(), sampling.max_tokens)
        ticket = state.gate.try_enter()
        if ticket is None:
            return state.busy(request.url.path)
        ident, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        events = generation_events(state, request, prompt, sampling, ticket)
        stopper = StopText(body.stop_sequences())
        if body.stream:
            failure, events = await opening(events)
            if failure is not None:
                raise HTTPException(failure.status, failure.message, headers=failure.headers)
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(events, stopper, ident, created, model_name, prompt, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"})
        text, outcome, error = await _collect(events, stopper)
        if error is not None:
            raise HTTPException(error.status, error.message, headers=error.headers)
        return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": _finish_reason(outcome, stopper)}],
                "usage": _usage(prompt, outcome)}

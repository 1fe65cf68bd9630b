"""What a request to the chat server may be: nanochat's limits, the request shapes, and the
one error format (`{"error": "..."}` naming the field) every refusal uses."""

from __future__ import annotations

from typing import Literal

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictStr, model_validator

# nanochat's limits, so a client written for nanochat's server sees the same behaviour.
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8_000
MAX_TOTAL_CHARS = 32_000
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.0, 2.0
MIN_TOP_K, MAX_TOP_K = 1, 200
MIN_MAX_TOKENS, MAX_MAX_TOKENS = 1, 4096
# JSON can spell one character as a 12-byte surrogate-pair escape: 32,000 characters
# can legitimately take ~400 kB, so 1 MiB never rejects a valid request.
DEFAULT_MAX_BODY_BYTES = 1 << 20

class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: StrictStr = Field(max_length=MAX_MESSAGE_CHARS)


def conversation_problem(messages) -> str | None:
    """What makes a conversation unusable, or None: an optional leading system message (it
    replaces the server's system prompt), then user and assistant alternating, starting and
    ending with the user; no empty turn; at most MAX_TOTAL_CHARS in all."""
    total = sum(len(m.content) for m in messages)
    if total > MAX_TOTAL_CHARS:
        return f"messages: {total} characters in total, at most {MAX_TOTAL_CHARS} allowed"
    first = 1 if messages and messages[0].role == "system" else 0
    for index, message in enumerate(messages):
        if not message.content.strip():
            return f"messages[{index}].content: empty (nanochat's chat format has no empty turns)"
        if index < first:
            continue
        expected = "user" if (index - first) % 2 == 0 else "assistant"
        if message.role != expected:
            where = "after the system message" if first else "starting with 'user'"
            return (f"messages[{index}].role: expected {expected!r} (an optional system message first, then roles "
                    f"alternate, {where}), got {message.role!r}")
    if messages[-1].role != "user":
        return "messages: the last message must be from the user"
    return None


class ChatRequest(BaseModel):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    # strict: true, "5" or 5.5 are mistakes worth a clear error, not something to coerce.
    temperature: float | None = Field(
        default=None, ge=MIN_TEMPERATURE, le=MAX_TEMPERATURE, allow_inf_nan=False, strict=True
    )
    top_k: int | None = Field(default=None, ge=MIN_TOP_K, le=MAX_TOP_K, strict=True)
    max_tokens: int | None = Field(default=None, ge=MIN_MAX_TOKENS, le=MAX_MAX_TOKENS, strict=True)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, strict=True)  # ours, not nanochat's: reproducible

    @model_validator(mode="after")
    def _check_conversation(self):
        problem = conversation_problem(self.messages)
        if problem:
            raise ValueError(problem)
        return self


def format_validation_error(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid")
        reason = (detail.get("ctx") or {}).get("error", "JSON decode error")
        return 400, f"request body is not valid JSON ({reason} at position {detail['loc'][-1]})"
    parts = []
    for e in errors[:5]:
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        where = ""
        for p in loc:
            where += f"[{p}]" if p.isdigit() else (f".{p}" if where else p)
        message = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if message.startswith("messages"):  # our own validator's messages name their field
            parts.append(message)
        else:
            parts.append(f"{where or 'request body'}: {message}")
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more problems")
    return 422, "; ".join(parts) or "invalid request"


OPENAI_PREFIX = "/v1/"

# A request the card's memory cannot hold (its prompt and reply budget together): 507
# Insufficient Storage, "the server is unable to store the representation needed to complete the
# request", is that case exactly, the KV cache being what cannot be stored. A 5xx and not 413:
# the request is valid and fits a larger card (413 is this server's answer to a body over
# --max_body_bytes); not 503: nothing is temporarily down. The same request would fail again on
# this card, so clients are told not to retry it (OpenAI's clients obey x-should-retry).
OUT_OF_MEMORY_STATUS = 507
OUT_OF_MEMORY_HEADERS = {"x-should-retry": "false"}
OUT_OF_MEMORY_ADVICE = "retry with a smaller max_tokens or a shorter conversation"


def error_response(status: int, message: str, headers: dict | None = None, path: str = "") -> JSONResponse:
    """{"error": "..."}; under /v1/ (the OpenAI-compatible API) OpenAI's shape,
    {"error": {"message", "type", "param", "code"}}, which its clients read."""
    if path.startswith(OPENAI_PREFIX):
        kind = "invalid_request_error" if status < 500 else "server_error"
        error = {"message": message, "type": kind, "param": None, "code": status}
        return JSONResponse({"error": error}, status_code=status, headers=headers)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(header: str) -> str:
    """The name part of a Host header: "Example.org:8000" -> "example.org", "[::1]:80" -> "::1"."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostAllowList:
    """Answer only requests addressed to this server by a name it was told about (loopback
    names always): a page on another site that resolves its own name to 127.0.0.1 (DNS
    rebinding) gets a 421, never the model. "*" allows any name."""

    def __init__(self, app, allowed: list[str]):
        self.app = app
        self.allowed = {host_name(name) for name in (*LOOPBACK_HOSTS, *allowed)}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.allowed:
                shown = header[:100] or "(none)"
                response = error_response(421, f"this server does not answer for host {shown!r}; start it with "
                                               f"--allow_host NAME to allow that name")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimit:
    """Refuse request bodies over `max_bytes` (413) before anything parses them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body too large: at most {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await error_response(413, message)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)  # FastAPI re-raises it as is
            return msg

        await self.app(scope, limited_receive, send)

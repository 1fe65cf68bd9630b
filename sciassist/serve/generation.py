"""Generation shared by the terminal chat (sciassist.serve.chat_cli) and the web server
(sciassist.serve.web): how replies are sampled (ChatSettings), the prompt rendered with turn
dropping, incremental UTF-8 decoding, and streaming a reply."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from nanochat.engine import MIN_SAMPLING_TEMPERATURE
from sciassist import memory
from sciassist.common import autocast, setting
from sciassist.data.scienceqa import SYSTEM_PROMPT as TUTOR_SYSTEM_PROMPT


@dataclass
class ChatSettings:
    """How replies are sampled; the chat here and the web server share these."""

    system_prompt: str | None = setting(TUTOR_SYSTEM_PROMPT, 'system prompt (default: the science tutor; "" for none)')
    temperature: float = setting(0.6, f"0 = greedy (so is anything below {MIN_SAMPLING_TEMPERATURE:g})",
                                 at_least=0.0, at_most=2.0)
    top_k: int | None = setting(50, "sample from the k likeliest; 0 = all", at_least=0)
    max_tokens: int = setting(512, "longest answer in tokens", at_least=1)
    seed: int | None = setting(None, "make answers reproducible (default: random)", at_least=0)


class PromptTooLong(ValueError):
    """Even the last user message alone does not fit the model's context."""

    def __init__(self, num_tokens: int, limit: int):
        self.num_tokens, self.limit = num_tokens, limit
        super().__init__(
            f"the message is {num_tokens} tokens with the system prompt, but the model's context leaves room "
            f"for {limit} prompt tokens; shorten it"
        )


class ReplyOutOfMemory(RuntimeError):
    """A reply ran out of the device's memory (stream_reply has released what it held): the
    prompt, the reply's token budget or the two together need more than the card has free."""

    def __init__(self, device, detail: str):
        card = memory.card_of(device)
        super().__init__(f"out of memory on {card.describe() if card else device} while generating this reply "
                         f"({detail})")


@dataclass
class Prompt:
    ids: list[int]
    dropped_messages: int  # oldest messages left out so the rest fits the context
    max_new_tokens: int  # the reply's budget: the request's max_tokens capped by the context left


def reply_reserve(sequence_len: int, max_tokens: int) -> int:
    """Tokens kept free for the answer when deciding how much history fits.

    A quarter of the context at most: long histories still leave the answer room to
    start, and a huge max_tokens cannot starve the history entirely."""
    return max(1, min(max_tokens, sequence_len // 4))


def render_prompt(
    tokenizer, messages: list[dict], system_prompt: str | None, sequence_len: int, max_tokens: int
) -> Prompt:
    """Token ids for generating the next assistant turn of `messages`.

    messages alternate user/assistant, start and end with user. The system prompt is
    merged into the first user message as nanochat's chat format does (system + blank
    line + user), so it is rendered exactly as fine-tuning saw it. When the conversation
    is too long for the model, the oldest user/assistant pairs are dropped (the system
    prompt stays, attached to the first remaining user message)."""
    if not messages or messages[-1]["role"] != "user":
        raise ValueError("the conversation must end with a user message")
    budget = sequence_len - reply_reserve(sequence_len, max_tokens)
    dropped = 0
    while True:
        kept = [dict(role=m["role"], content=m["content"]) for m in messages[dropped:]]
        if system_prompt:
            kept[0]["content"] = system_prompt + "\n\n" + kept[0]["content"]
        ids = tokenizer.render_for_completion({"messages": kept})
        if len(ids) <= budget:
            return Prompt(
                ids=list(ids), dropped_messages=dropped, max_new_tokens=min(max_tokens, sequence_len - len(ids))
            )
        if len(messages) - dropped <= 1:
            raise PromptTooLong(len(ids), budget)
        dropped += 2  # a user turn and the assistant's answer to it


class IncrementalDecoder:
    """Turns token ids into text pieces that are always complete UTF-8.

    A character can be split across tokens (byte-level BPE); decoding such a prefix gives
    U+FFFD. Ids are held back until they decode without a trailing U+FFFD; because the
    held-back ids start at a character boundary, decoding them alone is exact. The
    concatenation of all pieces (including flush()) equals tokenizer.decode(all ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


def inference_context(model):
    """inference_mode, plus bf16 autocast on CUDA as nanochat runs (CPU stays fp32).

    For direct forward passes (multiple-choice scoring); Engine.generate sets up its own."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(autocast(model.get_device()))
    return stack


# Tokens that open or close a turn: the answer is over (nanochat itself stops at the
# first two; a model that starts writing the next user turn is done answering too).
TURN_TOKENS = ("<|assistant_end|>", "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>")


def stream_reply(
    engine,
    tokenizer,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = ChatSettings.temperature,
    top_k: int | None = ChatSettings.top_k,
    seed: int | None = None,
    should_stop: Callable[[], bool] | None = None,
    outcome: dict | None = None,
) -> Iterator[str]:
    """Sample one assistant reply and yield its text in complete-UTF-8 pieces.

    Stops at a turn token (TURN_TOKENS), after max_tokens, or as soon as should_stop() is
    true (checked after every token: a client that went away frees the model). Other
    special tokens (tool-call markers; no tools run here) are left out of the text rather
    than shown to a student as markup. outcome, when given, receives "tokens" (sampled, the
    final turn token not counted) and "finish_reason": stop (a turn token), length (max_tokens)
    or cancelled (should_stop). Running out of the device's memory, before the first piece or
    after some, releases what the reply held and raises ReplyOutOfMemory."""
    outcome = {} if outcome is None else outcome
    outcome.update(tokens=0, finish_reason="length")
    stop_ids = {tokenizer.encode_special(name) for name in TURN_TOKENS}
    special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    if seed is None:
        seed = secrets.randbits(31)
    decoder = IncrementalDecoder(tokenizer)
    failed = None
    try:
        for token_column, _mask in engine.generate(
            prompt_ids, num_samples=1, max_tokens=max_tokens, temperature=temperature, top_k=top_k or None, seed=seed
        ):
            token = int(token_column[0])
            if token in stop_ids:
                outcome["finish_reason"] = "stop"
                break
            outcome["tokens"] += 1
            if token not in special_ids:
                piece = decoder.push(token)
                if piece:
                    yield piece
            if should_stop is not None and should_stop():
                outcome["finish_reason"] = "cancelled"
                break
    except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here; the rest re-raised
        if not memory.is_out_of_memory(err):
            raise
        failed = memory.first_line(err)
    if failed is not None:
        # outside the except block: its traceback would keep the failed step's tensors alive
        memory.release_memory(engine.model.get_device())
        raise ReplyOutOfMemory(engine.model.get_device(), failed)
    tail = decoder.flush()
    if tail:
        yield tail


# ---------------------------------------------------------------------------------------
# The terminal program

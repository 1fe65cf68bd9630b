"""Chat with a checkpoint in the terminal: python -m sciassist.serve.chat_cli (make chat).

Multi-turn, answers stream as they are sampled, the science-tutor system prompt by
default. Commands: /clear forgets the conversation, /quit (or Ctrl-D, or Ctrl-C at the
prompt) leaves; Ctrl-C while an answer streams stops that answer. `-p "question"` answers
once, prints only the answer on stdout and exits (for scripts).

The helpers here (prompt rendering with turn dropping, incremental UTF-8 decoding,
streaming a reply) are shared with the web server in sciassist.serve.web.server.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from nanochat.checkpoint import CheckpointError
from nanochat.engine import MIN_SAMPLING_TEMPERATURE, Engine
from sciassist.checkpoints import CheckpointSettings, resolve_from_settings
from sciassist.common import (
    UserError,
    autocast,
    compute_dtype,
    print_error,
    setting,
    settings_from_namespace,
    settings_parser,
)
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
    or cancelled (should_stop)."""
    outcome = {} if outcome is None else outcome
    outcome.update(tokens=0, finish_reason="length")
    stop_ids = {tokenizer.encode_special(name) for name in TURN_TOKENS}
    special_ids = {tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    if seed is None:
        seed = secrets.randbits(31)
    decoder = IncrementalDecoder(tokenizer)
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
    tail = decoder.flush()
    if tail:
        yield tail


# ---------------------------------------------------------------------------------------
# The terminal program


@dataclass
class ChatCommand(CheckpointSettings, ChatSettings):
    """`python -m sciassist.serve.chat_cli`: the model flags, the sampling flags and -p."""

    prompt: str | None = setting(None, "answer this one question, print only the answer, exit", flags=("-p",))


class ChatSession:
    """A conversation with one loaded model; the terminal loop and tests both drive it."""

    def __init__(self, loaded, settings: ChatSettings):
        self.loaded = loaded
        self.settings = settings
        self.engine = Engine(loaded.model, loaded.tokenizer, compute_dtype(loaded.model.get_device()))
        self.messages: list[dict] = []
        self.replies = 0

    def clear(self) -> None:
        self.messages = []

    def ask(self, question: str, on_notice: Callable[[str], None] | None = None) -> Iterator[str]:
        """Render the prompt for `question` now (PromptTooLong raises here, before any
        output), and return an iterator over the answer's pieces. The history grows by
        the question and the answer; if the caller stops iterating early (Ctrl-C), the
        partial answer is kept so the conversation still alternates user/assistant."""
        s = self.settings
        candidate = self.messages + [{"role": "user", "content": question}]
        prompt = render_prompt(
            self.loaded.tokenizer, candidate, s.system_prompt, self.loaded.sequence_len, s.max_tokens
        )
        # Dropped turns are forgotten for good: the next turn would have to drop them again.
        self.messages = candidate[prompt.dropped_messages :]
        if prompt.dropped_messages and on_notice is not None:
            on_notice(
                f"[dropped the {prompt.dropped_messages // 2} oldest turn(s) to fit the model's "
                f"{self.loaded.sequence_len}-token context]"
            )
        seed = None if s.seed is None else s.seed + self.replies
        self.replies += 1
        return self._answer(prompt, seed)

    def _answer(self, prompt: Prompt, seed: int | None) -> Iterator[str]:
        s = self.settings
        answer = []
        try:
            for piece in stream_reply(
                self.engine, self.loaded.tokenizer, prompt.ids, prompt.max_new_tokens, s.temperature, s.top_k, seed
            ):
                answer.append(piece)
                yield piece
        finally:
            text = "".join(answer)
            if text.strip():
                self.messages.append({"role": "assistant", "content": text})
            else:
                # Nothing was said (stopped at once, or an immediate end token): forget the
                # question too, since nanochat's format has no empty turns.
                self.messages.pop()


def build_parser():
    return settings_parser(ChatCommand, "python -m sciassist.serve.chat_cli",
                           "Chat with a nanochat checkpoint (the science tutor by default).",
                           renamed={"--system": "--system_prompt"})


def _write(text: str, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(text)
    stream.flush()


def run_once(session: ChatSession, question: str) -> int:
    try:
        answer = session.ask(question, on_notice=lambda n: print(n, file=sys.stderr))
    except PromptTooLong as err:
        return print_error(err)  # one `error:` line, exit code 2
    for piece in answer:
        _write(piece)
    _write("\n")
    return 0


def run_interactive(session: ChatSession, input_fn=input) -> int:
    if input_fn is input and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:  # not on every platform; plain input() still works
            pass
    info = session.loaded.info()
    print(
        f"Chatting with {session.loaded.choice.describe()} "
        f"(d{info['n_layer']}, context {info['sequence_len']} tokens, {info['device']}).\n"
        "Type /clear to start over, /quit or Ctrl-D to leave; Ctrl-C stops an answer.",
        file=sys.stderr,
    )
    while True:
        try:
            line = input_fn("\nYou: ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        question = line.strip()
        if not question:
            continue
        if question in ("/quit", "/exit"):
            return 0
        if question == "/clear":
            session.clear()
            print("[conversation cleared]", file=sys.stderr)
            continue
        try:
            answer = session.ask(question, on_notice=lambda n: print(n, file=sys.stderr))
        except PromptTooLong as err:
            print(f"[error: {err}]", file=sys.stderr)
            continue
        _write("Tutor: ")
        try:
            for piece in answer:
                _write(piece)
        except KeyboardInterrupt:
            answer.close()  # keeps the partial answer in the history
            _write(" [stopped]")
        _write("\n")


def main(argv=None) -> int:
    parser = build_parser()
    command = settings_from_namespace(ChatCommand, parser.parse_args(argv))  # numbers checked against their ranges
    try:
        loaded = resolve_from_settings(command)
    except (CheckpointError, UserError) as err:
        return print_error(err)
    settings = ChatSettings(system_prompt=command.system_prompt or None, temperature=command.temperature,
                            top_k=command.top_k or None, max_tokens=command.max_tokens, seed=command.seed)
    session = ChatSession(loaded, settings)
    if command.prompt is not None:
        return run_once(session, command.prompt)
    return run_interactive(session)


if __name__ == "__main__":
    sys.exit(main())

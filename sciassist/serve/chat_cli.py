"""Chat with a checkpoint in the terminal: python -m sciassist.serve.chat_cli (make chat).

Multi-turn, answers stream as they are sampled, the science-tutor system prompt by
default. Commands: /clear forgets the conversation, /quit (or Ctrl-D, or Ctrl-C at the
prompt) leaves; Ctrl-C while an answer streams stops that answer. `-p "question"` answers
once, prints only the answer on stdout and exits (for scripts). A reply that runs out of the
card's memory is one line of advice, its turn is forgotten, and the conversation goes on.

Generation itself (prompt rendering with turn dropping, incremental UTF-8 decoding, streaming
a reply) is sciassist.serve.generation, shared with the web server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nanochat.checkpoint import CheckpointError
from nanochat.engine import Engine
from sciassist.checkpoints import CheckpointSettings, resolve_from_settings
from sciassist.common import (
    UserError,
    compute_dtype,
    print_error,
    setting,
    settings_from_namespace,
    settings_parser,
)
from sciassist.serve.generation import (  # noqa: F401 (ChatSettings and the helpers: also reached from here)
    ChatSettings,
    IncrementalDecoder,
    Prompt,
    PromptTooLong,
    ReplyOutOfMemory,
    inference_context,
    render_prompt,
    reply_reserve,
    stream_reply,
)


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
        failed = False
        try:
            for piece in stream_reply(
                self.engine, self.loaded.tokenizer, prompt.ids, prompt.max_new_tokens, s.temperature, s.top_k, seed
            ):
                answer.append(piece)
                yield piece
        except ReplyOutOfMemory:
            failed = True
            raise
        finally:
            text = "".join(answer)
            if text.strip() and not failed:
                self.messages.append({"role": "assistant", "content": text})
            else:
                # Nothing was said (stopped at once, or an immediate end token), or the reply
                # ran out of memory (keeping it would make the next prompt longer still): forget
                # the question too, since nanochat's format has no empty turns.
                self.messages.pop()


def build_parser():
    return settings_parser(ChatCommand, "python -m sciassist.serve.chat_cli",
                           "Chat with a nanochat checkpoint (the science tutor by default).",
                           renamed={"--system": "--system_prompt"})


def _write(text: str, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(text)
    stream.flush()


# What to try after a reply ran out of memory, in the terminal chat's own terms.
OUT_OF_MEMORY_ADVICE = "/clear to start over with a shorter conversation, a smaller --max_tokens, or --device cpu"


def run_once(session: ChatSession, question: str) -> int:
    try:
        answer = session.ask(question, on_notice=lambda n: print(n, file=sys.stderr))
        for piece in answer:
            _write(piece)
    except PromptTooLong as err:
        return print_error(err)  # one `error:` line, exit code 2
    except ReplyOutOfMemory as err:
        _write("\n")
        return print_error(f"{err}; try a smaller --max_tokens, a shorter question, or --device cpu")
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
        except ReplyOutOfMemory as err:  # the turn is forgotten; the conversation goes on
            _write("\n")
            print(f"[error: {err}; try {OUT_OF_MEMORY_ADVICE}]", file=sys.stderr)
            continue
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

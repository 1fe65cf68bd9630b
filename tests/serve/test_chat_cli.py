"""Tests of the terminal chat (sciassist.serve.chat_cli), on the tiny random checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sciassist.checkpoints import resolve_model
from sciassist.serve import chat_cli, generation
from sciassist.serve.chat_cli import (
    ChatSession,
    ChatSettings,
    IncrementalDecoder,
    PromptTooLong,
    build_parser,
    inference_context,
    render_prompt,
    reply_reserve,
    run_interactive,
    stream_reply,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
TUTOR = (
    "You are a helpful science tutor for elementary through high school students. "
    "Explain concepts clearly with examples."
)


@pytest.fixture(scope="module")
def loaded(tiny_base_dir):
    return resolve_model(source="base", base_dir=tiny_base_dir, finetuned_dir=None, device="cpu")


@pytest.fixture(scope="module")
def tokenizer(loaded):
    return loaded.tokenizer


class ScriptedEngine:
    """Stands in for Engine: yields a fixed token sequence (one column per step)."""

    def __init__(self, tokens, model=None):
        self.tokens, self.model = tokens, model
        self.calls = []

    def generate(self, prompt, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        self.calls.append(
            dict(prompt=list(prompt), max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed)
        )
        for token in self.tokens[:max_tokens]:
            yield [token] * num_samples, [1] * num_samples


# --- prompt rendering ---------------------------------------------------------------------


def test_system_prompt_is_merged_into_the_first_user_message(tokenizer):
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    prompt = render_prompt(tokenizer, messages, TUTOR, sequence_len=256, max_tokens=16)
    merged = tokenizer.render_for_completion(
        {"messages": [{"role": "user", "content": TUTOR + "\n\nWhy is the sky blue?"}]}
    )
    assert prompt.ids == merged
    assert prompt.dropped_messages == 0
    assert prompt.max_new_tokens == 16
    assert prompt.ids[-1] == tokenizer.encode_special("<|assistant_start|>")
    assert render_prompt(tokenizer, messages, None, 256, 16).ids == tokenizer.render_for_completion(
        {"messages": messages}
    )


def test_oldest_turns_are_dropped_to_fit_and_the_system_prompt_stays(tokenizer):
    turn = "plants need sunlight to make food " * 6
    messages = []
    for i in range(6):
        messages += [{"role": "user", "content": f"{i} {turn}"}, {"role": "assistant", "content": turn}]
    messages.append({"role": "user", "content": "last question"})
    prompt = render_prompt(tokenizer, messages, TUTOR, sequence_len=256, max_tokens=512)
    assert prompt.dropped_messages > 0 and prompt.dropped_messages % 2 == 0
    assert len(prompt.ids) <= 256 - reply_reserve(256, 512)
    kept = messages[prompt.dropped_messages :]
    kept = [dict(kept[0], content=TUTOR + "\n\n" + kept[0]["content"])] + kept[1:]
    assert prompt.ids == tokenizer.render_for_completion({"messages": kept})
    # The answer may use what is left of the context, never more than asked.
    assert prompt.max_new_tokens == min(512, 256 - len(prompt.ids))


def test_a_message_too_long_for_the_context_raises(tokenizer):
    with pytest.raises(PromptTooLong, match="shorten it") as info:
        render_prompt(tokenizer, [{"role": "user", "content": "sunlight " * 300}], TUTOR, 256, 32)
    assert info.value.limit == 256 - 32 and info.value.num_tokens > info.value.limit


def test_render_prompt_needs_a_final_user_message(tokenizer):
    with pytest.raises(ValueError, match="end with a user message"):
        render_prompt(
            tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], None, 256, 8
        )
    with pytest.raises(ValueError):
        render_prompt(tokenizer, [], None, 256, 8)


def test_reply_reserve():
    assert reply_reserve(2048, 512) == 512
    assert reply_reserve(2048, 4096) == 512  # never more than a quarter of the context
    assert reply_reserve(256, 10) == 10
    assert reply_reserve(256, 0) == 1


# --- streaming text -----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["caf\u00e9 \u00e0 la cr\u00e8me", "sun \U0001f31e and \u6c34", "plain ascii"])
def test_incremental_decoder_emits_only_complete_utf8(tokenizer, text):
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)
    if any(ord(c) > 127 for c in text):
        # The tiny byte-level vocabulary splits non-ASCII characters: something was held back.
        assert "" in pieces[:-1]


def test_incremental_decoder_flushes_an_incomplete_tail(tokenizer):
    ids = tokenizer.encode("\U0001f31e")
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == tokenizer.decode(ids[:-1])  # what the ids say, replacement and all
    assert decoder.flush() == ""


def test_stream_reply_stops_at_assistant_end(tokenizer):
    a, b = tokenizer.encode("Hi"), tokenizer.encode(" there")
    end = tokenizer.encode_special("<|assistant_end|>")
    engine = ScriptedEngine(a + b + [end] + a)
    pieces = list(stream_reply(engine, tokenizer, [1, 2, 3], max_tokens=50, temperature=0.0, top_k=5, seed=3))
    assert "".join(pieces) == "Hi there"
    assert engine.calls[0] == dict(prompt=[1, 2, 3], max_tokens=50, temperature=0.0, top_k=5, seed=3)


@pytest.mark.parametrize("name", ["<|user_start|>", "<|assistant_start|>", "<|user_end|>"])
def test_stream_reply_stops_where_a_new_turn_would_start(tokenizer, name):
    a = tokenizer.encode("a")[0]
    engine = ScriptedEngine([a, tokenizer.encode_special(name), a])
    assert "".join(stream_reply(engine, tokenizer, [1], 10)) == "a"


def test_stream_reply_leaves_tool_markers_out_of_the_text(tokenizer):
    ids = (
        [tokenizer.encode_special("<|python_start|>")]
        + tokenizer.encode("1+1")
        + [tokenizer.encode_special("<|python_end|>")]
    )
    assert "".join(stream_reply(ScriptedEngine(ids), tokenizer, [1], 10)) == "1+1"


def test_stream_reply_stops_at_bos_and_on_request(tokenizer):
    a = tokenizer.encode("a")[0]
    bos = tokenizer.get_bos_token_id()
    assert "".join(stream_reply(ScriptedEngine([a, a, bos, a]), tokenizer, [1], 10)) == "aa"
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) >= 3

    assert "".join(stream_reply(ScriptedEngine([a] * 10), tokenizer, [1], 10, should_stop=should_stop)) == "aaa"


def test_stream_reply_defaults_to_a_random_seed_and_no_top_k_for_zero(tokenizer):
    engine = ScriptedEngine([])
    list(stream_reply(engine, tokenizer, [1], 4, top_k=0))
    list(stream_reply(engine, tokenizer, [1], 4))
    assert engine.calls[0]["top_k"] is None and engine.calls[1]["top_k"] == 50
    assert all(isinstance(c["seed"], int) and 0 <= c["seed"] < 2**31 for c in engine.calls)


def test_inference_context_disables_grad(loaded):
    with inference_context(loaded.model):
        assert torch.is_inference_mode_enabled()
    assert not torch.is_inference_mode_enabled()


# --- the session and the terminal loop ----------------------------------------------------


def session_with(loaded, tokens, **settings):
    session = ChatSession(loaded, ChatSettings(**settings))
    session.engine = ScriptedEngine(tokens)
    return session


def test_session_keeps_a_multi_turn_history(loaded, tokenizer):
    end = tokenizer.encode_special("<|assistant_end|>")
    session = session_with(loaded, tokenizer.encode("Sunlight.") + [end], seed=10)
    assert "".join(session.ask("Why?")) == "Sunlight."
    assert "".join(session.ask("And then?")) == "Sunlight."
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    second_prompt = session.engine.calls[1]["prompt"]
    assert second_prompt == render_prompt(tokenizer, session.messages[:3], TUTOR, loaded.sequence_len, 512).ids
    assert [c["seed"] for c in session.engine.calls] == [10, 11]  # reproducible, yet not one answer twice
    session.clear()
    assert session.messages == []


def test_session_keeps_a_stopped_partial_answer(loaded, tokenizer):
    session = session_with(loaded, tokenizer.encode("abc def ghi"))
    answer = session.ask("Q")
    first = next(answer)
    answer.close()  # what Ctrl-C does
    assert session.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": first}]


def test_session_forgets_a_question_with_an_empty_answer(loaded, tokenizer):
    session = session_with(loaded, [tokenizer.encode_special("<|assistant_end|>")])
    assert "".join(session.ask("Q")) == ""
    assert session.messages == []


def test_session_drops_old_turns_with_a_notice(loaded, tokenizer):
    session = session_with(loaded, tokenizer.encode("ok") + [tokenizer.encode_special("<|assistant_end|>")])
    notices = []
    for _ in range(6):
        "".join(session.ask("plants need sunlight to make food " * 5, on_notice=notices.append))
    assert notices and "oldest turn" in notices[0] and "256-token context" in notices[0]
    assert len(session.messages) < 12


def test_session_refuses_a_question_too_long_without_changing_history(loaded):
    session = session_with(loaded, [])
    with pytest.raises(PromptTooLong):
        session.ask("sunlight " * 400)
    assert session.messages == []


def test_interactive_loop_commands(loaded, tokenizer, capsys):
    end = tokenizer.encode_special("<|assistant_end|>")
    session = session_with(loaded, tokenizer.encode("Yes") + [end])
    lines = iter(["Is water wet?", "", "/clear", "Again?", "sunlight " * 400, "/quit", "never read"])
    assert run_interactive(session, input_fn=lambda prompt: next(lines)) == 0
    out, err = capsys.readouterr()
    assert out.count("Tutor: Yes\n") == 2
    assert "[conversation cleared]" in err and "shorten it" in err
    assert session.messages == [{"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes"}]


@pytest.mark.parametrize("exc", [EOFError, KeyboardInterrupt])
def test_interactive_loop_ends_on_ctrl_d_and_ctrl_c(loaded, exc):
    def raise_it(prompt):
        raise exc

    assert run_interactive(session_with(loaded, []), input_fn=raise_it) == 0


def test_parser_defaults():
    args = build_parser().parse_args([])
    assert (args.temperature, args.top_k, args.max_tokens, args.seed) == (0.6, 50, 512, None)
    assert args.system_prompt == TUTOR and generation.TUTOR_SYSTEM_PROMPT == TUTOR
    assert args.finetuned_dir == "finetuned_model_checkpoint" and args.checkpoint is None


@pytest.mark.parametrize(
    "argv, message",
    [(["--temperature", "3"], "temperature"), (["--top_k", "-1"], "top_k"), (["--max_tokens", "0"], "max_tokens")],
)
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        chat_cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_main_one_shot_prints_only_the_answer(tiny_base_dir, loaded, capsys):
    argv = [
        "--base_dir",
        str(tiny_base_dir),
        "--finetuned_dir",
        str(tiny_base_dir / "none"),
        "--temperature",
        "0",
        "--max_tokens",
        "12",
        "-p",
        "Why is the sky blue?",
    ]
    assert chat_cli.main(argv) == 0
    out, err = capsys.readouterr()
    from nanochat.engine import Engine

    prompt = render_prompt(loaded.tokenizer, [{"role": "user", "content": "Why is the sky blue?"}], TUTOR, 256, 12)
    expected = "".join(stream_reply(Engine(loaded.model, loaded.tokenizer), loaded.tokenizer, prompt.ids, 12, 0.0, 50))
    assert out == expected + "\n"
    assert "Chatting with" not in out


def test_main_reports_a_missing_checkpoint(tmp_path, capsys):
    assert chat_cli.main(["--base_dir", str(tmp_path), "--finetuned_dir", str(tmp_path / "ft"), "-p", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint found") and str(tmp_path) in err


@pytest.mark.slow
def test_cli_one_shot_in_a_subprocess(tiny_base_dir, loaded):
    checkpoint = tiny_base_dir / "base_checkpoints" / "d2"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    question = "What is 12 + 30?"
    cmd = [
        sys.executable,
        "-m",
        "sciassist.serve.chat_cli",
        "--checkpoint",
        str(checkpoint),
        "--system_prompt",
        "",
        "--temperature",
        "0",
        "--max_tokens",
        "8",
        "-p",
        question,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    # Greedy, no system prompt: exactly what the model says to the bare question.
    from nanochat.engine import Engine

    prompt = render_prompt(loaded.tokenizer, [{"role": "user", "content": question}], None, 256, 8)
    expected = "".join(stream_reply(Engine(loaded.model, loaded.tokenizer), loaded.tokenizer, prompt.ids, 8, 0.0, 50))
    assert expected.strip() and result.stdout == expected + "\n"


def test_a_tiny_temperature_answers_greedily(tiny_base_dir, capsys):
    def answer(temperature):
        argv = ["--base_dir", str(tiny_base_dir), "--finetuned_dir", str(tiny_base_dir / "none"),
                "--temperature", temperature, "--max_tokens", "10", "-p", "Why is the sky blue?"]
        assert chat_cli.main(argv) == 0
        return capsys.readouterr()

    greedy, tiny = answer("0"), answer("1e-45")
    assert tiny.out == greedy.out and "Traceback" not in tiny.err

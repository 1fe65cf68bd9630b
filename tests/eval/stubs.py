"""A tokenizer and a model whose outputs are known by construction, and question records,
shared by the evaluation tests."""

import json
import shutil

import torch
from torch import nn

from sciassist.data.answers import LETTERS


class StubTokenizer:
    """Greedy longest-match over a fixed token list. " L" is one token for the merged
    letters and two (" ", "L") for the others, like a small BPE vocabulary that merged
    " A" but never " B"."""

    SPECIALS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]

    def __init__(self, merged_letters=("A",)):
        pieces = [f" {letter}" for letter in merged_letters]
        pieces += ["The correct answer is", " ", "A", "B", "C", "D", "E", "?", "Q", "\n", "."]
        self.tokens = pieces + self.SPECIALS
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def get_vocab_size(self):
        return len(self.tokens)

    def get_bos_token_id(self):
        return self.ids["<|bos|>"]

    def encode_special(self, name):
        return self.ids[name]

    def encode(self, text):
        out, i = [], 0
        pieces = sorted((t for t in self.tokens if t not in self.SPECIALS), key=len, reverse=True)
        while i < len(text):
            piece = next((p for p in pieces if text.startswith(p, i)), None)
            if piece is None:
                piece = "?"  # unknown characters all map to "?"
                i += 1
            else:
                i += len(piece)
            out.append(self.ids[piece])
        return out

    def decode(self, ids):
        return "".join(self.tokens[i] for i in ids)

    def render_for_completion(self, messages):
        messages = messages["messages"] if isinstance(messages, dict) else messages
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        user = [m for m in messages if m["role"] == "user"][-1]["content"]
        return [self.ids["<|bos|>"], self.ids["<|user_start|>"]] + self.encode(user) + \
               [self.ids["<|user_end|>"], self.ids["<|assistant_start|>"]]


class BigramStub(nn.Module):
    """logits[b, t] = table[idx[b, t]]: the next-token logits depend only on the current
    token, so every expected probability can be computed by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = type("Config", (), {"vocab_size": table.size(0), "sequence_len": 64})()
        self.calls = 0

    def get_device(self):
        return self.table.device

    def forward(self, idx):
        self.calls += 1
        return self.table[idx]


def make_stub(logits_after_prefix, logits_after_space=None, merged_letters=("A",)):
    tok = StubTokenizer(merged_letters)
    table = torch.zeros(tok.get_vocab_size(), tok.get_vocab_size())
    for token, value in logits_after_prefix.items():
        table[tok.ids["The correct answer is"], tok.ids[token]] = value
    for token, value in (logits_after_space or {}).items():
        table[tok.ids[" "], tok.ids[token]] = value
    return tok, BigramStub(table)


def question(num_choices=3):
    return [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "The correct answer is A."}]


def choice_record(choices, answer=0):
    return {"messages": question(), "meta": {"choices": list(choices), "answer": answer}}


def record(pid, answer, k=3, subject=None, grade=None, has_hint=None, has_image=None, topic=None):
    return {"messages": [{"role": "user", "content": "Q?\n\n" + "\n".join(f"{LETTERS[i]}. c{i}" for i in range(k))},
                         {"role": "assistant", "content": f"The correct answer is {LETTERS[answer]}. c{answer}"}],
            "meta": {"pid": pid, "choices": [f"c{i}" for i in range(k)], "answer": answer,
                     "answer_letter": LETTERS[answer], "subject": subject, "grade": grade, "topic": topic,
                     "has_hint": has_hint, "has_image": has_image}}


def finetuned_dir_from(base_dir, tmp_path):
    """A fine-tune output dir: model + meta + tokenizer/ + metrics.jsonl."""
    run = tmp_path / "run"
    run.mkdir()
    source = base_dir / "base_checkpoints" / "d2"
    shutil.copy(source / "model_000000.pt", run / "model_000010.pt")
    meta = json.loads((source / "meta_000000.json").read_text())
    meta.update(step=10, val_loss=2.5, source_model=str(source / "model_000000.pt"))  # as training writes it
    (run / "meta_000010.json").write_text(json.dumps(meta))
    shutil.copytree(base_dir / "tokenizer", run / "tokenizer")
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(0, 11, 2):
            f.write(json.dumps({"step": step, "train_loss": 4.0 - 0.1 * step}) + "\n")
        f.write(json.dumps({"step": 10, "val_loss": 2.5}) + "\n")
    return run


def rl_dir_from(finetuned_run, tmp_path, model, step=5):
    """An RL run's output dir (python -m sciassist.train.rl): `model`'s weights + a meta naming
    the fine-tune's checkpoint it started from, as the RL stage writes it, + tokenizer/."""
    from tests.conftest import write_published_checkpoint
    run = tmp_path / "rl"
    source = finetuned_run / "model_000010.pt"
    write_published_checkpoint(run, model, step, extra_meta={
        "source_model": str(source), "source_step": 10, "answer_format": "letter_first",
        "rl": {"reward_mean": 0.5, "accuracy": 0.5, "invalid_rate": 0.25, "val_accuracy": None}})
    shutil.copytree(finetuned_run / "tokenizer", run / "tokenizer")
    return run

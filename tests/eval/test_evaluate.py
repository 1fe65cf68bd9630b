import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sciassist.eval import run as ev

REPO_ROOT = Path(__file__).resolve().parents[2]


# -----------------------------------------------------------------------------
# a tokenizer and a model whose outputs are known by construction


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


# -----------------------------------------------------------------------------
# letter scoring


def test_letter_scoring_picks_argmax_among_allowed_letters_only():
    # no " L" merges: every letter is " " + L, the " " is shared and goes into the prompt,
    # so each letter is a single scored token. After " ", E is by far the most likely, but
    # the question only has A-C.
    tok, model = make_stub({}, {"A": 1.0, "B": 3.0, "C": 2.0, "D": 5.0, "E": 9.0}, merged_letters=())
    shared, continuations = ev.letter_continuations(tok, ev.ANSWER_PREFIX, 3)
    assert shared == [tok.ids["The correct answer is"], tok.ids[" "]]
    assert continuations == [[tok.ids["A"]], [tok.ids["B"]], [tok.ids["C"]]]
    probs = ev.letter_probabilities(model, tok, [question()], [3])[0]
    expected = ev.softmax([1.0, 3.0, 2.0])  # softmax over the allowed letters' logits
    assert probs == pytest.approx(expected, abs=1e-6)
    assert ev.argmax(probs) == 1
    assert model.calls == 1  # all single-token letters: one forward pass for the batch


def test_multi_token_letter_continuation_sums_log_probs():
    # " A" is one token; " B" and " C" are " " followed by the letter
    tok, model = make_stub({" A": 1.0, " ": 2.0, "E": 4.0}, {"B": 6.0, "C": 0.5, "D": 3.0})
    shared, continuations = ev.letter_continuations(tok, ev.ANSWER_PREFIX, 3)
    assert shared == [tok.ids["The correct answer is"]]
    assert continuations == [[tok.ids[" A"]], [tok.ids[" "], tok.ids["B"]], [tok.ids[" "], tok.ids["C"]]]
    first = torch.log_softmax(model.table[tok.ids["The correct answer is"]], 0)
    second = torch.log_softmax(model.table[tok.ids[" "]], 0)
    scores = [first[tok.ids[" A"]].item(),
              first[tok.ids[" "]].item() + second[tok.ids["B"]].item(),
              first[tok.ids[" "]].item() + second[tok.ids["C"]].item()]
    probs = ev.letter_probabilities(model, tok, [question(), question()], [3, 2])
    assert probs[0] == pytest.approx(ev.softmax(scores), abs=1e-6)
    assert probs[1] == pytest.approx(ev.softmax(scores[:2]), abs=1e-6)
    assert sum(probs[0]) == pytest.approx(1.0)
    assert ev.argmax(probs[0]) == 1  # P(" ")P(B | " ") beats P(" A") although " A" is one token


def test_letter_scoring_is_independent_of_batching(tiny_tokenizer):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                          n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
        for block in model.transformer.h:
            block.mlp.c_proj.weight.normal_(0, 0.2)
    model.eval()
    prompts = [[{"role": "user", "content": "Which is a mammal?" + " x" * n}] for n in (0, 7, 3, 12)]
    counts = [2, 3, 4, 5]
    one = ev.letter_probabilities(model, tiny_tokenizer, prompts, counts, batch_size=1)
    many = ev.letter_probabilities(model, tiny_tokenizer, prompts, counts, batch_size=4)
    for a, b, k in zip(one, many, counts, strict=True):
        assert len(a) == k
        assert a == pytest.approx(b, abs=1e-5)  # right padding must not change anything


def test_generate_answers_match_unbatched_engine(tiny_tokenizer):
    from nanochat.engine import Engine
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(1)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                          n_kv_head=2, n_embd=32))
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    model.eval()
    texts = ("Hello", "Which of these states is farthest north?", "Hi there")
    prompts = [[{"role": "user", "content": text}] for text in texts]
    texts = ev.generate_answers(model, tiny_tokenizer, prompts, max_tokens=6, batch_size=2)
    engine = Engine(model, tiny_tokenizer)
    for prompt, text in zip(prompts, texts, strict=True):
        ids = tiny_tokenizer.render_for_completion(prompt)
        sequences, _ = engine.generate_batch(ids, num_samples=1, max_tokens=6, temperature=0.0)
        assert text == tiny_tokenizer.decode(sequences[0][len(ids):])


# -----------------------------------------------------------------------------
# the strict parser


@pytest.mark.parametrize("text, num_choices, expected", [
    ("The correct answer is B.", 3, 1),
    ("The correct answer is B. a magnet\n\nExplanation: ...", 3, 1),
    ("The correct answer is A", 2, 0),                      # cut off by max tokens: still stated
    ("the correct answer is C: rock", 4, 2),                # phrase case does not matter
    ("I think the correct answer is (D) today", 4, 3),
    ("The correct answer is **E**.", 5, 4),
    ("The correct answer is: B.", 3, 1),
    ("The correct answer is a mammal.", 3, None),           # the article, not option a
    ("The correct answer is a", 3, None),                   # lower case is never a letter
    ("The correct answer is A dog.", 3, None),              # a capital article
    ("The correct answer is orange juice. Explanation: it has vitamin C.", 3, None),
    ("Oranges have vitamin C. The correct answer is B.", 3, 1),
    ("The correct answer is not A. The correct answer is B.", 3, None),  # first occurrence only
    ("the answer is B", 3, None),                           # not the trained phrase
    ("B.", 3, None),
    ("The correct answer is D.", 3, None),                  # beyond the question's options
    ("", 3, None),
    (None, 3, None),
])
def test_parse_answer_strict(text, num_choices, expected):
    assert ev.parse_answer(text, num_choices) == expected


@pytest.mark.parametrize("text, expected", [("B", 1), (" C.", 2), ("A) wood", 0), ("A dog", None), ("a", None),
                                            ("The answer is B", None), ("E", None)])
def test_parse_answer_nanochat_style(text, expected):
    assert ev.parse_answer(text, 4, answer_prefix="") == expected


# -----------------------------------------------------------------------------
# statistics, table, results format


def test_wilson_interval_matches_hand_computation():
    lo, hi = ev.wilson_interval(8, 10)
    # p=0.8, z^2=3.8415: center=(0.8+0.19207)/1.38415, half=1.95996*sqrt(0.016+0.0096037)/1.38415
    assert (lo, hi) == (pytest.approx(0.49016, abs=1e-4), pytest.approx(0.94332, abs=1e-4))
    lo, hi = ev.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    assert ev.wilson_interval(0, 0) is None


def test_chance_accuracy_is_mean_of_one_over_k():
    assert ev.chance_accuracy([2, 3, 4]) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert ev.chance_accuracy([2, 2]) == 0.5
    assert ev.chance_accuracy([]) is None


def record(pid, answer, k=3, subject=None, grade=None, has_hint=None, has_image=None, topic=None):
    return {"messages": [{"role": "user", "content": "Q?\n\n" + "\n".join(f"{ev.LETTERS[i]}. c{i}" for i in range(k))},
                         {"role": "assistant", "content": f"The correct answer is {ev.LETTERS[answer]}. c{answer}"}],
            "meta": {"pid": pid, "choices": [f"c{i}" for i in range(k)], "answer": answer,
                     "answer_letter": ev.LETTERS[answer], "subject": subject, "grade": grade, "topic": topic,
                     "has_hint": has_hint, "has_image": has_image}}


def test_question_columns_follow_the_official_definitions():
    meta = record("1", 0, subject="natural science", grade="grade7", has_hint=True, has_image=True)["meta"]
    assert ev.question_columns(meta) == ["NAT", "TXT", "IMG", "G7-12", "Avg"]
    meta = record("2", 0, subject="language science", grade="grade2", has_hint=False, has_image=False)["meta"]
    assert ev.question_columns(meta) == ["LAN", "NO", "G1-6", "Avg"]
    # unknown image: TXT can be known, NO cannot
    assert ev.question_columns(record("3", 0, has_hint=False)["meta"]) == ["Avg"]


def test_table_cell_counts_and_na():
    records = [record("1", 0, k=2, subject="natural science", has_hint=True, has_image=False),
               record("2", 1, k=4, subject="natural science", has_hint=False, has_image=False),
               record("3", 2, k=3)]  # no metadata at all
    table = ev.build_table(records, {"model": [0, 0, 2]})
    model = table["rows"][0]["cells"]
    assert table["counts"]["NAT"] == 2 and model["NAT"]["correct"] == 1 and model["NAT"]["accuracy"] == 50.0
    assert model["SOC"] == {"correct": 0, "count": 0, "accuracy": None, "ci95": None}
    assert model["Avg"]["count"] == 3 and model["Avg"]["accuracy"] == pytest.approx(200 / 3)
    assert model["Avg"]["ci95"] == pytest.approx([100 * x for x in ev.wilson_interval(2, 3)])
    chance = table["rows"][1]
    assert chance["name"] == "chance"
    assert chance["cells"]["NAT"]["accuracy"] == pytest.approx(100 * (1 / 2 + 1 / 4) / 2)
    assert chance["cells"]["G1-6"]["accuracy"] is None
    assert table["known"]["subject"] == 2 and table["known"]["total"] == 3
    text = ev.format_table_text(table)
    assert "n/a" in text.splitlines()[2]
    markdown = ev.format_table_markdown(table)
    assert "| questions | 2 | n/a |" in markdown


def test_none_prediction_counts_wrong_and_majority_respects_choices():
    records = [record("1", 0, k=2), record("2", 2, k=3), record("3", 2, k=4)]
    assert ev.majority_predictions(records, {"A": 1, "C": 9, "B": 3}) == [1, 2, 2]
    table = ev.build_table(records, {"m": [None, 2, 1]}, chance=False)
    assert table["rows"][0]["cells"]["Avg"]["correct"] == 1
    topics = ev.topic_breakdown(records, {"m": [None, 2, 1]})
    assert topics == [{"topic": "(unknown)", "count": 3, "accuracy": {"m": pytest.approx(100 / 3)}}]


def test_generation_summary_valid_rate_and_agreement():
    records = [record("1", 0), record("2", 1), record("3", 2), record("4", 0)]
    run = {"prediction": [0, 1, 1, 2], "generated_prediction": [0, None, 1, 0]}
    summary = ev.generation_summary(records, run)
    assert (summary["valid"], summary["invalid"], summary["count"]) == (3, 1, 4)
    assert summary["accuracy"] == 0.5          # questions 1 and 4; the invalid one counts wrong
    assert summary["agreement"] == 0.5         # questions 1 and 3 agree with letter scoring
    assert summary["agreement_among_valid"] == pytest.approx(2 / 3)
    assert ev.generation_summary(records, {"prediction": [0] * 4, "generated_prediction": None}) is None


def test_results_format_round_trip(tmp_path):
    records = [record("p1", 0), record("p2", 1), record("p3", 2), record("p4", 1)]
    data = ev.results_data(records, [0, 2, 2, None], outputs=["a", "b", "c", "d"])
    assert data["results"] == {"p1": 0, "p2": 2, "p3": 2, "p4": -1}
    assert (data["correct"], data["count"]) == (2, 4)
    assert data["acc"] == 100 * data["correct"] / data["count"] == 50.0
    path = ev.write_results_file(tmp_path / "r.json", data)
    assert ev.read_results_file(path) == data
    data["acc"] = 60.0
    ev.write_results_file(path, data)
    with pytest.raises(ev.EvaluationError, match="acc"):
        ev.read_results_file(path)


# -----------------------------------------------------------------------------
# prompts and data


def test_nanochat_prompt_format():
    r = record("1", 1, k=2)
    r["messages"][0]["content"] = "Context: It is cold.\n\nWhich is colder?\n\nA. ice\nB. tea"
    r["meta"]["choices"] = ["ice", "tea"]
    messages = ev.nanochat_prompt(r)
    assert messages == [{"role": "user", "content":
                         "Multiple Choice question: Context: It is cold.\n\nWhich is colder?\n- ice=A\n- tea=B\n\n"
                         "Respond only with the letter of the correct answer."}]
    prompts, prefix = ev.prompts_for([r], "nanochat")
    assert prefix == "" and prompts == [messages]
    with pytest.raises(ev.EvaluationError):
        ev.prompts_for([r], "other")
    r["messages"][0]["content"] = "Pick one: ice or tea?"  # an unknown layout is kept whole
    assert ev.question_stem(r) == "Pick one: ice or tea?"


def test_load_questions_from_jsonl(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(record(str(i), i % 3)) + "\n" for i in range(5)))
    records, info = ev.load_questions(data_path=path, limit=3)
    assert [r["meta"]["pid"] for r in records] == ["0", "1", "2"]
    assert info["count"] == 3 and info["available"] == 5
    no_meta = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(no_meta) + "\n")
    with pytest.raises(ev.EvaluationError, match="record 1.*meta"):
        ev.load_questions(data_path=path)
    with pytest.raises(ev.EvaluationError, match="no such file"):
        ev.load_questions(data_path=tmp_path / "missing.jsonl")


def test_answer_prefix_check(tiny_tokenizer):
    records = [record("1", 1), record("2", 0)]
    records[1]["messages"][-1]["content"] = "Answer: A"
    assert ev.answer_prefix_check(tiny_tokenizer, records) == (1, 2)


def test_resolve_model_spec(tiny_base_dir):
    from nanochat.checkpoint import CheckpointError
    directory, step = ev.resolve_model_spec("base:d2", tiny_base_dir)
    assert directory == tiny_base_dir / "base_checkpoints" / "d2" and step == 0
    assert ev.resolve_model_spec(str(directory), None) == (directory, None)
    assert ev.resolve_model_spec(str(directory / "model_000000.pt"), None) == (directory, 0)
    with pytest.raises(CheckpointError, match="neither"):
        ev.resolve_model_spec("nowhere/d2", tiny_base_dir)


# -----------------------------------------------------------------------------
# end to end


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


EXPECTED_FILES = ["predictions_base.json", "predictions_finetuned.json", "predictions_base_generated.json",
                  "predictions_finetuned_generated.json", "per_question_base.jsonl", "per_question_finetuned.jsonl",
                  "accuracy_by_category.png", "loss_curve.png", "samples.md", "report.md", "results.json",
                  "table.json", "table.md"]


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_checkpoints(tiny_base_dir, tmp_path):
    run = finetuned_dir_from(tiny_base_dir, tmp_path)
    out = tmp_path / "out"
    log = tmp_path / "train.log"
    log.write_text("Step 25/748 | train loss: 1.234 | val loss: 1.100\nStep 50/748 | train loss: 1.0\n")
    cmd = [sys.executable, "sciassist_evaluate.py", "--base", str(tiny_base_dir / "base_checkpoints" / "d2"),
           "--finetuned", str(run), "--scienceqa", "sample", "--out_dir", str(out), "--device", "cpu",
           "--limit", "6", "--max_new_tokens", "6", "--num_samples", "2", "--sample_max_tokens", "8",
           "--log_file", str(log)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in EXPECTED_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "Avg" in result.stdout and "chance" in result.stdout

    summary = json.loads((out / "results.json").read_text())
    n = summary["data"]["count"]
    assert n == 6 and summary["data"]["available"] == 12  # a seeded subset of the sample's val split
    base = ev.read_results_file(out / "predictions_base.json")
    assert base["count"] == n
    # the same checkpoint weights: identical letter-scored answers on the same questions
    assert ev.read_results_file(out / "predictions_finetuned.json")["results"] == base["results"]
    lines = [json.loads(line) for line in (out / "per_question_base.jsonl").read_text().splitlines()]
    assert len(lines) == n and set(lines[0]) >= {"pid", "gold", "prediction", "probabilities", "generated", "valid"}
    assert all(abs(sum(line["probabilities"]) - 1) < 1e-4 for line in lines)
    assert summary["models"]["finetuned"]["step"] == 10
    avg = next(r for r in summary["table"]["rows"] if r["name"] == "base")["cells"]["Avg"]
    assert avg["correct"] == base["correct"] and avg["count"] == n
    report = (out / "report.md").read_text()
    assert "| questions |" in report and "majority" in report and str(log) in report
    assert "## s" in (out / "samples.md").read_text()


def test_cli_reports_bad_input(tmp_path, capsys):
    code = ev.main(["--base", "nowhere:d2", "--scienceqa", "sample", "--base_dir", str(tmp_path),
                    "--out_dir", str(tmp_path / "o")])
    assert code == 2
    assert "error:" in capsys.readouterr().err
    assert ev.main(["--out_dir", str(tmp_path / "o")]) == 2
    assert "nothing to do" in capsys.readouterr().err
    log = tmp_path / "notes.txt"
    log.write_text("no losses here\n")
    assert ev.main(["--log_file", str(log), "--out_dir", str(tmp_path / "o")]) == 2
    assert "no loss values found" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_after_training_as_training_calls_it(tiny_base_dir, tmp_path):
    # in memory, the base found from the run's meta, the data from the prepared data dir
    from nanochat.checkpoint import load_model
    from sciassist.data.scienceqa import prepare
    run = finetuned_dir_from(tiny_base_dir, tmp_path)
    data_dir = tmp_path / "data"
    prepare("sample", data_dir, sizes={"train": "all", "val": "all", "test": "all"})
    model, tokenizer, _ = load_model(run, device="cpu")
    summary = ev.evaluate_after_training(run, device=None, data_path=None, data_dir=str(data_dir), limit=5,
                                         model=model, tokenizer=tokenizer, prompt_style="nanochat",
                                         max_new_tokens=3, num_samples=1, sample_max_tokens=3)
    out = run / "eval"
    for name in EXPECTED_FILES:
        assert (out / name).is_file(), name
    assert summary["data"]["count"] == 5 and summary["data"]["source"] == str(data_dir / "scienceqa_val.jsonl")
    assert summary["settings"]["prompt_style"] == "nanochat"
    assert summary["models"]["finetuned"]["step"] == 10
    assert summary["models"]["base"]["checkpoint_dir"] == str(tiny_base_dir / "base_checkpoints" / "d2")
    assert summary["table"]["majority_source"] == str(data_dir / "scienceqa_train.jsonl")
    base = ev.read_results_file(out / "predictions_base.json")
    assert ev.read_results_file(out / "predictions_finetuned.json")["results"] == base["results"]


# -----------------------------------------------------------------------------
# choice scoring (--scoring choice)


def choice_record(choices, answer=0):
    return {"messages": question(), "meta": {"choices": list(choices), "answer": answer}}


def test_choice_scoring_sums_the_whole_answer_line():
    # after " ": A is likelier than B (letter scoring says option 0), but option 1's text C
    # is much likelier than option 0's text B, so the whole line " B. C" wins
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0, "C": 4.0}, merged_letters=())
    shared, continuations = ev.choice_continuations(tok, ev.ANSWER_PREFIX, ["B", "C"])
    ids = tok.ids
    assert shared == [ids["The correct answer is"], ids[" "]]
    assert continuations == [[ids["A"], ids["."], ids[" "], ids["B"]], [ids["B"], ids["."], ids[" "], ids["C"]]]
    lp = {t: torch.log_softmax(model.table[ids[t]], 0) for t in ("The correct answer is", " ", "A", "B", ".")}
    expected = [lp[" "][ids["A"]] + lp["A"][ids["."]] + lp["."][ids[" "]] + lp[" "][ids["B"]],
                lp[" "][ids["B"]] + lp["B"][ids["."]] + lp["."][ids[" "]] + lp[" "][ids["C"]]]
    scores = ev.choice_scores(model, tok, [question()], [["B", "C"]])[0]
    assert scores == pytest.approx([e.item() for e in expected], abs=1e-5)
    assert ev.argmax(scores) == 1
    assert ev.argmax(ev.letter_probabilities(model, tok, [question()], [2])[0]) == 0


def test_choice_scoring_in_run_model_and_its_errors():
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0, "C": 4.0}, merged_letters=())
    records = [choice_record(["B", "C"], answer=1), choice_record(["C", "B"], answer=0)]
    run = ev.run_model(model, tok, records, generate=False, scoring="choice")
    assert run["prediction"] == [1, 0]  # the option whose text is C, wherever it stands
    assert all(sum(p) == pytest.approx(1.0) for p in run["probabilities"])
    assert ev.run_model(model, tok, records, generate=False)["prediction"] == [0, 0]  # letter: A both times
    with pytest.raises(ev.EvaluationError, match="scoring must be one of"):
        ev.run_model(model, tok, records, generate=False, scoring="words")
    with pytest.raises(ev.EvaluationError, match="answer prefix"):
        ev.choice_scores(model, tok, [question()], [["B", "C"]], answer_prefix="")
    with pytest.raises(ev.EvaluationError, match="prompt_style sciassist"):
        ev.evaluate(ev.EvalSettings(finetuned="x", scoring="choice", prompt_style="nanochat"))
    assert ev.build_arg_parser().parse_args(["--scoring", "choice"]).scoring == "choice"
    assert ev.EvalSettings().scoring == "auto" and ev.EvalSettings().answer_format == "auto"


# -----------------------------------------------------------------------------
# the text_first answer format ("The correct answer is <option> (L).")


def test_choice_lines_follow_the_training_answer_line():
    assert ev.choice_lines(ev.ANSWER_PREFIX, ["ice", "steam"]) == ["The correct answer is A. ice",
                                                                   "The correct answer is B. steam"]
    assert ev.choice_lines(ev.ANSWER_PREFIX, ["ice", "steam"], "text_first") == [
        "The correct answer is ice (A).", "The correct answer is steam (B)."]


def test_choice_scoring_text_first_scores_text_then_letter():
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0, "C": 4.0}, merged_letters=())
    ids = tok.ids
    shared, continuations = ev.choice_continuations(tok, ev.ANSWER_PREFIX, ["B", "C"], "text_first")
    assert shared == [ids["The correct answer is"], ids[" "]]
    # " B (A)." -> B, " ", "?" for "(", A, "?" for ")", "."
    assert continuations[0] == [ids["B"], ids[" "], ids["?"], ids["A"], ids["?"], ids["."]]
    assert continuations[1] == [ids["C"], ids[" "], ids["?"], ids["B"], ids["?"], ids["."]]
    scores = ev.choice_scores(model, tok, [question()], [["B", "C"]], answer_format="text_first")[0]
    assert ev.argmax(scores) == 1  # C after the prefix's " " outweighs B


@pytest.mark.parametrize("text, expected", [
    ("The correct answer is steam (B).", 1),
    ("The correct answer is steam (B)", 1),                       # cut off before the period
    ("the correct answer is  Steam  (B).\n\nExplanation: ...", 1),  # case and spacing of the text aside
    ("The correct answer is: ice (A).", 0),
    ("The correct answer is a big rock (C). More text", None),    # "(C)" must end the line
    ("The correct answer is a big rock (C).\nMore text", 2),
    ("The correct answer is ice (B).", None),                     # one option's text, another's letter
    ("The correct answer is water (B).", None),                   # not an option
    ("The correct answer is steam", None),                        # no letter (cut off)
    ("The correct answer is B. steam", None),                     # the letter_first layout
    ("The correct answer is steam (D).", None),                   # beyond the options
    ("The correct answer is steam (b).", None),                   # letters are capitals
    (None, None),
])
def test_parse_answer_text_first(text, expected):
    choices = ["ice", "steam", "a big rock"]
    assert ev.parse_answer(text, 3, choices=choices, answer_format="text_first") == expected


def test_question_stem_strips_either_options_layout():
    from sciassist.data.scienceqa import options_block
    for layout in ("letter_first", "letter_after"):
        content = "Which is hot?\n\n" + options_block(["ice", "steam"], layout)
        record = {"messages": [{"role": "user", "content": content}], "meta": {"choices": ["ice", "steam"]}}
        assert ev.question_stem(record) == "Which is hot?"


def test_text_first_breakdown_counts_named_options_and_their_letters():
    records = [{"meta": {"choices": ["ice", "steam"]}}] * 4
    texts = ["The correct answer is steam (B).", "The correct answer is Steam (A).", "The correct answer is fog (A).",
             "no answer"]
    assert ev.text_first_breakdown(texts, records) == {"names_an_option": 2, "letter_matches_text": 1}


def test_parse_answer_text_first_multiline_and_prefix_options():
    letters = ["Love,\nZoe", "love,\nZoe"]
    assert ev.parse_answer("The correct answer is Love,\nZoe (A).", 2, choices=letters, answer_format="text_first") == 0
    # options that differ only in case: the reply names the one whose letter it gives
    assert ev.parse_answer("The correct answer is love,\nZoe (B).", 2, choices=letters, answer_format="text_first") == 1
    assert ev.parse_answer("The correct answer is Love,\nZoe (C).", 2, choices=letters,
                           answer_format="text_first") is None
    stems = ["a tall stem", "a tall stem and leaves"]
    reply = "The correct answer is a tall stem and leaves (B)."
    assert ev.parse_answer(reply, 2, choices=stems, answer_format="text_first") == 1


def test_parse_answer_text_first_needs_choices():
    with pytest.raises(ValueError, match="choices"):
        ev.parse_answer("The correct answer is ice (A).", 2, answer_format="text_first")


def test_detect_answer_format_and_resolve_scoring():
    from sciassist.data.scienceqa import FormatOptions, format_record
    raw = {"pid": "1", "question": "Which is hot?", "choices": ["ice", "steam"], "answer": 1, "hint": ""}
    text = [format_record(raw, FormatOptions(answer_format="text_first"))] * 2
    letter = [format_record(raw, FormatOptions())]
    assert text[0]["messages"][-1]["content"].startswith("The correct answer is steam (B).")
    assert ev.detect_answer_format(text) == "text_first"
    assert ev.detect_answer_format(letter) == "letter_first"
    assert ev.detect_answer_format(text + letter) == "letter_first"  # mixed: the default
    other = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Steam."}],
              "meta": text[0]["meta"]}]
    assert ev.detect_answer_format(other) == "letter_first"
    assert ev.resolve_scoring("auto", "text_first") == "choice"
    assert ev.resolve_scoring("auto", "letter_first") == "letter"
    assert ev.resolve_scoring("auto", "text_first", "nanochat") == "letter"  # nanochat's prompt: a letter first
    assert ev.resolve_scoring("choice", "letter_first") == "choice"
    with pytest.raises(ev.EvaluationError, match="use --scoring choice"):
        ev.resolve_scoring("letter", "text_first")
    with pytest.raises(ev.EvaluationError, match="--answer_format must be one of"):
        ev.resolve_scoring("auto", "words")


def test_answer_prefix_check_for_choice_scoring(tiny_tokenizer):
    from sciassist.data.scienceqa import FormatOptions, format_record
    raw = {"pid": "1", "question": "Which is hot?", "choices": ["ice", "steam"], "answer": 1, "hint": ""}
    record = format_record(raw, FormatOptions(answer_format="text_first"))
    assert ev.answer_prefix_check(tiny_tokenizer, [record], scoring="choice", answer_format="text_first") == (1, 1)
    assert ev.answer_prefix_check(tiny_tokenizer, [record], scoring="choice", answer_format="letter_first") == (0, 1)


@pytest.mark.slow
def test_evaluate_text_first_file_end_to_end(tiny_base_dir, tmp_path):
    from sciassist.data.scienceqa import FormatOptions, prepare
    run = finetuned_dir_from(tiny_base_dir, tmp_path)
    prepare("sample", tmp_path / "data", sizes={"val": "all"}, splits=("val",),
            options=FormatOptions(answer_format="text_first"))
    out = tmp_path / "out"
    summary = ev.evaluate(ev.EvalSettings(finetuned=str(run), data_path=str(tmp_path / "data" / "scienceqa_val.jsonl"),
                                          limit=4, max_new_tokens=4, num_samples=1, sample_max_tokens=4,
                                          out_dir=str(out), device="cpu"))
    assert summary["settings"]["answer_format"] == "text_first" and summary["settings"]["scoring"] == "choice"
    info = summary["models"]["finetuned"]
    assert (info["answer_prefix_matches"], info["answer_prefix_checked"]) == (4, 4)
    report = (out / "report.md").read_text()
    assert "CHOICE scoring" in report and "answer format text_first" in report
    assert "agreement with choice scoring" in report
    generation = summary["generation"]["finetuned"]
    assert 0 <= generation["letter_matches_text"] <= generation["names_an_option"] <= 4
    assert "replies name an option's text" in report
    with pytest.raises(ev.EvaluationError, match="use --scoring choice"):
        ev.evaluate(ev.EvalSettings(finetuned=str(run), data_path=str(tmp_path / "data" / "scienceqa_val.jsonl"),
                                    scoring="letter", out_dir=str(out), device="cpu"))

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from sciassist.data import scienceqa as sqa
from sciassist.data.answers import LETTERS, options_block
from sciassist.data.conversations import read_conversations
from sciassist.data.scienceqa import (
    DEFAULT_SIZES,
    HF_DATASET,
    HF_REVISION,
    SYSTEM_PROMPT,
    FormatOptions,
    ScienceQAError,
    format_record,
    load_scienceqa,
    main,
    parse_size,
    percentiles,
    prepare,
    select_subset,
    skip_reason,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "scienceqa"
ORIGINAL_SYSTEM = (
    "You are a helpful science tutor for elementary through high school students. "
    "Explain concepts clearly with examples."
)


def make_record(**overrides):
    record = {
        "pid": "p1", "split": "train",
        "question": "Which object is the hardest?",
        "choices": ["a wool sock", "a glass marble", "a sponge"],
        "answer": 1,
        "hint": "Think about pressing on each one.",
        "has_image": False, "caption": None,
        "task": "closed choice", "grade": "grade1", "subject": "natural science",
        "topic": "physics", "category": "Materials", "skill": "Compare hardness",
        "lecture": "Hard things keep their shape.",
        "solution": "The marble keeps its shape.",
    }
    record.update(overrides)
    return record


# ----------------------------------------------------------------------------- formatting

def test_system_prompt_is_the_original():
    assert SYSTEM_PROMPT == ORIGINAL_SYSTEM


def test_original_format_byte_for_byte():
    out = format_record(make_record(), FormatOptions.original())
    assert out["messages"] == [
        {"role": "system", "content": ORIGINAL_SYSTEM},
        {"role": "user", "content": "Which object is the hardest?\n\nA. a wool sock\nB. a glass marble\nC. a sponge"},
        {"role": "assistant", "content": "The correct answer is B. a glass marble\n\n"
                                         "Explanation: The marble keeps its shape.\n\n"
                                         "Background: Hard things keep their shape."},
    ]


def test_original_format_skips_empty_and_missing_explanations_like_the_original():
    record = make_record(question="Is this a run-on sentence?\nThe bell rang the class began.",
                         choices=["yes", "no"], answer=0, solution="", lecture=None)
    assert format_record(record, FormatOptions.original())["messages"][1:] == [
        {"role": "user", "content": "Is this a run-on sentence?\nThe bell rang the class began.\n\nA. yes\nB. no"},
        {"role": "assistant", "content": "The correct answer is A. yes"},
    ]
    record = make_record(choices=["1", "2", "3", "4", "5"], answer=4, solution=None, lecture="Count.")
    assert format_record(record, FormatOptions.original())["messages"][1:] == [
        {"role": "user", "content": "Which object is the hardest?\n\nA. 1\nB. 2\nC. 3\nD. 4\nE. 5"},
        {"role": "assistant", "content": "The correct answer is E. 5\n\nBackground: Count."},
    ]


def test_original_format_ignores_hint_and_caption():
    record = make_record(has_image=True, caption="A marble and a sock.", lecture="", solution="")
    assert format_record(record, FormatOptions.original())["messages"][1]["content"] == (
        "Which object is the hardest?\n\nA. a wool sock\nB. a glass marble\nC. a sponge"
    )


def test_default_layout_with_hint_and_caption():
    record = make_record(has_image=True, caption="  A marble beside a sock.  ", hint="Look closely.\n")
    messages = format_record(record)["messages"]
    assert messages[1]["content"] == (
        "Context: Look closely.\nImage: A marble beside a sock.\n\n"
        "Which object is the hardest?\n\nA. a wool sock\nB. a glass marble\nC. a sponge"
    )
    # caption only (no hint), and hint only (no image)
    assert format_record(make_record(has_image=True, caption="Cap.", hint=""))["messages"][1]["content"].startswith(
        "Image: Cap.\n\nWhich object")
    assert format_record(make_record())["messages"][1]["content"].startswith(
        "Context: Think about pressing on each one.\n\nWhich object")
    # keep mode: the image question stays, without its caption
    keep = format_record(record, FormatOptions(image_mode="keep"))["messages"][1]["content"]
    assert keep.startswith("Context: Look closely.\n\nWhich object")


def test_format_options_turn_parts_off():
    options = FormatOptions(system_prompt="", include_hint=False, include_explanation=False, include_background=False)
    out = format_record(make_record(), options)
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]
    assert out["messages"][1]["content"] == "The correct answer is B. a glass marble"
    only_background = FormatOptions(include_explanation=False)
    assert format_record(make_record(), only_background)["messages"][-1]["content"] == (
        "The correct answer is B. a glass marble\n\nBackground: Hard things keep their shape."
    )


def test_text_first_answer_format():
    options = FormatOptions(answer_format="text_first", include_background=False)
    out = format_record(make_record(), options)
    assert out["messages"][-1]["content"].startswith("The correct answer is a glass marble (B).\n\nExplanation: ")
    assert out["meta"]["answer_letter"] == "B"
    with pytest.raises(ScienceQAError, match="answer_format must be one of letter_first, text_first"):
        FormatOptions(answer_format="letter_last")


def test_letter_after_options_layout():
    options = FormatOptions(options_layout="letter_after", include_hint=False, include_explanation=False,
                            include_background=False, system_prompt="")
    out = format_record(make_record(), options)
    user = out["messages"][0]["content"]
    assert user.endswith("\n\n" + options_block(out["meta"]["choices"], "letter_after"))
    assert out["messages"][1]["content"] == "The correct answer is B. a glass marble"
    with pytest.raises(ScienceQAError, match="options_layout must be one of letter_first, letter_after"):
        FormatOptions(options_layout="table")
    assert sqa.options_from_args(sqa.build_parser().parse_args(["--options_layout", "letter_after"])) == \
        FormatOptions(options_layout="letter_after")


def test_format_options_validate_image_mode():
    with pytest.raises(ScienceQAError, match="image_mode must be one of caption, keep, drop"):
        FormatOptions(image_mode="blur")
    assert FormatOptions.original(include_background=False) == FormatOptions(
        include_hint=False, image_mode="keep", include_background=False)


def test_meta_fields():
    meta = format_record(make_record(has_image=True, caption="c"))["meta"]
    assert meta == {
        "pid": "p1", "split": "train", "choices": ["a wool sock", "a glass marble", "a sponge"],
        "answer": 1, "answer_letter": "B", "subject": "natural science", "grade": "grade1",
        "topic": "physics", "category": "Materials", "has_image": True, "has_hint": True,
    }
    unknown = format_record(make_record(hint=None, has_image=None, subject=None))["meta"]
    assert (unknown["has_hint"], unknown["has_image"], unknown["subject"]) == (None, None, None)
    assert format_record(make_record(hint="  "))["meta"]["has_hint"] is False


@pytest.mark.parametrize("overrides, reason", [
    ({"question": None, "choices": None, "answer": None}, "missing question, choices, answer"),
    ({"answer": None}, "missing answer"),
    ({"choices": ["only one"], "answer": 0}, "fewer than 2 choices"),
    ({"answer": 3}, "answer index out of range"),
    ({"answer": True}, "answer index out of range"),
    ({"choices": [str(i) for i in range(27)], "answer": 0}, "more than 26 choices"),
])
def test_skip_reason_and_format_refusal(overrides, reason):
    record = make_record(**overrides)
    assert skip_reason(record) == reason
    with pytest.raises(ScienceQAError, match=f"pid 'p1': {reason}"):
        format_record(record)


def test_skip_reason_image_drop_only_when_asked():
    record = make_record(has_image=True)
    assert skip_reason(record) is None
    assert skip_reason(record, FormatOptions()) is None
    assert skip_reason(record, FormatOptions(image_mode="drop")) == "image question dropped"
    assert skip_reason(make_record(has_image=False), FormatOptions(image_mode="drop")) is None


# ----------------------------------------------------------------------------- subsets

@pytest.mark.parametrize("n", [0, 1, 17, 100, 137])
def test_select_subset_equals_hub_shuffle_select(n):
    pids = [f"q{i}" for i in range(137)]
    expected = datasets.Dataset.from_dict({"pid": pids}).shuffle(seed=42).select(range(n))["pid"]
    assert [r["pid"] for r in select_subset([{"pid": p} for p in pids], n, seed=42)] == list(expected)


def test_select_subset_all_and_oversize_take_the_whole_shuffled_split():
    records = [{"pid": i} for i in range(20)]
    expected = [int(i) for i in np.random.default_rng(7).permutation(20)]
    assert [r["pid"] for r in select_subset(records, "all", seed=7)] == expected
    assert [r["pid"] for r in select_subset(records, None, seed=7)] == expected
    assert [r["pid"] for r in select_subset(records, 500, seed=7)] == expected
    assert select_subset(records, 5, seed=1) != select_subset(records, 5, seed=2)


def test_parse_size():
    assert parse_size("all") is None and parse_size(" ALL ") is None and parse_size(None) is None
    assert parse_size("12") == 12 and parse_size(0) == 0
    with pytest.raises(ScienceQAError, match="whole number or 'all'"):
        parse_size("lots")
    with pytest.raises(ScienceQAError, match=">= 0"):
        parse_size(-1)


def test_percentiles():
    assert percentiles([]) == {}
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100, "mean": 50.5}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7, "mean": 7.0}


# ----------------------------------------------------------------------------- local directories

def test_sample_file_errors_name_their_line(tmp_path):
    (tmp_path / sqa.SAMPLE_FILE).write_text('{"pid": "a", "split": "train", "question": "Q?"}\n{"pid": "b"}\n')
    with pytest.raises(ScienceQAError, match=r"questions.jsonl:2: expected an object with a pid and a split"):
        load_scienceqa(str(tmp_path), "train")
    (tmp_path / sqa.SAMPLE_FILE).write_text('{"pid": "a",\n')
    with pytest.raises(ScienceQAError, match=r"questions.jsonl:1: invalid JSON"):
        load_scienceqa(str(tmp_path), "train")
    (tmp_path / sqa.SAMPLE_FILE).write_text('{"pid": "a", "split": "train", "image": null}\n')
    assert [r["pid"] for r in load_scienceqa(str(tmp_path), "train")] == ["a"]
    assert load_scienceqa(str(tmp_path), "test") == []
    with pytest.raises(ScienceQAError, match="no split 'dev'"):
        load_scienceqa(str(tmp_path), "dev")


def test_load_sample_splits():
    train, val, test = (load_scienceqa("sample", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (42, 12, 12)
    lines = (sqa.SAMPLE_DIR / sqa.SAMPLE_FILE).read_text().splitlines()
    file_order = [json.loads(line)["pid"] for line in lines if json.loads(line)["split"] == "val"]
    assert [r["pid"] for r in val] == file_order  # split order is kept
    missing = [r["pid"] for r in train if skip_reason(r) is not None]
    assert sorted(missing) == ["s065", "s066"]
    assert sum(r["hint"] is None for r in train) == 4  # the 2 text-less records + 2 unknown hints
    images = [r for r in train + val + test if r["has_image"]]
    assert len(images) == 11 and all(r["caption"] for r in images)
    assert all(r["caption"] is None for r in train + val + test if not r["has_image"])


def test_sample_content_is_varied():
    records = [r for s in ("train", "val", "test") for r in load_scienceqa("sample", s) if skip_reason(r) is None]
    assert len(records) == 64
    assert {r["subject"] for r in records} == {"natural science", "social science", "language science", None}
    assert {r["grade"] for r in records if r["grade"]} == {f"grade{g}" for g in range(1, 13)}
    assert {len(r["choices"]) for r in records} == {2, 3, 4, 5}
    letters = [LETTERS[r["answer"]] for r in records]
    assert min(letters.count(x) for x in "ABCD") >= 10
    assert sum(bool(r["hint"]) for r in records) >= 10
    assert sum(bool(r["lecture"]) for r in records) >= 55


def write_dir(tmp_path, problems, pid_splits, captions=None):
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps(pid_splits))
    if captions is not None:
        (tmp_path / "captions.json").write_text(json.dumps(captions))
    return tmp_path


def test_load_directory_with_plain_captions_and_unknown_image(tmp_path):
    problems = {
        "1": {"question": "Q1", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png"},
        "2": {"question": "Q2", "choices": ["a", "b"], "answer": 1, "hint": "h", "image": None},
        "3": {"question": "Q3", "choices": ["a", "b"], "answer": 1, "hint": "h"},
    }
    write_dir(tmp_path, problems, {"test": ["3", "1", "2"]}, captions={"1": "cap one", "2": "ignored"})
    records = load_scienceqa(str(tmp_path), "test")
    assert [(r["pid"], r["has_image"], r["caption"]) for r in records] == [
        ("3", None, None), ("1", True, "cap one"), ("2", False, None)]


def test_load_directory_rereads_changed_files(tmp_path):
    problems = {"1": {"question": "Q1", "choices": ["a", "b"], "answer": 0, "image": None}}
    write_dir(tmp_path, problems, {"val": ["1"]})
    assert load_scienceqa(tmp_path, "val")[0]["question"] == "Q1"
    problems["1"]["question"] = "Q1 changed, and longer"
    write_dir(tmp_path, problems, {"val": ["1"]})
    assert load_scienceqa(tmp_path, "val")[0]["question"] == "Q1 changed, and longer"


def test_load_errors(tmp_path):
    with pytest.raises(ScienceQAError, match="expected 'hf', 'sample' or a directory"):
        load_scienceqa(tmp_path / "absent", "train")
    with pytest.raises(ScienceQAError, match="missing problems.json"):
        load_scienceqa(tmp_path, "train")
    write_dir(tmp_path, {"1": {"question": "Q"}}, {"train": ["1", "2"]})
    with pytest.raises(ScienceQAError, match=r"no split 'val' \(has: train\)"):
        load_scienceqa(tmp_path, "val")
    with pytest.raises(ScienceQAError, match="pid '2' of split 'train' is missing"):
        load_scienceqa(tmp_path, "train")
    (tmp_path / "problems.json").write_text('{"1": ')
    with pytest.raises(ScienceQAError, match=r"problems.json:1: invalid JSON"):
        load_scienceqa(tmp_path, "train")


# ----------------------------------------------------------------------------- hub (stand-in)

HUB_COLUMNS = ["image", "question", "choices", "answer", "hint", "task", "grade", "subject",
               "topic", "category", "skill", "lecture", "solution"]


def hub_split(n, offset=0):
    """A tiny Dataset with the hub's columns. Image bytes are not a real image, so any
    attempt to decode them would raise: loading must never decode."""
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("int8"),
        **{name: datasets.Value("string") for name in HUB_COLUMNS[4:]},
    })
    rows = {name: [] for name in HUB_COLUMNS}
    for i in range(n):
        k = i + offset
        rows["image"].append({"bytes": b"not an image", "path": None} if k % 3 == 0 else None)
        rows["question"].append(f"Question {k}?")
        rows["choices"].append([f"c{k}a", f"c{k}b", f"c{k}c"][: 2 + k % 2])
        rows["answer"].append(k % 2)
        rows["hint"].append("" if k % 2 else f"Hint {k}.")
        for name in ("task", "grade", "subject", "topic", "category", "skill"):
            rows[name].append(f"{name}{k}")
        rows["lecture"].append(f"Lecture {k}." if k % 4 else "")
        rows["solution"].append(f"Solution {k}.")
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture
def fake_hub(monkeypatch):
    hub = datasets.DatasetDict({"train": hub_split(30), "validation": hub_split(9, 100), "test": hub_split(8, 200)})
    calls = []

    def load_dataset(path, *args, revision=None, split=None, **kwargs):
        calls.append({"path": path, "args": args, "revision": revision, "split": split, **kwargs})
        return hub[split] if split is not None else hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return hub, calls


def test_hub_loading_uses_pinned_revision_and_never_decodes_images(fake_hub):
    hub, calls = fake_hub
    records = load_scienceqa("hf", "val")
    assert calls == [{"path": HF_DATASET, "args": (), "revision": HF_REVISION, "split": "validation"}]
    assert HF_REVISION == "f18b0a70359ebfb41f658fd564208d0355b013f4" and HF_DATASET == "derek-thomas/ScienceQA"
    assert len(records) == 9
    first = records[0]
    assert first == {
        "pid": "val-0", "split": "val", "question": "Question 100?", "choices": ["c100a", "c100b"],
        "answer": 0, "hint": "Hint 100.", "has_image": False, "caption": None, "task": "task100",
        "grade": "grade100", "subject": "subject100", "topic": "topic100", "category": "category100",
        "skill": "skill100", "lecture": "", "solution": "Solution 100.",
    }
    assert [r["has_image"] for r in records] == [(100 + i) % 3 == 0 for i in range(9)]
    with pytest.raises(OSError):  # PIL's UnidentifiedImageError: decoding really would fail
        hub["validation"][2]["image"]


def test_hub_loading_accepts_a_datasetdict(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.DatasetDict({"test": hub_split(4)}))
    assert [r["pid"] for r in load_scienceqa("hf", "test")] == ["test-0", "test-1", "test-2", "test-3"]


def test_hub_failure_becomes_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ScienceQAError, match=r"split train\) from the Hugging Face hub: ConnectionError: no route"):
        load_scienceqa("hf", "train")


def test_resolve_source_and_caption_for(tmp_path):
    assert sqa.resolve_source("hf") == "hf"
    assert sqa.resolve_source("sample") == sqa.SAMPLE_DIR
    assert sqa.resolve_source(str(tmp_path)) == tmp_path
    record = make_record(has_image=True, caption=" A sock. ")
    assert sqa.caption_for(record, FormatOptions()) == "A sock."
    assert sqa.caption_for(record, FormatOptions(image_mode="keep")) is None
    assert sqa.caption_for(make_record(has_image=False, caption="x"), FormatOptions()) is None
    assert sqa.caption_for(make_record(has_image=True, caption="  "), FormatOptions()) is None


def test_hub_rejects_unknown_split(fake_hub):
    with pytest.raises(ScienceQAError, match="the hub has splits train, val, test"):
        load_scienceqa("hf", "minitrain")


def test_prepare_from_hub_picks_the_hub_subset_then_skips_missing_text(fake_hub, tmp_path):
    hub, _ = fake_hub
    # Punch holes in the train split as the real hub has (rows with no text).
    train = hub["train"].to_dict()
    for i in (3, 4, 11):
        train["question"][i] = train["choices"][i] = train["answer"][i] = None
    hub["train"] = datasets.Dataset.from_dict(train, features=hub["train"].features)

    report = prepare("hf", tmp_path, sizes={"train": 20, "val": "all", "test": 3}, seed=42)
    chosen = hub["train"].select_columns(["question"]).shuffle(seed=42).select(range(20))["question"]
    expected = [q for q in chosen if q is not None]
    written = read_conversations(tmp_path / "scienceqa_train.jsonl")
    assert [r["messages"][1]["content"].split("\n\n")[-2] for r in written] == expected
    stats = report.splits["train"]
    assert (stats.available, stats.selected, stats.kept) == (30, 20, len(expected))
    assert dict(stats.skipped) == {"missing question, choices, answer": 20 - len(expected)}
    assert (report.splits["val"].kept, report.splits["test"].kept) == (9, 3)


# ----------------------------------------------------------------------------- prepare / CLI

def test_prepare_sample_writes_files_and_counts(tmp_path):
    report = prepare("sample", tmp_path)
    for split, kept in (("train", 40), ("val", 12), ("test", 12)):
        records = read_conversations(tmp_path / f"scienceqa_{split}.jsonl")
        assert len(records) == kept == report.splits[split].kept
        assert all(r["meta"]["split"] == split for r in records)
        assert all(r["messages"][0] == {"role": "system", "content": ORIGINAL_SYSTEM} for r in records)
    train = report.splits["train"]
    assert (train.available, train.requested, train.selected) == (42, DEFAULT_SIZES["train"], 42)
    assert dict(train.skipped) == {"missing question, choices, answer": 2}
    assert (train.with_image, train.with_caption, train.hint_unknown) == (5, 5, 2)
    assert sum(train.choices.values()) == sum(train.letters.values()) == 40
    assert train.length_unit == "chars" and train.lengths["max"] >= train.lengths["p50"] > 0
    text = report.format()
    assert "train skipped: 2 missing question, choices, answer" in text
    assert "train: asked for 12000, the split has 42: took all" in text


def test_prepare_subset_sizes_and_image_drop(tmp_path):
    report = prepare("sample", tmp_path, sizes={"train": 10, "val": "all", "test": 0},
                     options=FormatOptions(image_mode="drop"), splits=("train", "val", "test"))
    train_pool = load_scienceqa("sample", "train")
    picked = select_subset(train_pool, 10, seed=42)
    expected = [r["pid"] for r in picked if skip_reason(r, FormatOptions(image_mode="drop")) is None]
    written = read_conversations(tmp_path / "scienceqa_train.jsonl")
    assert [r["meta"]["pid"] for r in written] == expected
    assert not any(r["meta"]["has_image"] for r in written)
    val = report.splits["val"]
    assert (val.kept, val.skipped["image question dropped"]) == (10, 2)
    assert report.splits["test"].kept == 0
    assert (tmp_path / "scienceqa_test.jsonl").read_text() == ""


class WordTokenizer:
    """Stands in for nanochat's Tokenizer: one token per whitespace-separated word."""

    def render_conversation(self, conversation, max_tokens=2048):
        assert set(conversation) == {"messages"}
        ids = [0] + [1 for m in conversation["messages"] for _ in m["content"].split()]
        return ids[:max_tokens], [0] * len(ids[:max_tokens])


def test_prepare_reports_token_lengths_with_a_tokenizer(tmp_path):
    report = prepare("sample", tmp_path, splits=("val",), tokenizer=WordTokenizer())
    val = report.splits["val"]
    records = read_conversations(tmp_path / "scienceqa_val.jsonl")
    lengths = sorted(1 + sum(len(m["content"].split()) for m in r["messages"]) for r in records)
    assert val.length_unit == "tokens" and val.lengths["max"] == lengths[-1]
    assert val.over_2048_tokens == 0
    assert "val length (tokens):" in report.format()


def test_prepare_with_a_real_nanochat_tokenizer(tmp_path):
    tokenizer_module = pytest.importorskip("nanochat.tokenizer")
    texts = [json.dumps(r) for r in load_scienceqa("sample", "train")]
    tok = tokenizer_module.Tokenizer.train_from_iterator(texts, vocab_size=300)
    tok.save(tmp_path / "tok")
    report = prepare("sample", tmp_path / "out", splits=("test",), tokenizer_dir=tmp_path / "tok")
    test = report.splits["test"]
    assert test.length_unit == "tokens" and test.lengths["p50"] > 50


def test_main_cli(tmp_path, capsys):
    code = main(["--scienceqa", "sample", "--out_dir", str(tmp_path), "--train_size", "5", "--val_size", "all",
                 "--splits", "train,val", "--original_format", "--no-include_background"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ScienceQA from {sqa.SAMPLE_DIR} (seed 42) -> {tmp_path}")
    train = read_conversations(tmp_path / "scienceqa_train.jsonl")
    picked = select_subset(load_scienceqa("sample", "train"), 5)
    assert len(train) == 5 - sum(skip_reason(r) is not None for r in picked)
    assert not (tmp_path / "scienceqa_test.jsonl").exists()
    assert not any("Background:" in r["messages"][-1]["content"] for r in train)
    assert not any(r["messages"][1]["content"].startswith(("Context:", "Image:")) for r in train)


def test_cli_flags_map_to_options():
    parse = sqa.build_parser().parse_args
    assert sqa.options_from_args(parse([])) == FormatOptions()
    assert sqa.options_from_args(parse(["--original_format"])) == FormatOptions.original()
    assert sqa.options_from_args(parse(["--original_format", "--include_hint"])) == FormatOptions(image_mode="keep")
    args = parse(["--image_mode", "drop", "--no-include_explanation", "--system_prompt", ""])
    assert sqa.options_from_args(args) == FormatOptions(image_mode="drop", include_explanation=False, system_prompt="")
    assert sqa.options_from_args(parse(["--answer_format", "text_first"])) == FormatOptions(answer_format="text_first")


def test_main_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["--scienceqa", str(tmp_path / "absent"), "--out_dir", str(tmp_path)]) == 2
    assert "error: ScienceQA source" in capsys.readouterr().err
    assert main(["--scienceqa", "sample", "--out_dir", str(tmp_path), "--train_size", "many"]) == 2


# ----------------------------------------------------------------------------- the real local copy

@pytest.mark.skipif(not (SHARED / "problems.json").exists(), reason="../shared/scienceqa not present")
def test_real_local_copy_counts_and_default_subset():
    train = load_scienceqa(SHARED, "train")
    assert len(train) == 12726
    assert sum(skip_reason(r) is not None for r in train) == 374
    subset = select_subset(train, DEFAULT_SIZES["train"], seed=42)
    pids = json.loads((SHARED / "pid_splits.json").read_text())["train"]
    order = np.random.default_rng(42).permutation(len(pids))[:12000]
    assert [r["pid"] for r in subset] == [pids[i] for i in order]
    assert sum(skip_reason(r) is not None for r in subset) == 354
    test = load_scienceqa(SHARED, "test")
    assert len(test) == 4241 and sum(r["has_image"] for r in test) == 2017
    assert sum(bool(r["hint"]) for r in test) == 2046
    assert all(r["caption"] for r in test if r["has_image"])

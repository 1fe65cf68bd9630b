"""Writing the prepared files: python -m sciassist.data.prepare (make data)."""

import json

import datasets
import pytest

from sciassist.data.conversations import read_conversations
from sciassist.data.prepare import build_parser, main, options_from_args, percentiles, prepare
from sciassist.data.scienceqa import (
    DEFAULT_SIZES,
    SAMPLE_DIR,
    SYSTEM_PROMPT,
    FormatOptions,
    ScienceQAError,
    load_scienceqa,
    select_subset,
    skip_reason,
)


def test_percentiles():
    assert percentiles([]) == {}
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100, "mean": 50.5}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7, "mean": 7.0}


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


def test_prepare_sample_writes_files_and_counts(tmp_path):
    report = prepare("sample", tmp_path)
    for split, kept in (("train", 40), ("val", 12), ("test", 12)):
        records = read_conversations(tmp_path / f"scienceqa_{split}.jsonl")
        assert len(records) == kept == report.splits[split].kept
        assert all(r["meta"]["split"] == split for r in records)
        assert all(r["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT} for r in records)
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
    assert out.startswith(f"ScienceQA from {SAMPLE_DIR} (seed 42) -> {tmp_path}")
    train = read_conversations(tmp_path / "scienceqa_train.jsonl")
    picked = select_subset(load_scienceqa("sample", "train"), 5)
    assert len(train) == 5 - sum(skip_reason(r) is not None for r in picked)
    assert not (tmp_path / "scienceqa_test.jsonl").exists()
    assert not any("Background:" in r["messages"][-1]["content"] for r in train)
    assert not any(r["messages"][1]["content"].startswith(("Context:", "Image:")) for r in train)


def test_cli_flags_map_to_options():
    parse = build_parser().parse_args
    assert options_from_args(parse([])) == FormatOptions()
    assert options_from_args(parse(["--original_format"])) == FormatOptions.original()
    assert options_from_args(parse(["--original_format", "--include_hint"])) == FormatOptions(image_mode="keep")
    args = parse(["--image_mode", "drop", "--no-include_explanation", "--system_prompt", ""])
    assert options_from_args(args) == FormatOptions(image_mode="drop", include_explanation=False, system_prompt="")
    assert options_from_args(parse(["--answer_format", "text_first"])) == FormatOptions(answer_format="text_first")


def test_main_reports_errors_without_traceback(tmp_path, capsys):
    assert main(["--scienceqa", str(tmp_path / "absent"), "--out_dir", str(tmp_path)]) == 2
    assert "error: ScienceQA source" in capsys.readouterr().err
    assert main(["--scienceqa", "sample", "--out_dir", str(tmp_path), "--train_size", "many"]) == 2


def test_options_layout_flag():
    assert options_from_args(build_parser().parse_args(["--options_layout", "letter_after"])) == \
        FormatOptions(options_layout="letter_after")


# ----------------------------------------------------------------------------- nothing lost, nothing left behind

def bad_source(tmp_path, test_split):
    """A lupantech directory whose train split has a bad record and whose test split is
    `test_split` (a bad value makes the last split fail)."""
    good = {"question": "Q", "choices": ["a", "b"], "answer": 1, "hint": "", "image": None}
    source = tmp_path / "source"
    source.mkdir()
    problems = {"1": good, "2": {**good, "choices": [None, "fish"]}, "3": good, "4": good}
    (source / "problems.json").write_text(json.dumps(problems))
    (source / "pid_splits.json").write_text(json.dumps({"train": ["1", "2", "3"], "val": ["4"], "test": test_split}))
    return source


def test_out_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    target = tmp_path / "data"
    target.write_text("keep me")
    assert main(["--scienceqa", "sample", "--out_dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --out_dir {target} is a file, not a directory; give a directory to write " \
                  f"scienceqa_<split>.jsonl into\n"
    assert target.read_text() == "keep me"
    assert main(["--scienceqa", "sample", "--out_dir", str(target / "sub")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --out_dir {target / 'sub'}: cannot create it")


def test_a_failing_split_writes_nothing_and_leaves_old_files_alone(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "scienceqa_train.jsonl").write_text("the old train file\n")
    source = bad_source(tmp_path, {"not": "a list"})
    assert main(["--scienceqa", str(source), "--out_dir", str(out), "--skip_bad_records"]) == 2
    assert capsys.readouterr().err == (f"error: {source / 'pid_splits.json'}: split 'test' must be a list of pids, "
                                       f"got an object\n")
    assert sorted(p.name for p in out.iterdir()) == ["scienceqa_train.jsonl"]  # no temporary folder either
    assert (out / "scienceqa_train.jsonl").read_text() == "the old train file\n"
    fresh = tmp_path / "fresh" / "data"
    with pytest.raises(ScienceQAError, match="must be a list of pids"):
        prepare(source, fresh, skip_bad_records=True)
    assert not (tmp_path / "fresh").exists()  # the folders it made are gone too


def test_bad_records_stop_prepare_or_are_skipped_and_counted(tmp_path, capsys):
    source = bad_source(tmp_path, ["3"])
    out = tmp_path / "out"
    assert main(["--scienceqa", str(source), "--out_dir", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {source / 'problems.json'}: pid '2': bad choices (choice A is null, "
                                       f"not a string); fix the record, or skip such records with "
                                       f"--skip_bad_records (they are counted)\n")
    assert not out.exists()
    assert main(["--scienceqa", str(source), "--out_dir", str(out), "--skip_bad_records"]) == 0
    assert "train skipped: 1 bad choices (choice A is null, not a string)" in capsys.readouterr().out
    assert sorted(r["meta"]["pid"] for r in read_conversations(out / "scienceqa_train.jsonl")) == ["1", "3"]
    assert sorted(p.name for p in out.iterdir()) == [f"scienceqa_{s}.jsonl" for s in ("test", "train", "val")]
    report = prepare(source, out, skip_bad_records=True)
    assert (report.splits["train"].kept, dict(report.splits["train"].skipped)) == (
        2, {"bad choices (choice A is null, not a string)": 1})


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--seed", "x"], "argument --seed: invalid int value: 'x'"),
])
def test_prepare_numbers_are_refused_at_parse_time(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--scienceqa", "sample", "--out_dir", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, message", [
    (["--train_size", "many"], "error: train size (--train_size) must be a whole number or 'all', got 'many'"),
    (["--val_size", "-3"], "error: val size (--val_size) must be >= 0, got -3"),
    (["--test_size", "2.5"], "error: test size (--test_size) must be a whole number or 'all', got '2.5'"),
    (["--splits", ","], "error: splits must name at least one split"),
    (["--tokenizer_dir", "nowhere"], "error: --tokenizer_dir: nowhere: no tokenizer.pkl in this directory"),
])
def test_prepare_bad_values_are_one_line_errors_before_anything_is_written(tmp_path, argv, message, capsys):
    assert main(["--scienceqa", "sample", "--out_dir", str(tmp_path / "out"), *argv]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ScienceQAError, match="seed must be a whole number >= 0"):
        prepare("sample", tmp_path / "out", seed=-1)
    assert not (tmp_path / "out").exists()

"""Records checked field by field: a bad ScienceQA record is an error naming its file, pid
and field, or, when asked, skipped and counted; missing text stays a plain skip."""

import json
import re

import pytest

from sciassist.data import scienceqa as sqa
from sciassist.data.records import json_type, record_problem
from sciassist.data.scienceqa import ScienceQAError, format_record, load_scienceqa, skip_reason
from tests.data.test_scienceqa import make_record, write_dir

GOOD = {"question": "Q", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None}


@pytest.mark.parametrize("overrides, problem", [
    ({"choices": [None, "fish"]}, "bad choices (choice A is null, not a string)"),
    ({"choices": ["a", 3]}, "bad choices (choice B is a number (3), not a string)"),
    ({"choices": ["a", "  "]}, "bad choices (choice B is empty)"),
    ({"choices": "ab"}, "bad choices (a string, not a list of strings)"),
    ({"answer": "1"}, "bad answer (a string, not an option index)"),
    ({"answer": 1.0}, "bad answer (a number (1.0), not an option index)"),
    ({"question": ["a", "b"]}, "bad question (a list, not a string)"),
    ({"hint": 5}, "bad hint (a number (5), not a string or null)"),
    ({"lecture": ["x"]}, "bad lecture (a list, not a string or null)"),
    ({"solution": {"text": "x"}}, "bad solution (an object, not a string or null)"),
    ({"caption": True, "has_image": True}, "bad caption (a boolean (true), not a string or null)"),
    ({"topic": 7}, "bad topic (a number (7), not a string or null)"),
])
def test_bad_fields_are_named_and_never_formatted(overrides, problem):
    record = make_record(**overrides)
    assert record_problem(record) == problem == skip_reason(record)
    with pytest.raises(ScienceQAError, match=re.escape(f"pid 'p1': {problem}")):
        format_record(record)


def test_missing_text_is_a_skip_not_a_problem_and_empty_text_is_fine():
    record = make_record(question=None, choices=None, answer=None, hint=5)
    assert record_problem(record) is None
    assert skip_reason(record) == "missing question, choices, answer"
    for empty in ("", None):
        assert record_problem(make_record(hint=empty, lecture=empty, solution=empty, caption=empty)) is None
    assert json_type(None) == "null" and json_type([1]) == "a list" and json_type(False) == "a boolean (false)"


def bad_dir(tmp_path, **bad):
    problems = {"1": GOOD, "2": {**GOOD, **bad}, "3": {**GOOD, "question": None, "choices": None, "answer": None}}
    return write_dir(tmp_path, problems, {"train": ["1", "2", "3"]})


@pytest.mark.parametrize("bad, problem", [
    ({"choices": [None, "fish"]}, "bad choices (choice A is null, not a string)"),
    ({"question": ["a", "b"]}, "bad question (a list, not a string)"),
    ({"hint": 5}, "bad hint (a number (5), not a string or null)"),
    ({"lecture": 1}, "bad lecture (a number (1), not a string or null)"),
    ({"solution": []}, "bad solution (a list, not a string or null)"),
    ({"answer": 2}, "answer index out of range"),
])
def test_a_bad_record_in_a_directory_is_an_error_naming_file_pid_and_field(tmp_path, bad, problem):
    bad_dir(tmp_path, **bad)
    with pytest.raises(ScienceQAError) as error:
        load_scienceqa(tmp_path, "train")
    assert str(error.value) == (f"{tmp_path / 'problems.json'}: pid '2': {problem}; fix the record, or skip such "
                                f"records with --skip_bad_records (they are counted)")
    records = load_scienceqa(tmp_path, "train", skip_bad_records=True)
    assert [r["pid"] for r in records] == ["1", "2", "3"]  # nothing dropped while loading
    assert [skip_reason(r) for r in records] == [None, problem, "missing question, choices, answer"]


def test_a_problem_that_is_not_an_object(tmp_path):
    write_dir(tmp_path, {"1": GOOD, "2": ["not", "a", "record"], "3": None}, {"train": ["1", "2"], "val": ["3"]})
    with pytest.raises(ScienceQAError, match=r"problems.json: pid '2': bad record \(a list, not an object\)"):
        load_scienceqa(tmp_path, "train")
    with pytest.raises(ScienceQAError, match=r"pid '3': bad record \(null, not an object\)"):
        load_scienceqa(tmp_path, "val")
    records = load_scienceqa(tmp_path, "train", skip_bad_records=True)
    assert [skip_reason(r) for r in records] == [None, "bad record (a list, not an object)"]
    with pytest.raises(ScienceQAError, match=r"pid '2': bad record"):
        format_record(records[1])


@pytest.mark.parametrize("splits, message", [
    ({"train": {"1": 0}}, r"pid_splits.json: split 'train' must be a list of pids, got an object"),
    ({"train": "1"}, r"pid_splits.json: split 'train' must be a list of pids, got a string"),
    ({"train": ["1", None]}, r"pid_splits.json: split 'train', item 1: null is not a pid"),
    ({"train": [["1"]]}, r"pid_splits.json: split 'train', item 0: a list is not a pid"),
])
def test_pid_splits_of_the_wrong_type(tmp_path, splits, message):
    write_dir(tmp_path, {"1": GOOD}, splits)
    with pytest.raises(ScienceQAError, match=message):
        load_scienceqa(tmp_path, "train", skip_bad_records=True)


def test_a_bad_caption_names_captions_json(tmp_path):
    write_dir(tmp_path, {"1": {**GOOD, "image": "image.png"}}, {"test": ["1"]}, captions={"captions": {"1": ["c"]}})
    with pytest.raises(ScienceQAError, match=r"captions.json: pid '1': bad caption \(a list, not a string or null\)"):
        load_scienceqa(tmp_path, "test")


def test_a_bad_record_in_a_questions_jsonl_names_its_line(tmp_path):
    lines = [{"pid": "a", "split": "train", **GOOD}, {"pid": "b", "split": "train", **GOOD, "choices": [None, "fish"]}]
    (tmp_path / sqa.SAMPLE_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ScienceQAError, match=r"questions.jsonl:2: pid 'b': bad choices \(choice A is null"):
        load_scienceqa(tmp_path, "train")
    assert len(load_scienceqa(tmp_path, "val")) == 0  # another split is not refused for it
    assert [skip_reason(r) for r in load_scienceqa(tmp_path, "train", skip_bad_records=True)] == [
        None, "bad choices (choice A is null, not a string)"]
    (tmp_path / sqa.SAMPLE_FILE).write_text(json.dumps({"pid": ["a"], "split": "train", **GOOD}) + "\n")
    with pytest.raises(ScienceQAError, match=r"questions.jsonl:1: expected an object with a pid and a split"):
        load_scienceqa(tmp_path, "train")


def test_the_bundled_sample_has_no_bad_records():
    for split in sqa.SPLITS:
        assert not [r["pid"] for r in load_scienceqa("sample", split) if record_problem(r)]


def test_subset_seed_and_sizes_are_checked():
    with pytest.raises(ScienceQAError, match=r"seed must be a whole number >= 0, got -1"):
        sqa.select_subset([{"pid": 1}], 1, seed=-1)
    with pytest.raises(ScienceQAError, match=r"seed must be a whole number >= 0, got '3'"):
        sqa.select_subset([{"pid": 1}], 1, seed="3")
    with pytest.raises(ScienceQAError, match=r"--val_size must be a whole number or 'all', got 2.5"):
        sqa.parse_size(2.5, "--val_size")
    with pytest.raises(ScienceQAError, match=r"size must be a whole number or 'all', got True"):
        sqa.parse_size(True)
    assert sqa.parse_size(3.0) == 3


def test_a_bad_hub_row_names_the_dataset_and_split(monkeypatch):
    import datasets

    from tests.data.hub_stand_in import hub_split
    rows = hub_split(3).to_dict()
    rows["choices"][1] = [None, "fish"]
    split = datasets.Dataset.from_dict(rows, features=hub_split(3).features)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: split)
    with pytest.raises(ScienceQAError, match=re.escape(f"{sqa.HF_DATASET} (test split): pid 'test-1': bad choices "
                                                       f"(choice A is null, not a string)")):
        load_scienceqa("hf", "test")
    assert [skip_reason(r) for r in load_scienceqa("hf", "test", skip_bad_records=True)] == [
        None, "bad choices (choice A is null, not a string)", None]

import json
import socket
import threading
from pathlib import Path

import datasets
import numpy as np
import pytest

from sciassist.data import scienceqa as sqa
from sciassist.data.answers import LETTERS, options_block
from sciassist.data.scienceqa import (
    DEFAULT_SIZES,
    HF_DATASET,
    HF_REVISION,
    SYSTEM_PROMPT,
    FormatOptions,
    ScienceQAError,
    format_record,
    load_scienceqa,
    parse_size,
    select_subset,
    skip_reason,
)
from tests.data.hub_stand_in import hub_split

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
        "lecture": "Hard things keep their shape.", "solution": "The marble keeps its shape.",
    }
    unknown = format_record(make_record(hint=None, has_image=None, subject=None))["meta"]
    assert (unknown["has_hint"], unknown["has_image"], unknown["subject"]) == (None, None, None)
    assert format_record(make_record(hint="  "))["meta"]["has_hint"] is False
    bare = format_record(make_record(lecture=None, solution=""))["meta"]
    assert (bare["lecture"], bare["solution"]) == ("", "")


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


def test_hub_failure_names_the_flags_that_work_offline(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(OSError("no cache")))
    with pytest.raises(ScienceQAError) as error:
        load_scienceqa("hf", "val")
    assert str(error.value).endswith("OSError: no cache; " + sqa.OFFLINE_ADVICE)
    assert "--scienceqa DIR" in sqa.OFFLINE_ADVICE and "--scienceqa sample" in sqa.OFFLINE_ADVICE
    assert "--source" not in sqa.OFFLINE_ADVICE


@pytest.fixture
def online(monkeypatch):
    """The hub client out of offline mode (the tests run with HF_HUB_OFFLINE=1), and
    load_dataset failing the test if it is reached."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)

    def never(*args, **kwargs):
        raise AssertionError("datasets.load_dataset was called for an unreachable hub")
    monkeypatch.setattr(datasets, "load_dataset", never)


def test_an_unreachable_hub_fails_after_one_connection(online, monkeypatch):
    """A server that accepts and hangs up at once: one connection, no retries, and the error
    says what to use instead."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                connection, _ = server.accept()
            except OSError:  # closed by the test
                return
            accepted.append(connection)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", endpoint)
    try:
        with pytest.raises(ScienceQAError) as error:
            load_scienceqa("hf", "train")
    finally:
        server.close()
        thread.join(timeout=10)
    assert len(accepted) == 1
    message = str(error.value)
    assert message.startswith(f"the Hugging Face hub ({endpoint}) cannot be reached (")
    assert message.endswith("); " + sqa.OFFLINE_ADVICE)


def test_a_closed_port_is_unreachable(online, monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]  # closed once the with block ends
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ScienceQAError, match=rf"^the Hugging Face hub \(http://127\.0\.0\.1:{port}\) cannot be "
                                             rf"reached \(\w+: .*\); use --scienceqa DIR"):
        load_scienceqa("hf", "val")


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

import json
import re

import pytest

from sciassist.common import UserError
from sciassist.data.answers import detect_answer_format
from sciassist.eval import questions as qs
from tests.eval.stubs import record


def test_nanochat_prompt_format():
    r = record("1", 1, k=2)
    r["messages"][0]["content"] = "Context: It is cold.\n\nWhich is colder?\n\nA. ice\nB. tea"
    r["meta"]["choices"] = ["ice", "tea"]
    messages = qs.nanochat_prompt(r)
    assert messages == [{"role": "user", "content":
                         "Multiple Choice question: Context: It is cold.\n\nWhich is colder?\n- ice=A\n- tea=B\n\n"
                         "Respond only with the letter of the correct answer."}]
    prompts, prefix = qs.prompts_for([r], "nanochat")
    assert prefix == "" and prompts == [messages]
    with pytest.raises(qs.EvaluationError):
        qs.prompts_for([r], "other")
    r["messages"][0]["content"] = "Pick one: ice or tea?"  # an unknown layout is kept whole
    assert qs.nanochat_prompt(r)[0]["content"] == ("Multiple Choice question: Pick one: ice or tea?\n- ice=A\n"
                                                   "- tea=B\n\nRespond only with the letter of the correct answer.")


def test_load_questions_from_jsonl(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(record(str(i), i % 3)) + "\n" for i in range(5)))
    records, info = qs.load_questions(data_path=path, limit=3)
    assert [r["meta"]["pid"] for r in records] == ["0", "1", "2"]
    assert info["count"] == 3 and info["available"] == 5
    no_meta = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text(json.dumps(no_meta) + "\n")
    with pytest.raises(qs.EvaluationError, match="record 1.*meta"):
        qs.load_questions(data_path=path)
    with pytest.raises(qs.EvaluationError, match="no such file"):
        qs.load_questions(data_path=tmp_path / "missing.jsonl")


def test_check_question_allows_two_to_five_options():
    assert qs.check_question(record("1", 0, k=qs.MAX_CHOICES), "here") == qs.MAX_CHOICES
    with pytest.raises(qs.EvaluationError, match="meta.choices must be a list of 2 to 5 options"):
        qs.check_question(record("1", 0, k=6), "here")
    with pytest.raises(qs.EvaluationError, match="meta.choices must be a list of 2 to 5 options"):
        qs.check_question(record("1", 0, k=1), "here")


def test_evaluation_error_is_a_user_error():
    from sciassist.common import UserError
    assert issubclass(qs.EvaluationError, UserError) and issubclass(qs.EvaluationError, ValueError)


def test_detect_answer_format_and_resolve_scoring():
    from sciassist.data.scienceqa import FormatOptions, format_record
    raw = {"pid": "1", "question": "Which is hot?", "choices": ["ice", "steam"], "answer": 1, "hint": ""}
    text = [format_record(raw, FormatOptions(answer_format="text_first"))] * 2
    letter = [format_record(raw, FormatOptions())]
    assert text[0]["messages"][-1]["content"].startswith("The correct answer is steam (B).")
    assert detect_answer_format(text) == "text_first"
    assert detect_answer_format(letter) == "letter_first"
    assert detect_answer_format(text + letter) == "letter_first"  # mixed: the default
    other = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Steam."}],
              "meta": text[0]["meta"]}]
    assert detect_answer_format(other) == "letter_first"
    assert qs.resolve_scoring("auto", "text_first") == "choice"
    assert qs.resolve_scoring("auto", "letter_first") == "letter"
    assert qs.resolve_scoring("auto", "text_first", "nanochat") == "letter"  # nanochat's prompt: a letter first
    assert qs.resolve_scoring("choice", "letter_first") == "choice"
    with pytest.raises(qs.EvaluationError, match="use --scoring choice"):
        qs.resolve_scoring("letter", "text_first")
    with pytest.raises(qs.EvaluationError, match="--answer_format must be one of"):
        qs.resolve_scoring("auto", "words")


# ----------------------------------------------------------------------------- meta of the wrong type

@pytest.mark.parametrize("change, message", [
    ({"choices": [None, "fish", "c2"]}, "meta.choices[0] must be a non-empty string, got None"),
    ({"choices": ["c0", ["x"], "c2"]}, "meta.choices[1] must be a non-empty string, got ['x']"),
    ({"choices": ["c0", " ", "c2"]}, "meta.choices[1] must be a non-empty string, got ' '"),
    ({"topic": ["physics"]}, "meta.topic must be a string or null, got ['physics']"),
    ({"subject": 3}, "meta.subject must be a string or null, got 3"),
    ({"pid": ["1"]}, "meta.pid must be a string or null, got ['1']"),
    ({"has_image": "yes"}, "meta.has_image must be true, false or null, got 'yes'"),
    ({"has_hint": 1}, "meta.has_hint must be true, false or null, got 1"),
    ({"answer_letter": "C"}, "meta.answer_letter 'C' does not match meta.answer 1 (B)"),
])
def test_check_question_refuses_meta_of_the_wrong_type(tmp_path, change, message):
    r = record("1", 1)
    r["meta"].update(change)
    with pytest.raises(qs.EvaluationError, match=re.escape(f"here: {message}")):
        qs.check_question(r, "here")
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps(record("0", 0)) + "\n" + json.dumps(r) + "\n")
    with pytest.raises(qs.EvaluationError, match=re.escape(f"{path}: record 2: {message}")):
        qs.load_questions(data_path=path)


def test_numeric_pids_pass_and_repeated_pids_are_refused(tmp_path):
    r = record("1", 1)
    r["meta"]["pid"] = 7
    assert qs.check_question(r, "here") == 3
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps(record(pid, 0)) + "\n" for pid in ("a", "b", "a")))
    with pytest.raises(qs.EvaluationError, match=r"record 3: pid 'a' repeats record 1's; each question needs its own"):
        qs.load_questions(data_path=path)


def test_a_bad_source_record_stops_evaluation_or_is_skipped_and_counted(tmp_path):
    good = {"question": "Q", "choices": ["a", "b"], "answer": 1, "hint": "", "image": None}
    (tmp_path / "problems.json").write_text(json.dumps({"1": good, "2": {**good, "hint": 5}}))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"val": ["1", "2"]}))
    with pytest.raises(UserError, match=r"problems.json: pid '2': bad hint \(a number \(5\), not a string or null\)"):
        qs.load_questions(scienceqa=str(tmp_path), split="val")
    records, info = qs.load_questions(scienceqa=str(tmp_path), split="val", skip_bad_records=True)
    assert [r["meta"]["pid"] for r in records] == ["1"]
    assert info["skipped"] == {"bad hint (a number (5), not a string or null)": 1} and info["available"] == 2


def test_majority_row_falls_back_when_the_train_file_is_unusable(tmp_path):
    evaluated = [record("1", 1), record("2", 1), record("3", 0)]
    for r in evaluated:
        del r["meta"]["answer_letter"]  # check_question does not need it
    train = tmp_path / "train.jsonl"
    train.write_text("not json\n")
    counts, source = qs.train_letter_counts(evaluated, train_path=train)
    assert counts == {"B": 2, "A": 1} and source.startswith("the evaluated questions (train split unavailable: ")
    odd = record("4", 0)
    odd["meta"]["answer_letter"] = "AB"
    train.write_text(json.dumps(record("5", 2)) + "\n" + json.dumps(odd) + "\n")
    assert qs.train_letter_counts(evaluated, train_path=train) == ({"C": 1}, str(train))

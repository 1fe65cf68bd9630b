import json
import warnings

import pytest

from sciassist.data.conversations import (
    ConversationError,
    Conversations,
    check_messages,
    read_conversations,
    split_validation,
    write_conversations,
)

SYS = {"role": "system", "content": "Be brief."}
U1 = {"role": "user", "content": "What is 2+2?"}
A1 = {"role": "assistant", "content": "4"}
U2 = {"role": "user", "content": "And 3+3?"}
A2 = {"role": "assistant", "content": "6"}


def write_lines(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def dumps(obj):
    return json.dumps(obj, ensure_ascii=False)


# ----------------------------------------------------------------------------- check_messages

def test_check_messages_accepts_valid_conversations():
    assert check_messages([U1, A1]) is None
    assert check_messages([SYS, U1, A1, U2, A2]) is None
    assert check_messages([U1, A1, U2]) is None  # a trailing question is allowed
    assert check_messages([U1], require_assistant=False) is None


@pytest.mark.parametrize("messages, expected", [
    ("hello", "conversation: expected a list of messages, got str"),
    ([], "conversation: no messages"),
    (["hi"], "message 0: expected a dict with 'role' and 'content', got str"),
    ([{"role": "bot", "content": "x"}],
     "message 0: unknown role 'bot', expected one of ['system', 'user', 'assistant']"),
    ([{"role": "user"}], "message 0 (user): missing 'content'"),
    ([{"role": "user", "content": 3}], "message 0 (user): content must be a string, got int"),
    ([U1, {"role": "assistant", "content": "  \n"}], "message 1 (assistant): content is empty"),
    ([U1, SYS, A1], "message 1 (system): a system message may only be the first message"),
    ([A1, U1], "message 0: expected role 'user' first, got 'assistant' (roles must alternate user/assistant)"),
    ([U1, U2, A1], "message 1: expected role 'assistant' after message 0 (user), got 'user' "
                   "(roles must alternate user/assistant)"),
    ([SYS, U1], "message 1: conversation has no assistant message to train on"),
    ([U1, {"role": "assistant", "content": ["x"]}], "message 1 (assistant): part 0 must be a dict, got str"),
])
def test_check_messages_names_the_problem(messages, expected):
    assert check_messages(messages) == expected


def test_check_messages_system_only():
    assert check_messages([SYS], require_assistant=False) == (
        "message 0 (system): a system message must be followed by a user message")


def test_check_messages_accepts_nanochat_tool_parts():
    parts = [{"type": "text", "text": "Let me compute."}, {"type": "python", "text": "2+2"}]
    assert check_messages([U1, {"role": "assistant", "content": parts}]) is None


# ----------------------------------------------------------------------------- read_conversations

def test_read_objects_bare_arrays_blank_lines_and_extra_keys(tmp_path):
    path = write_lines(tmp_path, [
        dumps({"messages": [SYS, U1, A1], "meta": {"pid": "7"}}),
        "",
        "   ",
        dumps([U2, A2]),
    ])
    records = read_conversations(path)
    assert isinstance(records, list) and isinstance(records, Conversations)
    assert records == [
        {"messages": [SYS, U1, A1], "meta": {"pid": "7"}},
        {"messages": [U2, A2]},
    ]
    assert records.skipped == []
    assert records.skipped_summary() == f"{path}: 2 conversations, none skipped"


def test_read_handles_utf8_bom_and_unicode(tmp_path):
    path = tmp_path / "bom.jsonl"
    text = dumps({"messages": [{"role": "user", "content": "température ° 30°"}, A1]})
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8") + b"\n")
    assert read_conversations(path)[0]["messages"][0]["content"] == "température ° 30°"


@pytest.mark.parametrize("bad_line, problem", [
    ('{"messages": [', "invalid JSON (Expecting value at column 15)"),
    (dumps({"messages": [A1, U1]}), "message 0: expected role 'user' first, got 'assistant'"),
    (dumps({"messages": [U1, {"role": "assistant", "content": ""}]}), "message 1 (assistant): content is empty"),
    (dumps({"messages": [{"role": "user", "content": ["x"]}, A1]}), "content must be a string, got list"),
    (dumps({"messages": [SYS, U1]}), "no assistant message to train on"),
    (dumps({"conversation": [U1, A1]}), "expected a 'messages' key (keys found: conversation)"),
    ("42", "expected an object with 'messages' or an array of messages, got int"),
])
def test_read_error_names_file_line_and_problem(tmp_path, bad_line, problem):
    path = write_lines(tmp_path, [dumps({"messages": [U1, A1]}), "", bad_line])
    with pytest.raises(ConversationError) as info:
        read_conversations(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message


def test_read_error_on_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(dumps({"messages": [U1, A1]}).encode() + b"\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(ConversationError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_conversations(path)


def test_read_empty_and_blank_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = write_lines(tmp_path, ["", "  ", ""], name="blank.jsonl")
    for path in (empty, blank):
        with pytest.raises(ConversationError) as info:
            read_conversations(path)
        assert str(info.value) == f"{path}: no conversations (the file is empty or blank)"


def test_read_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_conversations(tmp_path / "nope.jsonl")


def test_skip_bad_reports_which_lines(tmp_path):
    path = write_lines(tmp_path, [
        dumps({"messages": [U1, A1]}),
        "not json",
        dumps({"messages": [U1]}),
        dumps([U2, A2]),
    ])
    with pytest.warns(UserWarning, match=r"2 conversations, skipped 2 bad lines \(line 2: invalid JSON"):
        records = read_conversations(path, skip_bad=True)
    assert [r["messages"] for r in records] == [[U1, A1], [U2, A2]]
    assert [(s.line, s.problem) for s in records.skipped] == [
        (2, "invalid JSON (Expecting value at column 1)"),
        (3, "message 0: conversation has no assistant message to train on"),
    ]


def test_skip_bad_with_nothing_left_is_an_error(tmp_path):
    path = write_lines(tmp_path, ["nope", "[]"])
    with pytest.raises(ConversationError, match=r"no conversations \(2 bad lines skipped\)"):
        read_conversations(path, skip_bad=True)


def test_skip_bad_with_nothing_left_names_the_first_problem(tmp_path):
    path = write_lines(tmp_path, ["nope", "[]"])
    with pytest.raises(ConversationError) as error:
        read_conversations(path, skip_bad=True)
    assert str(error.value) == (f"{path}: no conversations (2 bad lines skipped); the first, line 1: invalid JSON "
                                f"(Expecting value at column 1)")


ARRAY_ON_ONE_LINE = ("a JSON array of {n} on one line: the file is a JSON array, not JSONL (one conversation per "
                     "line); write each {{\"messages\": [...]}} object on its own line")


@pytest.mark.parametrize("conversations, n", [
    ([{"messages": [U1, A1]}, {"messages": [U2, A2], "meta": {}}], "2 conversations"),
    ([{"messages": [U1, A1]}], "1 conversation"),
    ([[U1, A1], [U2, A2]], "2 conversations"),  # bare message arrays
])
def test_a_json_array_of_conversations_on_one_line_says_so(tmp_path, conversations, n):
    path = write_lines(tmp_path, [dumps({"messages": [U1, A1]}), dumps(conversations)])
    with pytest.raises(ConversationError) as error:
        read_conversations(path)
    assert str(error.value) == f"{path}:2: " + ARRAY_ON_ONE_LINE.format(n=n)
    with pytest.warns(UserWarning, match="skipped 1 bad lines"):
        records = read_conversations(path, skip_bad=True)
    assert records.skipped[0].problem == ARRAY_ON_ONE_LINE.format(n=n)  # counted, named: not silently lost


@pytest.mark.parametrize("document, kind, first_line_error", [
    ([{"messages": [U1, A1]}, {"messages": [U2, A2]}], "a JSON array", "Expecting value at column 2"),
    ({"messages": [U1, A1]}, "a JSON object", "Expecting property name enclosed in double quotes at column 2"),
])
def test_a_whole_file_json_document_is_not_jsonl_even_with_skip_bad(tmp_path, document, kind, first_line_error):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    for skip_bad in (False, True):
        with pytest.raises(ConversationError) as error:
            read_conversations(path, skip_bad=skip_bad)
        assert str(error.value) == (f"{path}:1: invalid JSON ({first_line_error}); the whole file is {kind} spread "
                                    f"over several lines, not JSONL (one conversation per line)")


def test_a_bad_first_line_that_is_no_json_document_is_a_plain_line_error(tmp_path):
    path = write_lines(tmp_path, ["[", dumps([U1, A1])])
    with pytest.raises(ConversationError, match=r":1: invalid JSON \(Expecting value at column 2\)$"):
        read_conversations(path)


def test_skipped_summary_truncates_long_lists():
    conv = Conversations([{"messages": [U1, A1]}], "f.jsonl")
    from sciassist.data.conversations import SkippedLine
    conv.skipped = [SkippedLine(i, "bad") for i in range(1, 9)]
    assert conv.skipped_summary(limit=2) == (
        "f.jsonl: 1 conversations, skipped 8 bad lines (line 1: bad; line 2: bad; ... 6 more)"
    )


def test_require_assistant_false_reads_prompt_files(tmp_path):
    path = write_lines(tmp_path, [dumps([U1])])
    assert read_conversations(path, require_assistant=False) == [{"messages": [U1]}]


# ----------------------------------------------------------------------------- write_conversations

def test_write_then_read_round_trips(tmp_path):
    records = [
        {"messages": [SYS, U1, A1], "meta": {"pid": "1", "answer": 0}},
        [{"role": "user", "content": "Ünïcode ✓"}, A2],
    ]
    path = tmp_path / "nested" / "out.jsonl"
    assert write_conversations(path, records) == 2
    text = path.read_text(encoding="utf-8")
    assert "Ünïcode ✓" in text  # written as UTF-8, not \u escapes
    assert text.count("\n") == 2
    assert read_conversations(path) == [records[0], {"messages": records[1]}]
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind


def test_write_refuses_bad_records_and_leaves_file_untouched(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text("previous\n")
    with pytest.raises(ConversationError) as info:
        write_conversations(path, [{"messages": [U1, A1]}, {"messages": [U1, U2]}])
    assert str(info.value) == (
        f"{path}: record 1: message 1: expected role 'assistant' after message 0 (user), got 'user' "
        "(roles must alternate user/assistant)"
    )
    assert path.read_text() == "previous\n"


# ----------------------------------------------------------------------------- split_validation

def test_split_validation_takes_the_last_fraction():
    train, val = split_validation(list(range(10)), 0.2)
    assert train == list(range(8)) and val == [8, 9]
    train, val = split_validation(list(range(10)), 0.25)  # int(2.5) = 2, as the workshop did
    assert train == list(range(8)) and val == [8, 9]


def test_split_validation_keeps_one_on_each_side():
    train, val = split_validation(list(range(5)), 0.01)  # rounds to 0 -> still one
    assert train == [0, 1, 2, 3] and val == [4]
    train, val = split_validation(["a", "b"], 0.9)
    assert train == ["a"] and val == ["b"]


@pytest.mark.parametrize("records, fraction, message", [
    ([1], 0.1, "need at least 2 conversations"),
    ([], 0.1, "need at least 2 conversations"),
    ([1, 2, 3], 0.0, "strictly between 0 and 1"),
    ([1, 2, 3], 1.0, "strictly between 0 and 1"),
    ([1, 2, 3], -0.5, "strictly between 0 and 1"),
    ([1, 2, 3], "0.1", "strictly between 0 and 1"),
])
def test_split_validation_errors(records, fraction, message):
    with pytest.raises(ValueError, match=message):
        split_validation(records, fraction)


def test_no_warning_when_nothing_skipped(tmp_path):
    path = write_lines(tmp_path, [dumps([U1, A1])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_conversations(path, skip_bad=True)

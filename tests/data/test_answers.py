"""The answer protocol: writing option lines and answer lines, parsing replies strictly."""

import pytest

from sciassist.data import answers as ans
from sciassist.data.scienceqa import FormatOptions, format_record


def test_answer_line_in_both_formats():
    assert ans.answer_line(["ice", "steam"], 0, "text_first") == "The correct answer is ice (A)."
    assert ans.answer_line(["ice", "steam"], 0) == "The correct answer is A. ice"
    with pytest.raises(ValueError, match="answer_format must be one of"):
        ans.answer_line(["ice", "steam"], 0, "words")


def test_options_block_in_both_layouts():
    assert ans.options_block(["ice", "steam"], "letter_after") == "ice (A)\nsteam (B)"
    assert ans.options_block(["ice", "steam"]) == "A. ice\nB. steam"
    with pytest.raises(ValueError, match="options_layout must be one of"):
        ans.options_block(["ice", "steam"], "sideways")


def test_question_stem_keeps_an_unknown_layout_whole():
    assert ans.question_stem("Pick one: ice or tea?", ["ice", "tea"]) == "Pick one: ice or tea?"


def test_detect_answer_format():
    raw = {"pid": "1", "question": "Which is hot?", "choices": ["ice", "steam"], "answer": 1, "hint": ""}
    text = [format_record(raw, FormatOptions(answer_format="text_first"))] * 2
    letter = [format_record(raw, FormatOptions())]
    assert text[0]["messages"][-1]["content"].startswith("The correct answer is steam (B).")
    assert ans.detect_answer_format(text) == "text_first"
    assert ans.detect_answer_format(letter) == "letter_first"
    assert ans.detect_answer_format(text + letter) == "letter_first"  # mixed: the default
    other = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Steam."}],
              "meta": text[0]["meta"]}]
    assert ans.detect_answer_format(other) == "letter_first"


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
    assert ans.parse_answer(text, num_choices) == expected


@pytest.mark.parametrize("text, expected", [("B", 1), (" C.", 2), ("A) wood", 0), ("A dog", None), ("a", None),
                                            ("The answer is B", None), ("E", None)])
def test_parse_answer_nanochat_style(text, expected):
    assert ans.parse_answer(text, 4, answer_prefix="") == expected


def test_choice_lines_follow_the_training_answer_line():
    assert ans.choice_lines(ans.ANSWER_PREFIX, ["ice", "steam"]) == ["The correct answer is A. ice",
                                                                   "The correct answer is B. steam"]
    assert ans.choice_lines(ans.ANSWER_PREFIX, ["ice", "steam"], "text_first") == [
        "The correct answer is ice (A).", "The correct answer is steam (B)."]


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
    assert ans.parse_answer(text, 3, choices=choices, answer_format="text_first") == expected


def test_question_stem_strips_either_options_layout():
    for layout in ("letter_first", "letter_after"):
        content = "Which is hot?\n\n" + ans.options_block(["ice", "steam"], layout)
        assert ans.question_stem(content, ["ice", "steam"]) == "Which is hot?"


def test_text_first_breakdown_counts_named_options_and_their_letters():
    records = [{"meta": {"choices": ["ice", "steam"]}}] * 4
    texts = ["The correct answer is steam (B).", "The correct answer is Steam (A).", "The correct answer is fog (A).",
             "no answer"]
    assert ans.text_first_breakdown(texts, records) == {"names_an_option": 2, "letter_matches_text": 1}


def test_parse_answer_text_first_multiline_and_prefix_options():
    letters = ["Love,\nZoe", "love,\nZoe"]
    def parse(reply):
        return ans.parse_answer(reply, 2, choices=letters, answer_format="text_first")

    assert parse("The correct answer is Love,\nZoe (A).") == 0
    # options that differ only in case: the reply names the one whose letter it gives
    assert parse("The correct answer is love,\nZoe (B).") == 1
    assert parse("The correct answer is Love,\nZoe (C).") is None
    stems = ["a tall stem", "a tall stem and leaves"]
    reply = "The correct answer is a tall stem and leaves (B)."
    assert ans.parse_answer(reply, 2, choices=stems, answer_format="text_first") == 1


def test_parse_answer_text_first_needs_choices():
    with pytest.raises(ValueError, match="choices"):
        ans.parse_answer("The correct answer is ice (A).", 2, answer_format="text_first")


@pytest.mark.parametrize(
    "text, letters",
    [
        ("Which is a mammal?\n\nA. shark\nB. dolphin\nC. trout", ["A", "B", "C"]),
        ("Options: (A) rock (B) tree", []),  # options on one line are not detected
        ("Pick one\n(A) rock\n(B) tree", ["A", "B"]),
        ("Pick one\nA) rock\nB) tree\nD) skipped", ["A", "B"]),
        ("Just a question about vitamin A.", []),
        ("A. only one option", []),
        ("B. starts late\nC. nope", []),
        ("Which is hot?\n\nice (A)\nsteam (B)", ["A", "B"]),  # the letter_after layout
        ("Is it (A) or not?\nmaybe (B)", []),                 # "(A)" inside a sentence's line is not an option
    ],
)
def test_question_options_letters(text, letters):
    assert [letter for letter, _ in ans.question_options(text)] == letters


def test_question_options_reads_both_layouts():
    assert ans.question_options("Which is hot?\n\nA. ice\nB. hot steam") == [("A", "ice"), ("B", "hot steam")]
    assert ans.question_options("Pick\n(A) rock\n(B) tree") == [("A", "rock"), ("B", "tree")]
    assert ans.question_options("Which is hot?\n\nice (A)\nhot steam (B)") == [("A", "ice"), ("B", "hot steam")]
    assert ans.question_options("A. only one") == []

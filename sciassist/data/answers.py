"""The answer protocol: how a multiple-choice question's options and its answer line are
written, and how a reply is read back. Data preparation writes with these functions,
evaluation scores and parses with them, the web page reads a pasted question with them.

Options, two layouts:      letter_first  "A. ice"          letter_after  "ice (A)"
Answer line, two formats:  letter_first  "The correct answer is B. steam"
                           text_first    "The correct answer is steam (B)."

A reply is parsed strictly (parse_answer): only the FIRST "The correct answer is" counts, the
letter must be a capital standing alone, and a text_first reply must name its letter's own
option. An answer that does not parse is invalid, never guessed.
"""

import re
from collections import Counter

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # option i is LETTERS[i]
ANSWER_PREFIX = "The correct answer is"
ANSWER_FORMATS = ("letter_first", "text_first")
OPTIONS_LAYOUTS = ("letter_first", "letter_after")


# ----------------------------------------------------------------------------- writing

def answer_line(choices, answer, answer_format="letter_first"):
    """The first line of the reference answer for option index `answer`."""
    if answer_format == "text_first":
        return f"{ANSWER_PREFIX} {choices[answer]} ({LETTERS[answer]})."
    if answer_format == "letter_first":
        return f"{ANSWER_PREFIX} {LETTERS[answer]}. {choices[answer]}"
    raise ValueError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, got {answer_format!r}")


def choice_lines(answer_prefix, choices, answer_format="letter_first"):
    """Every option's answer line (answer_line), with `answer_prefix` in place of
    "The correct answer is": what choice scoring compares."""
    lines = [answer_line(choices, i, answer_format) for i in range(len(choices))]
    return [answer_prefix + line[len(ANSWER_PREFIX):] for line in lines]


def options_block(choices, layout="letter_first"):
    """The question's option lines: "A. <choice>" (letter_first) or "<choice> (A)" (letter_after)."""
    if layout == "letter_after":
        return "\n".join(f"{choice} ({LETTERS[i]})" for i, choice in enumerate(choices))
    if layout == "letter_first":
        return "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    raise ValueError(f"options_layout must be one of {', '.join(OPTIONS_LAYOUTS)}, got {layout!r}")


def question_stem(text, choices):
    """A user message without its trailing option lines (either layout): the question, with the
    context lines the data format put before it."""
    for layout in OPTIONS_LAYOUTS:
        block = options_block(choices, layout)
        if text.endswith(block):
            return text[: -len(block)].rstrip()
    return text.rstrip()  # an unknown layout: keep everything rather than guess a cut


def detect_answer_format(records):
    """The answer format of the records' reference answers: "text_first" when some start with
    the text_first answer line and none with the letter_first one, else "letter_first" (the
    default, also for records whose answers follow neither, such as other chat data). Records
    without ScienceQA "meta" (choices, answer) are passed over."""
    found = Counter()
    for record in records:
        meta = record.get("meta") if isinstance(record, dict) else None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(meta, dict) or not messages or messages[-1].get("role") != "assistant":
            continue
        content, choices, answer = messages[-1].get("content"), meta.get("choices"), meta.get("answer")
        if not isinstance(content, str) or not isinstance(choices, list) or not isinstance(answer, int) \
                or not 0 <= answer < min(len(choices), len(LETTERS)):
            continue
        for answer_format in ANSWER_FORMATS:
            if content.startswith(answer_line(choices, answer, answer_format)):
                found[answer_format] += 1
    return "text_first" if found["text_first"] and not found["letter_first"] else "letter_first"


# ----------------------------------------------------------------------------- reading a reply

# The phrase may start a sentence or not ("The"/"the"); the letter must be upper case and
# stand alone: followed by . , : ; ) or the end of a line. So "The correct answer is a
# mammal" (the article) and "... is A dog" are not answers, and nothing after the phrase's
# first occurrence is searched ("vitamin C." in an explanation is never read as C).
_PHRASE_RE = re.compile(re.escape(ANSWER_PREFIX), re.IGNORECASE)
_LETTER_AFTER_PHRASE_RE = re.compile(r"[ \t]*:?[ \t]*(?:\(([A-Z])\)|\*\*([A-Z])\*\*|([A-Z])(?=[.,:;)]|[ \t]*(?:\n|$)))")
_LETTER_ALONE_RE = re.compile(r"\s*(?:\(([A-Z])\)|\*\*([A-Z])\*\*|([A-Z])(?=[.,:;)]|[ \t]*(?:\n|$)))")


def text_first_reply(text, choices, answer_prefix=ANSWER_PREFIX):
    """What a text_first reply names: after the first answer phrase, an option's text (case
    aside, any run of whitespace, newlines included where the option has one) followed by
    "(X)" that ends a line (a final "." allowed). Returns the index of the option it names
    (when options differ only in case, the one whose letter it gives, else the first) and
    the letter; (None, None) when no option's text stands there."""
    found = re.compile(re.escape(answer_prefix), re.IGNORECASE).search(text or "")
    if found is None:
        return None, None
    named = []
    for i, choice in enumerate(choices):
        words = r"\s+".join(re.escape(word) for word in choice.split())
        match = re.compile(r"[ \t]*:?[ \t]*(?i:" + words + r")[ \t]*\(([A-Z])\)\.?[ \t]*(?:\n|$)").match(
            text, found.end())
        if match:
            named.append((i, match.group(1)))
    if not named:
        return None, None
    return next(((i, letter) for i, letter in named if LETTERS[i] == letter), named[0])


def text_first_breakdown(texts, records, answer_prefix=ANSWER_PREFIX):
    """Why text_first replies are invalid: how many name an option's text (spacing and case
    aside) before "(X)", and of those how many give that option's own letter. A model that
    knows the answer but cannot bind letters to options names texts with random letters."""
    names_option = letter_matches = 0
    for text, record in zip(texts, records, strict=True):
        named, letter = text_first_reply(text, record["meta"]["choices"], answer_prefix)
        if named is not None:
            names_option += 1
            letter_matches += LETTERS[named] == letter
    return {"names_an_option": names_option, "letter_matches_text": letter_matches}


def parse_answer(text, num_choices, answer_prefix=ANSWER_PREFIX, choices=None, answer_format="letter_first"):
    """The option index a reply states, or None when it does not state one strictly.

    With the SciAssist prefix: the FIRST "The correct answer is" (any case of the phrase),
    then a capital letter among the question's letters, alone: "B", "B.", "(B)", "**B**",
    "B: dog", "B," or "B" at the end of a line. Rejected, on purpose: "The correct answer is
    a mammal" / "... is a" (lower case: the article "a" is indistinguishable from option a;
    training always writes capitals), "The correct answer is A dog" (a capital article),
    "the answer is B" (not the trained phrase), a letter beyond the question's options, and
    any letter found later in the text (e.g. "vitamin C." in an explanation).
    With answer_prefix "" (nanochat style): the reply must begin with such a lone letter.

    answer_format "text_first" (needs `choices`): the first "The correct answer is" must be
    followed by an option's text and then "(X)" ending the line (a final "." allowed), and the
    text must be option X's (spacing and case aside; an option written over several lines may
    be). A reply that names one option's text with another's letter, or a text that is no
    option, is invalid.
    """
    if text is None:
        return None
    if answer_format == "text_first" and answer_prefix:
        if choices is None:
            raise ValueError("parse_answer: the text_first format needs the question's choices")
        named, letter = text_first_reply(text, choices[:num_choices], answer_prefix)
        return named if named is not None and LETTERS[named] == letter else None
    if answer_prefix:
        phrase = _PHRASE_RE if answer_prefix == ANSWER_PREFIX else re.compile(re.escape(answer_prefix), re.IGNORECASE)
        found = phrase.search(text)
        if found is None:
            return None
        match = _LETTER_AFTER_PHRASE_RE.match(text, found.end())
    else:
        match = _LETTER_ALONE_RE.match(text)
    if match is None:
        return None
    letter = next(g for g in match.groups() if g)
    index = LETTERS.find(letter)
    return index if 0 <= index < num_choices else None


# ----------------------------------------------------------------------------- reading a question

_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s*\S")                # "A. ..", "B) ..", "(C) .."
_OPTION_LINE_LETTER_AFTER = re.compile(r"^\s*\S.*\s\(([A-Z])\)\s*$")  # "<option> (A)"


def question_options(text):
    """(letter, option text) of a pasted multiple-choice question's options: lines "A. ...",
    "B) ...", "(C) ...", or "... (A)", consecutive from A. Fewer than two means it is not
    multiple choice (an empty list)."""
    options = []
    for line in text.splitlines():
        first = _OPTION_LINE.match(line)
        match = first or _OPTION_LINE_LETTER_AFTER.match(line)
        if match and match.group(1) == LETTERS[len(options)]:
            if first:
                option = line[first.end() - 1:].strip()
            else:
                option = line[: line.rindex("(" + match.group(1) + ")")].strip()
            options.append((match.group(1), option))
            if len(options) == len(LETTERS):
                break
    return options if len(options) >= 2 else []

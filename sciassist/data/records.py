"""What makes a raw ScienceQA record unusable, field by field (sciassist.data.scienceqa loads
records, formats them and skips the unusable ones).

Two kinds of unusable record:
  - missing text: question, choices or answer is null (ScienceQA has such image-only
    questions); always skipped and counted, never an error (missing_text);
  - a bad record: a field of the wrong type or out of range (record_problem): choices a list
    of 2 to 26 non-empty strings, answer an index into them, question a string, the
    optional text fields (hint, caption, lecture, solution, subject, ...) a string or null.
    Loading refuses a bad record, naming its file, pid and field, unless asked to skip
    such records (then they are skipped and counted like missing text).
"""

from sciassist.data.answers import LETTERS

# Fields a record needs before it can become a question; never filled in by guessing.
TEXT_FIELDS = ("question", "choices", "answer")
# Text a record may have: a string, or null (or "") for none.
OPTIONAL_TEXT_FIELDS = ("hint", "caption", "lecture", "solution", "task", "grade", "subject", "topic", "category",
                        "skill")
# Set on the stand-in for a source entry that is not a record at all (e.g. a list in problems.json).
INVALID = "invalid"


def json_type(value) -> str:
    """A value's kind in JSON words, for messages: "null", "a number", "a list", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


def missing_text(record) -> list[str]:
    """The names of TEXT_FIELDS that are null (or absent) in the record."""
    return [name for name in TEXT_FIELDS if record.get(name) is None]


def invalid_record(pid, split, raw) -> dict:
    """The stand-in kept for a source entry that is not an object: it keeps the split's
    positions (subsets are drawn over the whole split) and says what it was."""
    record = {name: None for name in ("question", "choices", "answer", "hint", "has_image", "caption")}
    return {"pid": str(pid), "split": split, **record, INVALID: f"bad record ({json_type(raw)}, not an object)"}


def _choices_problem(choices):
    if not isinstance(choices, list):
        return f"bad choices ({json_type(choices)}, not a list of strings)"
    if len(choices) < 2:
        return "fewer than 2 choices"
    if len(choices) > len(LETTERS):
        return f"more than {len(LETTERS)} choices"
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            return f"bad choices (choice {LETTERS[i]} is {json_type(choice)}, not a string)"
        if not choice.strip():
            return f"bad choices (choice {LETTERS[i]} is empty)"
    return None


def record_problem(record) -> str | None:
    """What makes a record whose text is there unusable (a short label naming the field, also
    the report's skip reason), or None. A record with missing text has no problem here:
    missing_text says what it lacks."""
    if record.get(INVALID):
        return record[INVALID]
    if missing_text(record):
        return None
    choices, answer = record["choices"], record["answer"]
    problem = _choices_problem(choices)
    if problem:
        return problem
    if isinstance(answer, bool) or (isinstance(answer, int) and not 0 <= answer < len(choices)):
        return "answer index out of range"
    if not isinstance(answer, int):
        return f"bad answer ({json_type(answer)}, not an option index)"
    if not isinstance(record["question"], str):
        return f"bad question ({json_type(record['question'])}, not a string)"
    for name in OPTIONAL_TEXT_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            return f"bad {name} ({json_type(value)}, not a string or null)"
    return None

"""Which questions are evaluated, and how each is put to a model.

Questions are JSONL-shaped records ({"messages", "meta"}) with ScienceQA's meta (choices,
answer index, and where known subject, grade, topic, hint, image), read from a prepared file
or formatted straight from a ScienceQA source. A prompt style turns a record into the
messages a model sees and says what the reply starts with (the answer prefix); the scoring
rule follows from the answer format (resolve_scoring).
"""

from collections import Counter
from pathlib import Path

from sciassist.common import UserError
from sciassist.data import scienceqa as sqa
from sciassist.data.answers import ANSWER_FORMATS, ANSWER_PREFIX, LETTERS, question_stem
from sciassist.data.conversations import read_conversations

MAX_CHOICES = 5  # ScienceQA questions have 2 to 5 options
NANOCHAT_QUESTION_PREFIX = "Multiple Choice question: "
NANOCHAT_INSTRUCTION = "Respond only with the letter of the correct answer."
PROMPT_STYLES = ("sciassist", "nanochat")
SCORING_MODES = ("letter", "choice")


class EvaluationError(UserError, ValueError):
    """Bad evaluation input (data, settings, files); the message says what to fix."""


# ----------------------------------------------------------------------------- reading questions

META_TEXT = ("pid", "split", "subject", "grade", "topic", "category")  # a string (pid: or a number) or null
META_FLAGS = ("has_image", "has_hint")  # true, false or null (unknown)


def _meta_problem(meta, choices):
    """What is wrong with a meta's other fields (beside choices and answer), or None."""
    for i, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice.strip():
            return f"meta.choices[{i}] must be a non-empty string, got {choice!r}"
    for name in META_TEXT:
        value = meta.get(name)
        number_pid = name == "pid" and isinstance(value, int) and not isinstance(value, bool)
        if value is not None and not isinstance(value, str) and not number_pid:
            return f"meta.{name} must be a string or null, got {value!r}"
    for name in META_FLAGS:
        value = meta.get(name)
        if value is not None and not isinstance(value, bool):
            return f"meta.{name} must be true, false or null, got {value!r}"
    letter = meta.get("answer_letter")
    if letter is not None and letter != LETTERS[meta["answer"]]:
        return f"meta.answer_letter {letter!r} does not match meta.answer {meta['answer']} ({LETTERS[meta['answer']]})"
    return None


def check_question(record, where):
    """A ScienceQA JSONL record must carry meta with choices (2-5 non-empty strings) and the
    answer index, its other meta fields of the types sciassist.data.scienceqa writes
    (strings or null; has_image / has_hint true, false or null); returns the number of choices."""
    meta = record.get("meta") if isinstance(record, dict) else None
    if not isinstance(meta, dict):
        raise EvaluationError(f"{where}: no 'meta' object; evaluation needs ScienceQA records as written by "
                              f"sciassist.data.scienceqa (meta with choices and answer)")
    choices, answer = meta.get("choices"), meta.get("answer")
    if not isinstance(choices, list) or not 2 <= len(choices) <= MAX_CHOICES:
        raise EvaluationError(f"{where}: meta.choices must be a list of 2 to {MAX_CHOICES} options, got {choices!r}")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise EvaluationError(f"{where}: meta.answer must be an index into the {len(choices)} choices, got {answer!r}")
    problem = _meta_problem(meta, choices)
    if problem:
        raise EvaluationError(f"{where}: {problem}")
    if not isinstance(record.get("messages"), list) or not record["messages"]:
        raise EvaluationError(f"{where}: no 'messages' list")
    return len(choices)


def question_pid(record, index):
    pid = record.get("meta", {}).get("pid")
    return str(pid) if pid is not None else str(index)


def _from_source(scienceqa, split, limit, seed, answer_format, skip_bad_records=False):
    raw = sqa.load_scienceqa(scienceqa, split, skip_bad_records=skip_bad_records)
    available = len(raw)
    if limit is not None:
        raw = sqa.select_subset(raw, limit, seed)
    skipped = Counter(sqa.skip_reason(r) for r in raw)
    skipped.pop(None, None)
    options = sqa.FormatOptions(answer_format=answer_format)
    records = [sqa.format_record(r, options) for r in raw if sqa.skip_reason(r) is None]
    info = {"source": f"scienceqa:{scienceqa}", "split": split, "available": available,
            "selected": len(raw), "skipped": dict(skipped), "count": len(records),
            "selection": f"seeded subset (seed {seed})" if limit is not None else "whole split"}
    return records, info


def _from_file(data_path, split, limit):
    path = Path(data_path if data_path is not None else f"data/scienceqa_{split}.jsonl")
    if not path.is_file():
        raise EvaluationError(f"{path}: no such file; prepare it with `python -m sciassist.data.prepare` "
                              f"or evaluate straight from a source with --scienceqa sample|hf|DIR")
    records = list(read_conversations(path))
    available = len(records)
    if limit is not None:
        records = records[:limit]
    info = {"source": str(path), "split": split, "available": available, "selected": len(records),
            "skipped": {}, "count": len(records),
            "selection": f"first {limit} records" if limit is not None else "whole file"}
    return records, info


def load_questions(data_path=None, scienceqa=None, split="val", limit=None, seed=42, answer_format="letter_first",
                   skip_bad_records=False):
    """The questions to evaluate, as JSONL-shaped records ({"messages", "meta"}).

    From a prepared JSONL file (data_path; --limit takes its first N lines, as the file is
    already a seeded subset) or straight from a ScienceQA source (scienceqa = sample | hf |
    DIR; --limit draws the same seeded subset that sciassist.data.scienceqa's prepare would;
    formatted with the default FormatOptions and `answer_format`; skip_bad_records: leave out
    and count the source's bad records instead of stopping). Every record is checked
    (check_question) and pids must not repeat (predictions are keyed by pid). Returns
    (records, description dict).
    """
    if data_path is not None and scienceqa is not None:
        raise EvaluationError("give either --data_path or --scienceqa, not both")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1, got {limit}")
    if scienceqa is not None:
        records, info = _from_source(scienceqa, split, limit, seed, answer_format, skip_bad_records)
    else:
        records, info = _from_file(data_path, split, limit)
    if not records:
        raise EvaluationError(f"no questions to evaluate from {info['source']} ({info['split']})")
    seen = {}
    for i, record in enumerate(records):
        check_question(record, f"{info['source']}: record {i + 1}")
        pid = question_pid(record, i)
        if pid in seen:
            raise EvaluationError(f"{info['source']}: record {i + 1}: pid {pid!r} repeats record {seen[pid] + 1}'s; "
                                  f"each question needs its own pid (the predictions are keyed by it)")
        seen[pid] = i
    return records, info


def _answer_letters(train):
    """Gold-letter counts of records with a usable meta.answer_letter (others are passed over)."""
    letters = [r["meta"].get("answer_letter") for r in train if isinstance(r.get("meta"), dict)]
    return Counter(x for x in letters if isinstance(x, str) and len(x) == 1 and x in LETTERS)


def train_letter_counts(records, train_path=None, scienceqa=None, data_path=None, split="val"):
    """Gold-letter counts for the majority row: of the TRAIN split when it can be found
    (train_path, data/scienceqa_train.jsonl beside data_path, or the train split of the
    `scienceqa` source), else of the evaluated questions. Returns (counts, source)."""
    try:
        if train_path is not None:
            return _answer_letters(read_conversations(train_path)), str(train_path)
        if scienceqa is not None:
            raw = sqa.load_scienceqa(scienceqa, "train")
            counts = Counter(LETTERS[r["answer"]] for r in raw if sqa.skip_reason(r) is None)
            if counts:
                return counts, f"train split of scienceqa:{scienceqa}"
        else:
            evaluated = Path(data_path or f"data/scienceqa_{split}.jsonl")
            candidate = evaluated.with_name("scienceqa_train.jsonl")
            if candidate.is_file() and candidate.resolve() != evaluated.resolve():
                counts = _answer_letters(read_conversations(candidate))
                if counts:
                    return counts, str(candidate)
    except Exception as e:  # the majority row is a baseline: fall back, and say so
        fallback = Counter(LETTERS[r["meta"]["answer"]] for r in records)
        return fallback, f"the evaluated questions (train split unavailable: {e})"
    return Counter(LETTERS[r["meta"]["answer"]] for r in records), "the evaluated questions (no train split found)"


# ----------------------------------------------------------------------------- prompts

def resolve_scoring(scoring, answer_format, prompt_style="sciassist"):
    """The scoring rule to use ("auto": letter for letter_first, choice for text_first);
    an impossible combination is an EvaluationError."""
    if scoring not in (*SCORING_MODES, "auto"):
        raise EvaluationError(f"--scoring must be one of auto, {', '.join(SCORING_MODES)}, got {scoring!r}")
    if answer_format not in ANSWER_FORMATS:
        raise EvaluationError(f"--answer_format must be one of auto, {', '.join(ANSWER_FORMATS)}, "
                              f"got {answer_format!r}")
    if scoring == "auto":
        scoring = "choice" if answer_format == "text_first" and prompt_style == "sciassist" else "letter"
    if scoring == "letter" and answer_format == "text_first" and prompt_style == "sciassist":
        raise EvaluationError("letter scoring reads the letter right after \"The correct answer is\"; in the "
                              "text_first answer format the option text comes first: use --scoring choice")
    return scoring


def user_text(record):
    """The last user message's content (the question with its options)."""
    for message in reversed(record["messages"]):
        if message.get("role") == "user":
            return message["content"]
    raise EvaluationError(f"question {question_pid(record, '?')}: no user message")


def nanochat_prompt(record):
    """nanochat's multiple-choice prompt for one question: a single user message; the
    letter follows "=" so that it tokenizes the same way in the options as in the reply."""
    choices = record["meta"]["choices"]
    lines = [f"{NANOCHAT_QUESTION_PREFIX}{question_stem(user_text(record), choices)}"]
    lines += [f"- {choice}={LETTERS[i]}" for i, choice in enumerate(choices)]
    text = "\n".join(lines) + "\n\n" + NANOCHAT_INSTRUCTION
    return [{"role": "user", "content": text}]


def prompts_for(records, prompt_style):
    """(prompts as message lists, answer prefix) for a prompt style."""
    if prompt_style == "sciassist":
        return [r["messages"] for r in records], ANSWER_PREFIX
    if prompt_style == "nanochat":
        return [nanochat_prompt(r) for r in records], ""
    raise EvaluationError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")

"""
ScienceQA as chat conversations for supervised fine-tuning.

Sources, one function (`load_scienceqa(source, split)`) and one flag everywhere (`--scienceqa`):
  hf      the Hugging Face hub dataset derek-thomas/ScienceQA, pinned to the revision the
          original project used. Images are never decoded (only whether one exists is read).
          Hub rows carry no problem id, so pid is "<split>-<row>" (e.g. "test-17").
  sample  the small sample written for this repository, sciassist/data/sample/questions.jsonl: one
          question per line, the lupantech problem fields plus "pid", "split" and
          "caption" (a directory holding such a questions.jsonl reads the same way).
  DIR     a directory in the lupantech layout: problems.json (pid -> record) and
          pid_splits.json (split -> ordered pids), optionally captions.json
          ({"captions": {pid: text}}), e.g. ../shared/scienceqa.
Splits are called train / val / test here (the hub's "validation" is our "val").

Subsets, as the original did with `ds.shuffle(seed=42).select(range(n))` on the hub: the
first n rows of `numpy.random.default_rng(seed).permutation(len(split))`, which is the same
permutation `datasets` uses, applied to the split's order (pid_splits.json order equals the
hub's row order). The subset is drawn over the FULL split first and records with missing
text are skipped afterwards (the hub rows include them), so the same seed picks the same
questions from either source. n larger than the split takes the whole split (shuffled);
"all" means the same.

Chat layout (FormatOptions; defaults in brackets):

  system     SYSTEM_PROMPT (the original's tutor persona) [on; "" leaves it out]
  user       Context: <hint>                  <- include_hint [on], when the hint is non-empty
             Image: <caption>                 <- image_mode="caption" [default], image
                                                 questions that have a caption
             <blank line>                     <- only when one of the two lines above is there
             <question>
             <blank line>
             A. <choice 0>                    <- options_layout="letter_first" [default]
             B. <choice 1> ...
             (or "<choice 0> (A)" lines: options_layout="letter_after")
  assistant  The correct answer is B. <choice 1>      <- answer_format="letter_first" [default]
             The correct answer is <choice 1> (B).    <- answer_format="text_first"
             \\n\\nExplanation: <solution>     <- include_explanation [on], solution non-empty
             \\n\\nBackground: <lecture>       <- include_background [on], lecture non-empty

Both alternatives exist for small models trained from scratch, which learn which option
text is right long before they can name its letter (bench/RESULTS.md). letter_after: the
letter follows its option; attention is causal, so a letter written first cannot see the
option it stands for and a model has to look back from the option to it. text_first: the
reply names the option's text, then its letter. The defaults are the original's layout.

With include_hint off and image_mode "keep" (FormatOptions.original(), CLI
--original_format) the strings are byte-for-byte the original project's. image_mode "drop"
skips questions that have an image. Every record also carries "meta" (pid, split, choices,
answer index and letter, subject, grade, topic, category, has_image, has_hint; None where
the source does not know; lecture and solution, "" when missing).

Records are checked field by field when loaded (sciassist.data.records): a bad one (a field of
the wrong type, choices that are not 2+ strings, an answer out of range) is an error naming
its file, pid and field, or with skip_bad_records=True (--skip_bad_records) it is kept in
the split and skip_reason gives why, so it is skipped and counted like missing text.
"""

import json
import numbers
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from sciassist.common import UserError, setting
from sciassist.data.answers import ANSWER_FORMATS, LETTERS, OPTIONS_LAYOUTS, answer_line, options_block
from sciassist.data.records import invalid_record, json_type, missing_text, record_problem
from sciassist.hub import hub_unreachable

SYSTEM_PROMPT = (
    "You are a helpful science tutor for elementary through high school students. "
    "Explain concepts clearly with examples."
)
HF_DATASET = "derek-thomas/ScienceQA"
HF_REVISION = "f18b0a70359ebfb41f658fd564208d0355b013f4"
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 12000, "val": 4000, "test": 4000}
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"  # package data: installed with the wheel too
SAMPLE_FILE = "questions.jsonl"
IMAGE_MODES = ("caption", "keep", "drop")
OFFLINE_ADVICE = ("use --scienceqa DIR (a lupantech-layout copy: problems.json + pid_splits.json) or --scienceqa "
                  "sample, or HF_HUB_OFFLINE=1 to read a copy downloaded earlier")


class ScienceQAError(UserError, ValueError):
    """A source that cannot be read or a record that cannot be formatted."""


# ----------------------------------------------------------------------------- loading

def _known_hint(hint):
    # None means the source lost the hint; "" means the question has none.
    return None if hint is None else bool(hint.strip())


def _record(pid, split, raw, has_image, caption):
    """One normalised raw record; the same keys whatever the source."""
    choices = raw.get("choices")
    return {
        "pid": str(pid),
        "split": split,
        "question": raw.get("question"),
        "choices": list(choices) if isinstance(choices, (list, tuple)) else choices,
        "answer": raw.get("answer"),
        "hint": raw.get("hint"),
        "has_image": has_image,
        "caption": caption,
        "task": raw.get("task"),
        "grade": raw.get("grade"),
        "subject": raw.get("subject"),
        "topic": raw.get("topic"),
        "category": raw.get("category"),
        "skill": raw.get("skill"),
        "lecture": raw.get("lecture"),
        "solution": raw.get("solution"),
    }


def _load_hub(split):
    import datasets  # imported late: only the hub path needs it

    hub_split = HF_SPLITS.get(split)
    if hub_split is None:
        raise ScienceQAError(f"the hub has splits {', '.join(HF_SPLITS)}; got {split!r}")
    # Offline mode (HF_HUB_OFFLINE=1) reads the copy cached earlier and never connects; otherwise
    # one probe first, so that an unreachable hub is an error at once instead of after the
    # hub client's retries.
    unreachable = None if datasets.config.HF_HUB_OFFLINE else hub_unreachable(datasets.config.HF_ENDPOINT)
    if unreachable:
        raise ScienceQAError(f"the Hugging Face hub ({datasets.config.HF_ENDPOINT}) cannot be reached ({unreachable}); "
                             f"{OFFLINE_ADVICE}")
    try:
        ds = datasets.load_dataset(HF_DATASET, revision=HF_REVISION, split=hub_split)
    except Exception as e:  # network, auth, cache: all end the same way for the user
        raise ScienceQAError(
            f"could not load {HF_DATASET} (revision {HF_REVISION[:10]}, split {hub_split}) from the Hugging Face "
            f"hub: {type(e).__name__}: {e}; {OFFLINE_ADVICE}"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[hub_split]
    # Raw Arrow rows: the image column is read as bytes-or-null and never decoded, which
    # keeps loading fast and free of PIL; only "is there an image" is needed.
    table = ds.with_format("arrow")[:]
    if "image" in table.column_names:
        has_image = [not null for null in table.column("image").is_null().to_pylist()]
        table = table.drop_columns(["image"])
    else:
        has_image = [None] * table.num_rows
    rows = table.to_pylist()
    return [_record(f"{split}-{i}", split, row, has_image[i], None) for i, row in enumerate(rows)]


def _file_stamp(path):
    return path.stat().st_mtime_ns if path.exists() else None


@lru_cache(maxsize=2)
def _read_dir(directory, stamps):
    """Parse a lupantech directory once for all its splits (problems.json is the slow part);
    `stamps` (file mtimes) makes an edited file be read again."""
    directory = Path(directory)
    problems_path, splits_path = directory / "problems.json", directory / "pid_splits.json"
    for path in (problems_path, splits_path):
        if not path.exists():
            raise ScienceQAError(
                f"{directory}: missing {path.name} (expected the lupantech layout: "
                "problems.json + pid_splits.json, optional captions.json)"
            )
    problems = _read_json(problems_path)
    pid_splits = _read_json(splits_path)
    captions = {}
    captions_path = directory / "captions.json"
    if captions_path.exists():
        captions = _read_json(captions_path)
        # lupantech's file nests the map under "captions" beside model settings.
        captions = captions.get("captions", captions)
    for name, obj in ((problems_path, problems), (splits_path, pid_splits), (captions_path, captions)):
        if not isinstance(obj, dict):
            raise ScienceQAError(f"{name}: expected a JSON object, got {type(obj).__name__}")
    return problems, pid_splits, captions


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ScienceQAError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _split_pids(splits_path, pid_splits, split):
    if split not in pid_splits:
        raise ScienceQAError(f"{splits_path}: no split {split!r} (has: {', '.join(pid_splits)})")
    pids = pid_splits[split]
    if not isinstance(pids, list):
        raise ScienceQAError(f"{splits_path}: split {split!r} must be a list of pids, got {json_type(pids)}")
    for i, pid in enumerate(pids):
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ScienceQAError(f"{splits_path}: split {split!r}, item {i}: {json_type(pid)} is not a pid")
    return [str(pid) for pid in pids]


def _load_dir(directory, split):
    """(records, where(record, problem) -> the file a bad record's field comes from)."""
    directory = Path(directory).resolve()
    stamps = tuple(_file_stamp(directory / n) for n in ("problems.json", "pid_splits.json", "captions.json"))
    problems, pid_splits, captions = _read_dir(str(directory), stamps)
    records = []
    for pid in _split_pids(directory / "pid_splits.json", pid_splits, split):
        if pid not in problems:
            raise ScienceQAError(f"{directory / 'problems.json'}: pid {pid!r} of split {split!r} is missing")
        raw = problems[pid]
        if not isinstance(raw, dict):
            records.append(invalid_record(pid, split, raw))
            continue
        # lupantech: "image" is a file name or null for no image; absent means unknown.
        has_image = bool(raw["image"]) if "image" in raw else None
        caption = captions.get(pid) if has_image else None
        records.append(_record(pid, split, raw, has_image, caption))

    def where(record, problem):
        return directory / ("captions.json" if problem.startswith("bad caption") else "problems.json")
    return records, where


@lru_cache(maxsize=2)
def _read_sample(path, stamp):
    """All records of a questions.jsonl (the sample's format), by split in file order, and
    each pid's line."""
    by_split, lines = {}, {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScienceQAError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(raw, dict) or not raw.get("pid") or raw.get("split") not in SPLITS \
                    or isinstance(raw["pid"], bool) or not isinstance(raw["pid"], (str, int)):
                raise ScienceQAError(f"{path}:{lineno}: expected an object with a pid and a split "
                                     f"({', '.join(SPLITS)})")
            has_image = bool(raw["image"]) if "image" in raw else None
            caption = raw.get("caption") if has_image else None
            by_split.setdefault(raw["split"], []).append(_record(raw["pid"], raw["split"], raw, has_image, caption))
            lines[str(raw["pid"])] = lineno
    return by_split, lines


def _load_sample(path, split):
    by_split, lines = _read_sample(str(path), _file_stamp(path))
    return list(by_split.get(split, [])), lambda record, problem: f"{path}:{lines[record['pid']]}"


def resolve_source(source):
    """'hf' stays 'hf'; 'sample' and directories become a Path; anything else is an error."""
    if source == "hf":
        return "hf"
    path = SAMPLE_DIR if source == "sample" else Path(source).expanduser()
    if not path.is_dir():
        what = "the bundled sample" if source == "sample" else "a directory"
        raise ScienceQAError(
            f"ScienceQA source {str(source)!r}: expected 'hf', 'sample' or a directory; {what} not found at {path}"
        )
    return path


def load_scienceqa(source, split, skip_bad_records=False):
    """All records of one split, in the split's own order (hub row order = pid_splits
    order), including those with missing text: `skip_reason` tells which to leave out.

    A bad record (sciassist.data.records.record_problem: a field of the wrong type, choices
    that are not 2+ strings, an answer out of range) raises ScienceQAError naming its file,
    pid and field; with skip_bad_records=True it is returned like the others and
    skip_reason names its problem, so it is skipped and counted."""
    where = resolve_source(source)
    if where == "hf":
        records, origin = _load_hub(split), lambda record, problem: f"{HF_DATASET} ({split} split)"
    elif (where / SAMPLE_FILE).is_file() and not (where / "problems.json").exists():
        if split not in SPLITS:
            raise ScienceQAError(f"{where / SAMPLE_FILE}: no split {split!r} (has: {', '.join(SPLITS)})")
        records, origin = _load_sample(where / SAMPLE_FILE, split)
    else:
        records, origin = _load_dir(where, split)
    if not skip_bad_records:
        for record in records:
            problem = record_problem(record)
            if problem:
                raise ScienceQAError(f"{origin(record, problem)}: pid {record['pid']!r}: {problem}; fix the record, "
                                     f"or skip such records with --skip_bad_records (they are counted)")
    return records


# ----------------------------------------------------------------------------- subsets

def parse_size(value, name="size"):
    """'all' or None -> None (the whole split); otherwise a non-negative whole number.
    `name` (e.g. "--train_size") starts the error message."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ScienceQAError(f"{name} must be a whole number or 'all', got {value!r}")
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise ScienceQAError(f"{name} must be a whole number or 'all', got {value!r}") from None
    if n < 0:
        raise ScienceQAError(f"{name} must be >= 0, got {n}")
    return n


def check_seed(seed, name="seed"):
    """A subset seed: a whole number >= 0 (what numpy's default_rng accepts)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ScienceQAError(f"{name} must be a whole number >= 0, got {seed!r}")
    return seed


def select_subset(records, n, seed=42):
    """The first n of the seed's permutation: exactly the rows the hub's
    `Dataset.shuffle(seed=seed).select(range(n))` returns for the same split."""
    n = parse_size(n)
    order = np.random.default_rng(check_seed(seed)).permutation(len(records))
    if n is not None:
        order = order[:n]
    return [records[i] for i in order]


# ----------------------------------------------------------------------------- formatting

@dataclass
class FormatOptions:
    """How a question is written as a conversation (the module docstring shows the layout)."""

    system_prompt: str = setting(SYSTEM_PROMPT, "system message ('' for none; default: the tutor prompt)")
    include_hint: bool = setting(True, "the question's context as 'Context: ...' before it")
    image_mode: str = setting("caption", "image questions: caption = add 'Image: <caption>' when known, keep = as "
                                         "text, drop = skip them", choices=list(IMAGE_MODES))
    include_explanation: bool = setting(True, "'Explanation: <solution>' in the answer")
    include_background: bool = setting(True, "'Background: <lecture>' in the answer")
    answer_format: str = setting("letter_first", "letter_first: 'The correct answer is B. <option>'; text_first: "
                                                 "'The correct answer is <option> (B).' (what small models trained "
                                                 "here learn best)", choices=list(ANSWER_FORMATS))
    options_layout: str = setting("letter_first", "letter_first: 'A. <option>' lines; letter_after: "
                                                  "'<option> (A)' lines", choices=list(OPTIONS_LAYOUTS))

    def __post_init__(self):
        if self.image_mode not in IMAGE_MODES:
            raise ScienceQAError(f"image_mode must be one of {', '.join(IMAGE_MODES)}, got {self.image_mode!r}")
        if self.options_layout not in OPTIONS_LAYOUTS:
            raise ScienceQAError(f"options_layout must be one of {', '.join(OPTIONS_LAYOUTS)}, "
                                 f"got {self.options_layout!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ScienceQAError(f"answer_format must be one of {', '.join(ANSWER_FORMATS)}, "
                                 f"got {self.answer_format!r}")

    @classmethod
    def original(cls, **overrides):
        """The original project's format: no hint, image questions kept as plain text."""
        return replace(cls(include_hint=False, image_mode="keep"), **overrides)


def skip_reason(record, options=None):
    """Why a record cannot be used (a short label for the report), or None: missing text, a
    bad record (sciassist.data.records.record_problem), or an image question dropped."""
    missing = missing_text(record)
    problem = record_problem(record)
    if problem is None and missing:
        problem = "missing " + ", ".join(missing)
    if problem is None and options is not None and options.image_mode == "drop" and record.get("has_image"):
        problem = "image question dropped"
    return problem


def caption_for(record, options):
    """The caption an image question is given under `options`, or None."""
    caption = record.get("caption")
    if options.image_mode == "caption" and record.get("has_image") and caption and caption.strip():
        return caption.strip()
    return None


def format_record(record, options=None):
    """One raw record -> {"messages": [...], "meta": {...}} (the JSONL record).

    Raises ScienceQAError for a record with missing or inconsistent text; image_mode "drop"
    is a selection decision made by `skip_reason`, so a record given here is always formatted.
    """
    options = options or FormatOptions()
    reason = skip_reason(record)
    if reason is not None:
        raise ScienceQAError(f"ScienceQA pid {record.get('pid')!r}: {reason}")
    choices, answer = record["choices"], record["answer"]
    letter = LETTERS[answer]

    context = []
    hint = record.get("hint")
    if options.include_hint and hint and hint.strip():
        context.append(f"Context: {hint.strip()}")
    caption = caption_for(record, options)
    if caption:
        context.append(f"Image: {caption}")
    options_text = options_block(choices, options.options_layout)
    user = f"{record['question']}\n\n{options_text}"
    if context:
        user = "\n".join(context) + "\n\n" + user

    # Truthiness (not `is not None`) on purpose: the original skipped empty strings too.
    response = answer_line(choices, answer, options.answer_format)
    if options.include_explanation and record.get("solution"):
        response += f"\n\nExplanation: {record['solution']}"
    if options.include_background and record.get("lecture"):
        response += f"\n\nBackground: {record['lecture']}"

    messages = []
    if options.system_prompt:
        messages.append({"role": "system", "content": options.system_prompt})
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": response})
    meta = {
        "pid": record["pid"],
        "split": record.get("split"),
        "choices": list(choices),
        "answer": answer,
        "answer_letter": letter,
        "subject": record.get("subject"),
        "grade": record.get("grade"),
        "topic": record.get("topic"),
        "category": record.get("category"),
        "has_image": record.get("has_image"),
        "has_hint": _known_hint(hint),
        # the gold explanation, also for answer-only files (sciassist_evaluate.py --explain)
        "lecture": record.get("lecture") or "",
        "solution": record.get("solution") or "",
    }
    return {"messages": messages, "meta": meta}

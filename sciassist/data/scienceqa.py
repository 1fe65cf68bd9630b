"""
ScienceQA as chat conversations for supervised fine-tuning.

Sources, one function (`load_scienceqa(source, split)`) and one CLI flag (`--source`):
  hf      the Hugging Face hub dataset derek-thomas/ScienceQA, pinned to the revision the
          original project used. Images are never decoded (only whether one exists is read).
          Hub rows carry no problem id, so pid is "<split>-<row>" (e.g. "test-17").
  sample  the small sample written for this repository, data/sample/questions.jsonl: one
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
the source does not know).
"""

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from nanochat.tokenizer import Tokenizer
from sciassist.common import SettingsParser, UserError, print_error
from sciassist.data.answers import ANSWER_FORMATS, LETTERS, OPTIONS_LAYOUTS, answer_line, options_block
from sciassist.data.conversations import write_conversations

SYSTEM_PROMPT = (
    "You are a helpful science tutor for elementary through high school students. "
    "Explain concepts clearly with examples."
)
HF_DATASET = "derek-thomas/ScienceQA"
HF_REVISION = "f18b0a70359ebfb41f658fd564208d0355b013f4"
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}
SPLITS = ("train", "val", "test")
DEFAULT_SIZES = {"train": 12000, "val": 4000, "test": 4000}
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"
SAMPLE_FILE = "questions.jsonl"
IMAGE_MODES = ("caption", "keep", "drop")
# Fields a record needs before it can become a question; never filled in by guessing.
TEXT_FIELDS = ("question", "choices", "answer")


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
        "choices": list(choices) if choices is not None else None,
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
    try:
        ds = datasets.load_dataset(HF_DATASET, revision=HF_REVISION, split=hub_split)
    except Exception as e:  # network, auth, cache: all end the same way for the user
        raise ScienceQAError(
            f"could not load {HF_DATASET} (revision {HF_REVISION[:10]}, split {hub_split}) from the Hugging Face "
            f"hub: {type(e).__name__}: {e}. Offline? Use --source with a lupantech-layout directory, or 'sample'."
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


def _load_dir(directory, split):
    directory = Path(directory).resolve()
    stamps = tuple(_file_stamp(directory / n) for n in ("problems.json", "pid_splits.json", "captions.json"))
    problems, pid_splits, captions = _read_dir(str(directory), stamps)
    if split not in pid_splits:
        raise ScienceQAError(
            f"{directory / 'pid_splits.json'}: no split {split!r} (has: {', '.join(pid_splits)})"
        )
    records = []
    for pid in pid_splits[split]:
        pid = str(pid)
        raw = problems.get(pid)
        if raw is None:
            raise ScienceQAError(f"{directory / 'problems.json'}: pid {pid!r} of split {split!r} is missing")
        # lupantech: "image" is a file name or null for no image; absent means unknown.
        has_image = bool(raw["image"]) if "image" in raw else None
        caption = captions.get(pid) if has_image else None
        records.append(_record(pid, split, raw, has_image, caption))
    return records


@lru_cache(maxsize=2)
def _read_sample(path, stamp):
    """All records of a questions.jsonl (the sample's format), by split in file order."""
    by_split = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScienceQAError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(raw, dict) or not raw.get("pid") or raw.get("split") not in SPLITS:
                raise ScienceQAError(f"{path}:{lineno}: expected an object with a pid and a split "
                                     f"({', '.join(SPLITS)})")
            has_image = bool(raw["image"]) if "image" in raw else None
            caption = raw.get("caption") if has_image else None
            by_split.setdefault(raw["split"], []).append(_record(raw["pid"], raw["split"], raw, has_image, caption))
    return by_split


def _load_sample(path, split):
    return list(_read_sample(str(path), _file_stamp(path)).get(split, []))


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


def load_scienceqa(source, split):
    """All records of one split, in the split's own order (hub row order = pid_splits
    order), including those with missing text: `skip_reason` tells which to leave out."""
    where = resolve_source(source)
    if where == "hf":
        return _load_hub(split)
    if (where / SAMPLE_FILE).is_file() and not (where / "problems.json").exists():
        if split not in SPLITS:
            raise ScienceQAError(f"{where / SAMPLE_FILE}: no split {split!r} (has: {', '.join(SPLITS)})")
        return _load_sample(where / SAMPLE_FILE, split)
    return _load_dir(where, split)


# ----------------------------------------------------------------------------- subsets

def parse_size(value):
    """'all' or None -> None (the whole split); otherwise a non-negative int."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "all"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ScienceQAError(f"size must be a whole number or 'all', got {value!r}") from None
    if n < 0:
        raise ScienceQAError(f"size must be >= 0, got {n}")
    return n


def select_subset(records, n, seed=42):
    """The first n of the seed's permutation: exactly the rows the hub's
    `Dataset.shuffle(seed=seed).select(range(n))` returns for the same split."""
    n = parse_size(n)
    order = np.random.default_rng(seed).permutation(len(records))
    if n is not None:
        order = order[:n]
    return [records[i] for i in order]


# ----------------------------------------------------------------------------- formatting

@dataclass
class FormatOptions:
    system_prompt: str = SYSTEM_PROMPT  # "" leaves the system message out
    include_hint: bool = True           # hint as "Context: ..." above the question
    image_mode: str = "caption"         # caption | keep | drop (see module docstring)
    include_explanation: bool = True    # "Explanation: <solution>"
    include_background: bool = True     # "Background: <lecture>"
    answer_format: str = "letter_first"  # letter_first | text_first (see answer_line)
    options_layout: str = "letter_first"  # letter_first "A. <choice>" | letter_after "<choice> (A)"

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
    """Why a record cannot be used (a short label for the report), or None."""
    missing = [name for name in TEXT_FIELDS if record.get(name) is None]
    if missing:
        return "missing " + ", ".join(missing)
    choices, answer = record["choices"], record["answer"]
    if not isinstance(choices, list) or len(choices) < 2:
        return "fewer than 2 choices"
    if len(choices) > len(LETTERS):
        return f"more than {len(LETTERS)} choices"
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        return "answer index out of range"
    if options is not None and options.image_mode == "drop" and record.get("has_image"):
        return "image question dropped"
    return None


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
    }
    return {"messages": messages, "meta": meta}


# ----------------------------------------------------------------------------- prepare

def percentiles(values, qs=(50, 90, 99)):
    """Nearest-rank percentiles plus max and mean; {} for no values."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{q}": ordered[min(len(ordered) - 1, max(0, int(np.ceil(q / 100 * len(ordered))) - 1))] for q in qs}
    out["max"] = ordered[-1]
    out["mean"] = round(sum(ordered) / len(ordered), 1)
    return out


@dataclass
class SplitStats:
    split: str
    path: str
    available: int                  # records in the split
    requested: int | None           # None = all
    selected: int                   # after the seeded subset, before skipping
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> count
    with_image: int = 0
    image_unknown: int = 0
    with_caption: int = 0           # image questions that were given their caption
    with_hint: int = 0
    hint_unknown: int = 0
    choices: Counter = field(default_factory=Counter)   # number of choices -> count
    letters: Counter = field(default_factory=Counter)   # answer letter -> count
    length_unit: str = "chars"      # "tokens" when a tokenizer was given
    lengths: dict = field(default_factory=dict)         # percentiles of conversation length
    over_2048_tokens: int | None = None                 # would be truncated at nanochat's 2048


@dataclass
class PrepareReport:
    source: str
    out_dir: str
    seed: int
    options: FormatOptions
    splits: dict  # split -> SplitStats

    def format(self):
        lines = [f"ScienceQA from {self.source} (seed {self.seed}) -> {self.out_dir}"]
        lines.append(f"{'split':<6} {'available':>9} {'selected':>8} {'kept':>6} {'skipped':>7} "
                     f"{'image':>6} {'caption':>7} {'hint':>6} {'hint?':>6}  file")
        for s in self.splits.values():
            lines.append(
                f"{s.split:<6} {s.available:>9} {s.selected:>8} {s.kept:>6} {sum(s.skipped.values()):>7} "
                f"{s.with_image:>6} {s.with_caption:>7} {s.with_hint:>6} {s.hint_unknown:>6}  {s.path}"
            )
        lines.append("(hint? = hint unknown in the source; image/caption/hint count kept records)")
        for s in self.splits.values():
            if s.requested is not None and s.requested > s.available:
                lines.append(f"{s.split}: asked for {s.requested}, the split has {s.available}: took all")
            if s.skipped:
                why = ", ".join(f"{n} {reason}" for reason, n in s.skipped.most_common())
                lines.append(f"{s.split} skipped: {why}")
        for s in self.splits.values():
            choices = " ".join(f"{k}:{v}" for k, v in sorted(s.choices.items()))
            total = max(1, s.kept)
            letters = " ".join(f"{k} {100 * v / total:.1f}%" for k, v in sorted(s.letters.items()))
            lines.append(f"{s.split} choices per question {choices} | answer letters {letters}")
        for s in self.splits.values():
            if s.lengths:
                stats = " ".join(f"{k} {v}" for k, v in s.lengths.items())
                extra = f" | over 2048: {s.over_2048_tokens}" if s.over_2048_tokens is not None else ""
                lines.append(f"{s.split} length ({s.length_unit}): {stats}{extra}")
        return "\n".join(lines)


def prepare(source="hf", out_dir="data", sizes=None, seed=42, options=None,
            tokenizer_dir=None, tokenizer=None, splits=SPLITS):
    """Load, subset, format and write data/scienceqa_{split}.jsonl; returns a PrepareReport.

    sizes: {split: int | "all" | None}, missing splits use DEFAULT_SIZES. Lengths are
    counted in tokens (nanochat's render_conversation) when a tokenizer or tokenizer_dir
    is given, else in characters of message content.
    """
    options = options or FormatOptions()
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    if tokenizer is None and tokenizer_dir is not None:
        tokenizer = Tokenizer.from_directory(tokenizer_dir)
    out_dir = Path(out_dir)
    report = PrepareReport(str(resolve_source(source)), str(out_dir), seed, options, {})
    for split in splits:
        records = load_scienceqa(source, split)
        requested = parse_size(sizes.get(split))
        subset = select_subset(records, requested, seed)
        path = out_dir / f"scienceqa_{split}.jsonl"
        stats = SplitStats(split, str(path), len(records), requested, len(subset))
        formatted, lengths = [], []
        for record in subset:
            reason = skip_reason(record, options)
            if reason is not None:
                stats.skipped[reason] += 1
                continue
            item = format_record(record, options)
            formatted.append(item)
            meta = item["meta"]
            stats.with_image += meta["has_image"] is True
            stats.image_unknown += meta["has_image"] is None
            stats.with_caption += caption_for(record, options) is not None
            stats.with_hint += meta["has_hint"] is True
            stats.hint_unknown += meta["has_hint"] is None
            stats.choices[len(meta["choices"])] += 1
            stats.letters[meta["answer_letter"]] += 1
            if tokenizer is not None:
                ids, _ = tokenizer.render_conversation({"messages": item["messages"]}, max_tokens=10**9)
                lengths.append(len(ids))
            else:
                lengths.append(sum(len(m["content"]) for m in item["messages"]))
        stats.kept = len(formatted)
        stats.lengths = percentiles(lengths)
        if tokenizer is not None:
            stats.length_unit = "tokens"
            stats.over_2048_tokens = sum(n > 2048 for n in lengths)
        if formatted:
            write_conversations(path, formatted)
        else:
            # write_conversations refuses nothing-to-write; an empty split is still a file.
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")
        report.splits[split] = stats
    return report


def build_parser():
    p = SettingsParser(
        prog="python -m sciassist.data.scienceqa",
        description="Write ScienceQA as chat JSONL (scienceqa_{train,val,test}.jsonl).",
        renamed={"--source": "--scienceqa", "--out": "--out_dir"},
    )
    p.add_argument("--scienceqa", default="hf", help="hf | sample | a lupantech-layout directory (default: hf)")
    p.add_argument("--out_dir", default="data", help="output directory (default: data)")
    for split in SPLITS:
        p.add_argument(f"--{split}_size", default=str(DEFAULT_SIZES[split]),
                       help=f"questions drawn from {split}, or 'all' (default: {DEFAULT_SIZES[split]})")
    p.add_argument("--seed", type=int, default=42, help="subset seed (default: 42, as the original)")
    p.add_argument("--splits", default=",".join(SPLITS),
                   help="comma-separated splits to write (default: train,val,test)")
    # Format flags default to None so that --original_format can set the base and any
    # explicitly given flag still wins over it.
    p.add_argument("--original_format", action="store_true",
                   help="the original project's strings: no hint, image questions kept as text")
    p.add_argument("--include_hint", action=argparse.BooleanOptionalAction, default=None,
                   help="hint as 'Context: ...' before the question (default: on)")
    p.add_argument("--image_mode", choices=IMAGE_MODES, default=None,
                   help="image questions: caption = add 'Image: <caption>' when known, keep = as text, "
                        "drop = skip (default: caption)")
    p.add_argument("--include_explanation", action=argparse.BooleanOptionalAction, default=None,
                   help="'Explanation: <solution>' in the answer (default: on)")
    p.add_argument("--include_background", action=argparse.BooleanOptionalAction, default=None,
                   help="'Background: <lecture>' in the answer (default: on)")
    p.add_argument("--system_prompt", default=None, help="system message ('' for none; default: the tutor prompt)")
    p.add_argument("--options_layout", choices=OPTIONS_LAYOUTS, default=None,
                   help="letter_first: 'A. <option>' lines (default); letter_after: '<option> (A)' lines")
    p.add_argument("--answer_format", choices=ANSWER_FORMATS, default=None,
                   help="letter_first: 'The correct answer is B. <option>' (default); text_first: "
                        "'The correct answer is <option> (B).' (what small models trained here learn best)")
    p.add_argument("--tokenizer_dir", default=None,
                   help="nanochat tokenizer dir (tokenizer.pkl): report lengths in tokens instead of characters")
    return p


def options_from_args(args):
    base = FormatOptions.original() if args.original_format else FormatOptions()
    given = {name: getattr(args, name) for name in
             ("include_hint", "image_mode", "include_explanation", "include_background", "system_prompt",
              "answer_format", "options_layout")
             if getattr(args, name) is not None}
    return replace(base, **given)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        splits = [s.strip() for s in args.splits.split(",") if s.strip()]
        sizes = {split: getattr(args, f"{split}_size") for split in SPLITS}
        report = prepare(args.scienceqa, args.out_dir, sizes=sizes, seed=args.seed, options=options_from_args(args),
                         tokenizer_dir=args.tokenizer_dir, splits=splits)
    except ScienceQAError as e:
        return print_error(e)
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())

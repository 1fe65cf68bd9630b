"""
Write ScienceQA as chat JSONL for fine-tuning: `python -m sciassist.data.prepare` (`make data`).

    python -m sciassist.data.prepare --scienceqa hf --out_dir data/       # the hub
    python -m sciassist.data.prepare --scienceqa ../scienceqa --out_dir data/ --train_size all
    python -m sciassist.data.prepare --scienceqa sample --out_dir data/   # the bundled sample, offline

For each split: the seeded subset (sciassist.data.scienceqa.select_subset), each question
formatted as a conversation (FormatOptions; every field is a flag), written to
<out_dir>/scienceqa_<split>.jsonl, and a report of what was kept and skipped, how many
questions have an image or a context, the choices per question, the answer-letter balance
and length percentiles (in tokens with --tokenizer_dir).

All or nothing: every split's file is written into a temporary folder inside --out_dir and
moved in only when every split succeeded; a failure leaves --out_dir as it was. A record
with a field of the wrong type stops the run with its file, pid and field named;
--skip_bad_records leaves such records out instead, counted in the report.
"""

import contextlib
import os
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from nanochat.tokenizer import Tokenizer, TokenizerLoadError
from sciassist.common import (
    SettingsParser,
    UserError,
    add_settings_arguments,
    print_error,
    setting,
    settings_from_namespace,
)
from sciassist.data.conversations import write_conversations
from sciassist.data.scienceqa import (
    DEFAULT_SIZES,
    SPLITS,
    FormatOptions,
    ScienceQAError,
    caption_for,
    check_seed,
    format_record,
    load_scienceqa,
    parse_size,
    resolve_source,
    select_subset,
    skip_reason,
)


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


def _split_file(split, records, requested, seed, options, tokenizer, path):
    """(SplitStats, formatted records) of one split: the seeded subset, formatted, counted."""
    subset = select_subset(records, requested, seed)
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
    return stats, formatted


def _checked_request(out_dir, sizes, seed, splits):
    """The requested size of each split, after every argument is checked (before anything is read)."""
    if isinstance(splits, str) or not list(splits):
        raise ScienceQAError(f"splits must name at least one split (e.g. {','.join(SPLITS)}), got {splits!r}")
    check_seed(seed)
    if out_dir.exists() and not out_dir.is_dir():
        raise ScienceQAError(f"--out_dir {out_dir} is a file, not a directory; give a directory to write "
                             f"scienceqa_<split>.jsonl into")
    requested = {split: parse_size(sizes.get(split), f"{split} size (--{split}_size)") for split in splits}
    for split in requested:
        if (out_dir / f"scienceqa_{split}.jsonl").is_dir():
            raise ScienceQAError(f"{out_dir / f'scienceqa_{split}.jsonl'} is a directory; move it away first")
    return requested


@contextlib.contextmanager
def _staging(out_dir):
    """A temporary folder inside out_dir for the files being written, removed afterwards; on
    failure the folders this created for out_dir are removed too (when empty)."""
    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScienceQAError(f"--out_dir {out_dir}: cannot create it ({e.strerror or e})") from None
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=".prepare-"))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)


def prepare(source="hf", out_dir="data", sizes=None, seed=42, options=None,
            tokenizer_dir=None, tokenizer=None, splits=SPLITS, skip_bad_records=False):
    """Load, subset, format and write data/scienceqa_{split}.jsonl; returns a PrepareReport.

    sizes: {split: int | "all" | None}, missing splits use DEFAULT_SIZES. Lengths are
    counted in tokens (nanochat's render_conversation) when a tokenizer or tokenizer_dir
    is given, else in characters of message content. All or nothing: the files are written
    into a temporary folder inside out_dir and moved in only when every split succeeded,
    so a failure leaves out_dir as it was. skip_bad_records: leave out (and count) records
    with a field of the wrong type instead of stopping (sciassist.data.scienceqa.load_scienceqa).
    """
    options = options or FormatOptions()
    out_dir = Path(out_dir)
    requested = _checked_request(out_dir, {**DEFAULT_SIZES, **(sizes or {})}, seed, splits)
    if tokenizer is None and tokenizer_dir is not None:
        try:
            tokenizer = Tokenizer.from_directory(tokenizer_dir)
        except (TokenizerLoadError, OSError) as e:
            raise ScienceQAError(f"--tokenizer_dir: {e}") from None
    report = PrepareReport(str(resolve_source(source)), str(out_dir), seed, options, {})
    with _staging(out_dir) as staging:
        for split, size in requested.items():
            records = load_scienceqa(source, split, skip_bad_records=skip_bad_records)
            name = f"scienceqa_{split}.jsonl"
            stats, formatted = _split_file(split, records, size, seed, options, tokenizer, out_dir / name)
            if formatted:
                write_conversations(staging / name, formatted)
            else:  # write_conversations refuses nothing-to-write; an empty split is still a file.
                (staging / name).write_text("", encoding="utf-8")
            report.splits[split] = stats
        for split in requested:
            os.replace(staging / f"scienceqa_{split}.jsonl", out_dir / f"scienceqa_{split}.jsonl")
    return report


@dataclass
class PrepareSettings:
    """What to prepare and where; the format flags are FormatOptions' fields."""

    scienceqa: str = setting("hf", "hf | sample | a lupantech-layout directory")
    out_dir: str = setting("data", "output directory")
    train_size: str = setting(str(DEFAULT_SIZES["train"]), "questions drawn from train, or 'all'")
    val_size: str = setting(str(DEFAULT_SIZES["val"]), "questions drawn from val, or 'all'")
    test_size: str = setting(str(DEFAULT_SIZES["test"]), "questions drawn from test, or 'all'")
    seed: int = setting(42, "subset seed (42, as the original project)", at_least=0)
    splits: str = setting(",".join(SPLITS), "comma-separated splits to write")
    original_format: bool = setting(False, "the original project's strings: no hint, image questions kept as text "
                                           "(format flags given as well still apply)")
    tokenizer_dir: str | None = setting(None, "nanochat tokenizer dir (tokenizer.pkl): report lengths in tokens "
                                              "instead of characters")
    skip_bad_records: bool = setting(False, "leave out (and count in the report) records with a field of the wrong "
                                            "type or out of range, instead of stopping at the first")


def build_parser():
    parser = SettingsParser(prog="python -m sciassist.data.prepare",
                            description="Write ScienceQA as chat JSONL (scienceqa_{train,val,test}.jsonl).",
                            renamed={"--source": "--scienceqa", "--out": "--out_dir"})
    add_settings_arguments(parser, PrepareSettings)
    # Only the format flags given on the command line change the base format (the default,
    # or the original's with --original_format).
    add_settings_arguments(parser, FormatOptions, "format", only_given=True)
    return parser


def options_from_args(args):
    base = FormatOptions.original() if args.original_format else FormatOptions()
    return replace(base, **{name: getattr(args, name) for name in FormatOptions.__dataclass_fields__
                            if hasattr(args, name)})


def main(argv=None):
    args = build_parser().parse_args(argv)
    s = settings_from_namespace(PrepareSettings, args)
    try:
        splits = [split.strip() for split in s.splits.split(",") if split.strip()]
        sizes = {split: getattr(s, f"{split}_size") for split in SPLITS}
        report = prepare(s.scienceqa, s.out_dir, sizes=sizes, seed=s.seed, options=options_from_args(args),
                         tokenizer_dir=s.tokenizer_dir, splits=splits, skip_bad_records=s.skip_bad_records)
    except (UserError, OSError) as e:
        return print_error(e)
    print(report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())

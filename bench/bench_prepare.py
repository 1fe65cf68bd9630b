"""
Time preparing the full ScienceQA (every split, every question) from a local lupantech
directory, the way `python -m sciassist.data.prepare --scienceqa DIR --train_size all ...` does.

    python bench/bench_prepare.py [--source ../shared/scienceqa] [--tokenizer_dir DIR] [--repeat 3]

Prints one row per split (seconds, records kept / skipped) and the total. The first split
also pays for parsing problems.json (the directory is read once and cached), so the
cache is cleared before every repeat: each total is a cold run. Goal: under 30 s on 2 cores.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runnable as a plain script from anywhere

from sciassist.data import scienceqa as sqa  # noqa: E402
from sciassist.data.prepare import prepare  # noqa: E402


def run_once(source, out_dir, tokenizer):
    sqa._read_dir.cache_clear()  # cold: include parsing the JSON files
    rows = []
    for split in sqa.SPLITS:
        t0 = time.perf_counter()
        report = prepare(source, out_dir, sizes={split: "all"}, splits=(split,), tokenizer=tokenizer)
        rows.append((split, time.perf_counter() - t0, report.splits[split]))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=str(REPO.parent / "shared" / "scienceqa"),
                   help="lupantech-layout directory (default: ../shared/scienceqa beside the repo)")
    p.add_argument("--tokenizer_dir", default=None, help="also count tokens with this nanochat tokenizer")
    p.add_argument("--repeat", type=int, default=3, help="runs; the fastest is reported (default: 3)")
    args = p.parse_args(argv)

    tokenizer = None
    if args.tokenizer_dir:
        from nanochat.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_directory(args.tokenizer_dir)

    runs = []
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(args.repeat):
            runs.append(run_once(args.source, out_dir, tokenizer))
    best = min(runs, key=lambda rows: sum(seconds for _, seconds, _ in rows))

    print(f"prepare ScienceQA, all questions, from {args.source}"
          f" (lengths in {'tokens' if tokenizer else 'characters'}; best of {args.repeat} cold runs)")
    print(f"{'split':<6} {'seconds':>8} {'records':>8} {'kept':>7} {'skipped':>8}")
    for split, seconds, stats in best:
        print(f"{split:<6} {seconds:>8.2f} {stats.available:>8} {stats.kept:>7} {sum(stats.skipped.values()):>8}")
    total = sum(seconds for _, seconds, _ in best)
    kept = sum(stats.kept for _, _, stats in best)
    skipped = sum(sum(stats.skipped.values()) for _, _, stats in best)
    records = sum(stats.available for _, _, stats in best)
    print(f"{'total':<6} {total:>8.2f} {records:>8} {kept:>7} {skipped:>8}")
    print("all runs (s): " + ", ".join(f"{sum(s for _, s, _ in rows):.2f}" for rows in runs))


if __name__ == "__main__":
    main()

"""
The recipe study: which choices make the small pipeline models good at ScienceQA.

    .venv/bin/python bench/quality.py --scienceqa ../shared/scienceqa --out_dir /tmp/quality \
        --variants recipe,textfirst_d3,letterfirst_d3 --jobs 2

Each variant is the `cpu` recipe (sciassist.pipelines.recipes) with a few fields changed; it is
trained on the train split and scored on the fixed val selection subset (the first
--eval_limit questions of the seed-42 permutation of val). The test split is never read
here. Variants with the same tiny-base settings share one base (trained once, first).
Rows are appended to <out_dir>/study.jsonl as they finish and the Markdown table is
rewritten to <out_dir>/study.md (and printed) at the end.

--sft_steps / --base_steps shorten every variant alike (a quick study at a fixed budget in
steps, so a row means the same on any machine); left out, each variant keeps the recipe's own.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sciassist.pipelines.recipes import _base_key, build_base, get_recipe, run_recipe  # noqa: E402


def merged(*overrides):
    """get_recipe overrides, later ones winning; dict fields (tiny, train, data) merge by key."""
    out = {}
    for override in overrides:
        for key, value in override.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
    return out


# The first recipe (round 1 of the study): depth 2 / 2 heads, answers letter first, 2,200 steps.
LETTER_FIRST_D2 = dict(tiny=dict(depth=2, n_head=2), data=dict(answer_format="letter_first"),
                       train=dict(num_iterations=2200, eval_every=200), eval_max_new_tokens=16)
D2, D3 = dict(tiny=dict(depth=2, n_head=2)), dict(tiny=dict(depth=3, n_head=4))
STEPS_2200 = dict(train=dict(num_iterations=2200, eval_every=200))
TEXT_FIRST = dict(data=dict(answer_format="text_first"), eval_max_new_tokens=128)
LETTER_FIRST = dict(data=dict(answer_format="letter_first"), eval_max_new_tokens=16)
LETTER_AFTER = dict(data=dict(options_layout="letter_after"))

# name -> (what changed, get_recipe overrides of the cpu recipe)
VARIANTS = {
    # round 1, relative to the first recipe
    "plain": ("first recipe without the option-shuffled copies", merged(LETTER_FIRST_D2, dict(shuffled_copies=0))),
    "shuffled": ("the first recipe: depth 2, answers letter first, 3 option-shuffled copies, 2,200 steps",
                 LETTER_FIRST_D2),
    "explain": ("first recipe + explanation in the answer",
                merged(LETTER_FIRST_D2, dict(data=dict(include_explanation=True)))),
    "nohint": ("first recipe without hint / caption context",
               merged(LETTER_FIRST_D2, dict(data=dict(include_hint=False, image_mode="keep")))),
    "nobase": ("first recipe without base pretraining (1 step: a random-init model, same tokenizer)",
               merged(LETTER_FIRST_D2, dict(tiny=dict(steps=1)))),
    "wide": ("first recipe at depth 3, width 192, 3 heads (2.1M params)",
             merged(LETTER_FIRST_D2, dict(tiny=dict(depth=3, n_embd=192, n_head=3)))),
    # round 2: where the letter goes
    "textfirst_d2": ("depth 2, the option named first, 2,200 steps", merged(D2, TEXT_FIRST, STEPS_2200)),
    "textfirst_d2h4": ("depth 2 with 4 heads of 32, the option named first, 2,200 steps",
                       merged(D2, dict(tiny=dict(n_head=4)), TEXT_FIRST, STEPS_2200)),
    "textfirst_d3": ("depth 3 / 4 heads, the option named first, 2,200 steps", merged(D3, TEXT_FIRST, STEPS_2200)),
    "letterfirst_d3": ("depth 3 / 4 heads, answers letter first, 2,200 steps",
                       merged(D3, LETTER_FIRST, STEPS_2200)),
    "letterafter_d2": ("depth 2, options written '<option> (A)', answers letter first, 2,200 steps",
                       merged(D2, LETTER_FIRST, LETTER_AFTER, STEPS_2200)),
    "letterafter_d3": ("depth 3, options written '<option> (A)', answers letter first, 2,200 steps",
                       merged(D3, LETTER_FIRST, LETTER_AFTER, STEPS_2200)),
    "textfirst_letterafter_d3": ("depth 3, options '<option> (A)', the option named first, 2,200 steps",
                                 merged(D3, TEXT_FIRST, LETTER_AFTER, STEPS_2200)),
    "letterfirst_d3_4000": ("depth 3 / 4 heads, answers letter first, 4,000 steps", merged(D3, LETTER_FIRST)),
    "recipe": ("the cpu recipe: depth 3 / 4 heads, the option named first, 4,000 steps", dict()),
}


def variant_recipe(name, sft_steps=None, base_steps=None, eval_limit=None):
    what, overrides = VARIANTS[name]
    overrides = {k: dict(v) if isinstance(v, dict) else v for k, v in overrides.items()}
    if sft_steps is not None:
        overrides.setdefault("train", {})["num_iterations"] = sft_steps
        overrides["train"]["eval_every"] = max(1, sft_steps // 3)
    if base_steps is not None:
        overrides.setdefault("tiny", {})["steps"] = base_steps
    if eval_limit is not None:
        overrides["eval_limit"] = eval_limit
    return what, overrides


def base_dir_for(out_dir, scienceqa, overrides):
    recipe = get_recipe("cpu", **overrides)
    return Path(out_dir) / "bases" / _base_key(recipe, scienceqa)


def run_one(name, args):
    """Train and score one variant; returns its study row (also appended to study.jsonl)."""
    import torch
    torch.set_num_threads(args.threads)
    what, overrides = variant_recipe(name, args.sft_steps, args.base_steps, args.eval_limit)
    base_dir = base_dir_for(args.out_dir, args.scienceqa, overrides)
    summary = run_recipe("cpu", args.scienceqa, Path(args.out_dir) / name, evaluate_split="val",
                         base_dir=base_dir, **overrides)
    base_s = json.loads((base_dir / "tiny_base.json").read_text())["train_seconds"]
    val = summary["evaluation"]["val"]
    row = {
        "variant": name, "what": what, "params": summary["base"]["num_params"],
        # minutes as one run of the recipe would take: the shared base's training counted in
        "minutes": round((summary["timings"]["total_s"] + (base_s if summary["base_reused"] else 0)) / 60, 1),
        "sft_steps": summary["finetune"]["steps_done"], "sft_status": summary["finetune"]["status"],
        "train_conversations": summary["finetune"]["train_conversations"],
        "count": val["count"], "scoring": val["scoring"], "accuracy": val["accuracy"],
        "letter_acc": val.get("letter_acc"), "generated_acc": val["generated_acc"],
        "agreement": val["agreement"], "invalid": val["invalid"], "choice_acc": val.get("choice_acc"),
        "choice_generated_agreement": val.get("choice_generated_agreement"), "threads": args.threads,
        "names_an_option": val.get("names_an_option"), "letter_matches_text": val.get("letter_matches_text"),
        "timings": summary["timings"],
    }
    with open(Path(args.out_dir) / "study.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}"


def _binding(row):
    named = row.get("names_an_option")
    if not named:
        return "n/a"
    return f"{100 * row['letter_matches_text'] / named:.1f} (of {named})"


def markdown_table(rows):
    lines = ["| variant | what changed | params | minutes | SFT steps | val letter acc % | val choice acc % | "
             "val generated acc % | agreement % | invalid % | letter matches named text % |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['what']} | {r['params']:,} | {r['minutes']} | {r['sft_steps']} | "
                     f"{_pct(r.get('letter_acc'))} | {_pct(r.get('choice_acc'))} | {_pct(r['generated_acc'])} | "
                     f"{_pct(r['agreement'])} | {_pct(r['invalid'])} | {_binding(r)} |")
    count = rows[0]["count"] if rows else 0
    lines.append(f"\n(val selection subset: {count} questions, seed 42; chance on them is about 40%. letter acc = "
                 f"letter scoring (letter_first answers only); choice acc = each option's whole answer line scored; "
                 f"agreement = greedy reply vs the variant's own scoring (letter for letter_first, choice for "
                 f"text_first); letter matches named text = text_first replies that name an option's text and "
                 f"give that option's own letter)")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--scienceqa", default=str(REPO.parent / "shared" / "scienceqa"))
    p.add_argument("--out_dir", default="/tmp/quality")
    p.add_argument("--variants", default="recipe,textfirst_d3", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--sft_steps", type=int, default=None, help="fine-tune steps of every variant (a fixed budget)")
    p.add_argument("--base_steps", type=int, default=None, help="base pretraining steps of every variant")
    p.add_argument("--eval_limit", type=int, default=None, help="val selection questions (default: the recipe's)")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once (each in its own process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return 0

    import torch
    torch.set_num_threads(args.threads)
    # bases first, one per distinct setting, so parallel variants never train the same one
    for name in names:
        _, overrides = variant_recipe(name, args.sft_steps, args.base_steps, args.eval_limit)
        base_dir = base_dir_for(out_dir, args.scienceqa, overrides)
        t0 = time.time()
        _, reused = build_base(get_recipe("cpu", **overrides), args.scienceqa, base_dir)
        print(f"base for {name}: {base_dir} ({'reused' if reused else f'{time.time() - t0:.0f} s'})", flush=True)

    rows = []
    if args.jobs <= 1:
        for name in names:
            rows.append(run_one(name, args))
            print(markdown_table(rows[-1:]), flush=True)
    else:
        pending, running = list(names), {}
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
        while pending or running:
            while pending and len(running) < args.jobs:
                name = pending.pop(0)
                log = open(out_dir / f"{name}.log", "w")
                running[name] = subprocess.Popen([sys.executable, __file__, *passthrough, "--one", name],
                                                 stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
            time.sleep(5)
            for name, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[name]
                    print(f"{name}: exit {proc.returncode} (log {out_dir / (name + '.log')})", flush=True)
        finished = {}
        for line in (out_dir / "study.jsonl").read_text().splitlines():
            row = json.loads(line)
            finished[row["variant"]] = row
        rows = [finished[n] for n in names if n in finished]
    table = markdown_table(rows)
    (out_dir / "study.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

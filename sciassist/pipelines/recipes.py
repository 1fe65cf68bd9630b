"""
Recipes: the whole small-model pipeline (data -> tokenizer + tiny base -> fine-tune -> RL,
where the preset has that stage -> evaluation) as named presets, so a measured result can be reproduced with one call.

    python -m sciassist.pipelines.recipes --preset cpu --scienceqa ../shared/scienceqa --out_dir runs/cpu
    python -m sciassist.pipelines.recipes --preset cpu --scienceqa DIR --out_dir DIR2 --split test --evaluate_only

(`make recipe-cpu SCIENCEQA=DIR [PRESET=cpu|cpu-lora|cpu-tutor]` runs the first.)

Every budget is in steps (base pretraining steps, fine-tuning steps), so one command gives one
model on every machine: bit-identical on one CPU type at the same --threads (default 1). Only the time
depends on the machine; --max_minutes is an opt-in limit that says so when it cuts a run.

A preset is plain data: TinySettings overrides (tokenizer + base pretraining), TrainSettings
overrides (the fine-tune) and FormatOptions overrides (how a question is written), plus the
few data choices no other module makes:

- shuffled_copies: every training question is written 1 + N times, each extra copy with its
  options in a fresh seeded order (the answer letter moves with its option). A tiny model
  otherwise learns which letter tends to be right for a question type instead of reading
  the options; with the copies it can only lower its loss by matching the option text.
- The validation split is used twice, on disjoint questions: the first `eval_limit`
  questions of the seeded permutation (seed 42, the rows the hub's shuffle picks) are the
  selection set that recipes are compared on; the next `sft_val_size` are the fine-tune's
  validation loss (which picks the kept checkpoint). Test is evaluated only when asked.

- RL (a preset's `rl`, RLSettings overrides; sciassist.train.rl): after the fine-tune, the
  model practises on the training questions, its own sampled replies rewarded by the
  evaluator's strict parser, validated on the fine-tune's sft_val questions (never the
  selection set). The evaluation then compares fine-tuned -> RL on the same questions, with
  paired intervals (eval_<split>/report.md), and the headline gains an "rl" entry.

- Scoring: the evaluation's default for the recipe's answer format (choice scoring for
  text_first answers, letter scoring for letter_first ones) in eval_<split>/; a letter_first
  recipe with choice_scoring is also scored by `--scoring choice` (each option's whole answer
  line) in eval_<split>_choice/. A tiny model learns which option text is right well before
  it can name the letter, so the two differ a lot (measured: bench/RESULTS.md).

Nothing from val or test reaches the tokenizer or the base model (sciassist.pipelines.tiny reads the
train split only). out_dir/data holds ScienceQA text (CC BY-NC-SA): keep out_dir outside
the repository or in an ignored folder.
"""

import dataclasses
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from nanochat.checkpoint import CheckpointError
from sciassist.common import (
    THREADS_HELP,
    UserError,
    announce_threads,
    print_error,
    setting,
    settings_from_namespace,
    settings_parser,
    write_json,
)
from sciassist.data.conversations import write_conversations
from sciassist.data.scienceqa import FormatOptions, format_record, load_scienceqa, select_subset, skip_reason
from sciassist.eval.run import SOURCE_MODEL, EvalSettings, evaluate, named_models
from sciassist.pipelines.presets import RECIPES, RecipeError, get_recipe
from sciassist.pipelines.tiny import MARKER_FILE, TinySettings, train_tiny
from sciassist.train.loop import train
from sciassist.train.rl import rl
from sciassist.train.rl_settings import RLSettings
from sciassist.train.settings import TrainSettings

SPLITS_FOR_EVAL = ("val", "test")


# ----------------------------------------------------------------------------- data

def shuffled_copy(record, rng):
    """The raw record with its options in a random order and the answer index following
    its option. With two options this is a coin flip, so about half the copies keep the
    original order; that is intended (the letter must carry no information)."""
    order = list(range(len(record["choices"])))
    rng.shuffle(order)
    return {**record, "choices": [record["choices"][i] for i in order], "answer": order.index(record["answer"])}


def training_records(raw, options, shuffled_copies=0, seed=42):
    """Formatted training conversations: every usable question once in its own order, then
    `shuffled_copies` more passes with reordered options. Returns (records, skipped count)."""
    usable = [r for r in raw if skip_reason(r, options) is None]
    records = [format_record(r, options) for r in usable]
    rng = random.Random(seed)
    for _ in range(shuffled_copies):
        records.extend(format_record(shuffled_copy(r, rng), options) for r in usable)
    return records, len(raw) - len(usable)


def prepare_recipe_data(recipe, scienceqa, data_dir, splits=("val",), seed=42):
    """Write the recipe's files into data_dir: scienceqa_train.jsonl (with the shuffled
    copies), sft_val.jsonl (the fine-tune's validation loss) and eval_<split>.jsonl for each
    split in `splits` (val: the first eval_limit questions of the seeded permutation, disjoint
    from sft_val; test: all of it). Returns {name: path} and counts."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    options = FormatOptions(**recipe.data)
    counts = {}
    train, skipped = training_records(load_scienceqa(scienceqa, "train"), options, recipe.shuffled_copies, seed)
    paths = {"train": data_dir / "scienceqa_train.jsonl"}
    write_conversations(paths["train"], train)
    counts["train"] = len(train)
    counts["train_skipped"] = skipped

    val = [r for r in select_subset(load_scienceqa(scienceqa, "val"), None, seed) if skip_reason(r, options) is None]
    n_eval = len(val) if recipe.eval_limit is None else min(recipe.eval_limit, len(val))
    # the fine-tune's validation questions come after the selection set; on a split too small
    # for both (the bundled sample) they overlap rather than leave one empty
    sft_val = val[n_eval:n_eval + recipe.sft_val_size] or val[:recipe.sft_val_size]
    paths["sft_val"] = data_dir / "sft_val.jsonl"
    write_conversations(paths["sft_val"], [format_record(r, options) for r in sft_val])
    counts["sft_val"] = len(sft_val)
    for split in splits:
        if split not in SPLITS_FOR_EVAL:
            raise RecipeError(f"evaluate_split must be one of {', '.join(SPLITS_FOR_EVAL)}, got {split!r}")
        if split == "val":
            chosen = val[:n_eval]
        else:
            chosen = [r for r in load_scienceqa(scienceqa, split) if skip_reason(r, options) is None]
        paths[f"eval_{split}"] = data_dir / f"eval_{split}.jsonl"
        write_conversations(paths[f"eval_{split}"], [format_record(r, options) for r in chosen])
        counts[f"eval_{split}"] = len(chosen)
    return paths, counts


# ----------------------------------------------------------------------------- running

def _base_key(recipe, scienceqa):
    text = json.dumps({"tiny": recipe.tiny, "scienceqa": str(scienceqa)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_base(recipe, scienceqa, base_dir, progress=False):
    """Tokenizer + tiny base for the recipe in base_dir, reused when base_dir already holds
    one made with the same settings (a study that varies only the fine-tune trains it once).
    Returns (summary, reused)."""
    base_dir = Path(base_dir)
    key = _base_key(recipe, scienceqa)
    key_file = base_dir / "recipe_base_key.txt"
    if key_file.is_file() and key_file.read_text().strip() == key and (base_dir / MARKER_FILE).is_file():
        return json.loads((base_dir / MARKER_FILE).read_text()), True
    settings = TinySettings(out_dir=str(base_dir), scienceqa=str(scienceqa), progress=progress,
                            **recipe.tiny)
    summary = train_tiny(settings)
    summary.pop("losses", None)
    key_file.write_text(key + "\n")
    return summary, False


def _check_shared_base(recipe, scienceqa, base_dir):
    """A base_dir given explicitly may hold another run's base: it is reused when it was built
    with this recipe's settings, and never replaced by one of other settings."""
    key_file = base_dir / "recipe_base_key.txt"
    if (base_dir / MARKER_FILE).is_file() and not (key_file.is_file()
                                                    and key_file.read_text().strip() == _base_key(recipe, scienceqa)):
        raise RecipeError(f"{base_dir} holds a base built with other settings than the {recipe.name} recipe's "
                          f"(or from other data); give another --base_dir, or none to build one in the run's folder")


def run_recipe(name, scienceqa_dir, out_dir, evaluate_split="val", base_dir=None, progress=False,
               evaluate_only=False, max_minutes=None, **overrides):
    """data -> tiny base -> fine-tune -> evaluation for the preset `name` (with overrides,
    see get_recipe). Everything goes under out_dir: data/, base/ (unless base_dir is given),
    sft/<name>/, eval_<split>/ and recipe_summary.json. evaluate_split: "val" (the selection
    subset), "test" (the whole test split: for the final number only), "both" or None.
    evaluate_only: evaluate the finished run already in out_dir (same preset and overrides)
    instead of training again: how a recipe chosen on val gets its one test number.

    Every budget is in steps, so the same call gives the same model on any machine (on CPU,
    bit-identical on one CPU type at a fixed thread count); only the time depends on the machine.
    max_minutes is an opt-in limit of the fine-tune: when it ends the run, the kept checkpoint
    is the best one evaluated so far and the summary says the run was cut short
    ("finetune": {"time_limited": true}); it is not the recipe's model then.
    Returns the summary dict."""
    started = time.time()
    recipe = get_recipe(name, **overrides)
    out_dir = Path(out_dir)
    splits = {"val": ("val",), "test": ("test",), "both": ("val", "test"), None: ()}.get(evaluate_split)
    if splits is None:
        raise RecipeError(f"evaluate_split must be val, test, both or None, got {evaluate_split!r}")
    if max_minutes is not None and not max_minutes > 0:
        raise RecipeError(f"max_minutes must be positive, got {max_minutes}")
    if evaluate_only:
        return _evaluate_finished(recipe, scienceqa_dir, out_dir, splits)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {}

    t0 = time.time()
    paths, counts = prepare_recipe_data(recipe, scienceqa_dir, out_dir / "data", splits)
    timings["data_s"] = time.time() - t0

    t0 = time.time()
    if base_dir is not None:
        _check_shared_base(recipe, scienceqa_dir, Path(base_dir))
    base_dir = Path(base_dir) if base_dir is not None else out_dir / "base"
    base, reused = build_base(recipe, scienceqa_dir, base_dir, progress)
    timings["base_s"] = 0.0 if reused else time.time() - t0

    t0 = time.time()
    settings = TrainSettings(**{
        "data_path": str(paths["train"]), "val_path": str(paths["sft_val"]), "source": "base",
        "base_dir": str(base_dir), "out_dir": str(out_dir / "sft"), "output_tag": recipe.sft_tag or recipe.name,
        "num_epochs": 1, **recipe.train})
    limit = TimeLimit(max_minutes, started, num_steps=settings.num_iterations)
    training = finished_finetune(settings) if reused else None
    if training is not None:
        print(f"fine-tune: {settings.run_dir()} already holds this recipe's completed fine-tune (same settings, same "
              f"base): kept, not trained again", flush=True)
    else:
        training = train(settings, on_step=limit.check)
    timings["finetune_s"] = time.time() - t0

    reinforced = None
    if recipe.rl and not limit.reached:
        t0 = time.time()
        reinforced = rl(rl_settings(recipe, paths, settings.run_dir(), out_dir))
        timings["rl_s"] = time.time() - t0

    evaluations = _evaluate_splits(recipe, paths, settings.run_dir(), out_dir, splits, timings,
                                   rl_dir=Path(reinforced["run_dir"]) if reinforced else None)
    timings["total_s"] = time.time() - started
    summary = {
        "recipe": dataclasses.asdict(recipe),
        "counts": counts,
        "base": {k: base.get(k) for k in ("num_params", "vocab_size", "step", "epochs", "val_bpb", "train_seconds",
                                          "tokens_per_s")},
        "base_reused": reused,
        "finetune": {**{k: training.get(k) for k in ("status", "best_checkpoint", "steps_done", "num_steps",
                                                     "best_step", "best_val_loss", "train_conversations",
                                                     "truncated", "elapsed_s")},
                     "time_limited": limit.reached},
        **({"rl": rl_headline(reinforced)} if reinforced else {}),
        "evaluation": evaluations,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "minutes": round(timings["total_s"] / 60, 2),
        "out_dir": str(out_dir),
    }
    write_json(out_dir / "recipe_summary.json", summary)
    if limit.reached and recipe.rl:
        print("warning: the RL stage was left out: the fine-tune it starts from was cut short", file=sys.stderr)
    if limit.reached:
        print(f"warning: --max_minutes {max_minutes:g} stopped the fine-tune at step {training.get('steps_done')} of "
              f"{training.get('num_steps')}; this is not the {recipe.name} recipe's model (drop --max_minutes for it)",
              file=sys.stderr)
    return summary


def finished_finetune(settings) -> dict | None:
    """The run summary of a completed fine-tune in settings.run_dir() made with exactly these
    settings (e.g. a recipe run again to add or change its RL stage), or None."""
    path = settings.run_dir() / "run_summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = summary.get("settings") == json.loads(json.dumps(dataclasses.asdict(settings)))
    kept = summary.get("best_checkpoint") and Path(summary["best_checkpoint"]).is_file()
    return summary if summary.get("status") == "completed" and same and kept else None


class TimeLimit:
    """train(on_step=...) of a recipe's fine-tune: after ESTIMATE_AFTER steps it prints the time
    the rest will take at the rate measured since its first step (the first is a warm-up), and
    an opt-in wall-clock limit: past it, the run stops as at Ctrl-C (keeping the best
    checkpoint evaluated so far) and `reached` says so."""

    ESTIMATE_AFTER = 20

    def __init__(self, minutes, started=None, num_steps=None):
        self.deadline = None if minutes is None else time.time() + 60 * minutes
        self.started = time.time() if started is None else started
        self.num_steps = num_steps
        self.reached = False
        self.first = None  # (step, time) after the warm-up step

    def check(self, record):
        if "train_loss" in record:
            self._estimate(record["step"])
        if self.deadline is not None and time.time() > self.deadline:
            self.reached = True
            raise KeyboardInterrupt

    def _estimate(self, step):
        now, num_steps = time.time(), self.num_steps
        if self.first is None:
            self.first = (step, now)
        elif step - self.first[0] == self.ESTIMATE_AFTER and num_steps:
            per_step = (now - self.first[1]) / self.ESTIMATE_AFTER
            left = (num_steps - step) * per_step / 60
            print(f"fine-tune: {per_step:.2f} s/step over steps {self.first[0] + 1}-{step} -> about {left:.0f} min for "
                  f"the other {num_steps - step:,} steps; the recipe will have taken about "
                  f"{(now - self.started) / 60 + left:.0f} min before its evaluation", flush=True)


def rl_settings(recipe, paths, finetuned_dir, out_dir) -> RLSettings:
    """The RL stage's settings: the kept fine-tuned checkpoint, the recipe's training questions,
    the fine-tune's validation questions (disjoint from the selection set), out_dir/rl/<name>/."""
    return RLSettings(**{"checkpoint": str(finetuned_dir), "data_path": str(paths["train"]),
                         "val_path": str(paths["sft_val"]), "out_dir": str(Path(out_dir) / "rl"),
                         "output_tag": recipe.name, **recipe.rl})


def rl_headline(summary) -> dict:
    """What the recipe summary keeps of an RL run's summary."""
    keys = ("status", "run_dir", "final_checkpoint", "best_checkpoint", "best_step", "steps_done", "num_steps",
            "initial_validation", "final_validation", "best_validation", "elapsed_s")
    return {key: summary[key] for key in keys if key in summary}


def _evaluate_splits(recipe, paths, run_dir, out_dir, splits, timings, rl_dir=None):
    """Evaluate the fine-tune in run_dir (and the RL run in rl_dir, on the same questions, with
    paired differences) on each split's eval file; returns {split: headline}."""
    evaluations = {}
    for split in splits:
        t0 = time.time()
        # a recipe that judges explanations shows its base beside it (what pretraining alone writes)
        eval_settings = EvalSettings(finetuned=str(run_dir), rl=None if rl_dir is None else str(rl_dir),
                                     data_path=str(paths[f"eval_{split}"]),
                                     base=SOURCE_MODEL if recipe.explain else None,
                                     split=split, train_path=str(paths["train"]),
                                     out_dir=str(out_dir / f"eval_{split}"),
                                     max_new_tokens=recipe.eval_max_new_tokens, num_samples=3, sample_max_tokens=32,
                                     constrain_answers=True, explain=recipe.explain)
        result = evaluate(named_models(eval_settings))
        evaluations[split] = headline(result)
        if rl_dir is not None:
            evaluations[split]["rl"] = headline(result, "rl")
            evaluations[split]["paired"] = result.get("paired", {})
        if recipe.choice_scoring and result["settings"]["scoring"] == "letter":
            choice_settings = replace(eval_settings, scoring="choice", generate=False, num_samples=0,
                                      constrain_answers=False, explain=0, base=None, rl=None,
                                      out_dir=str(out_dir / f"eval_{split}_choice"))
            evaluations[split].update(choice_headline(evaluate(choice_settings), result))
        timings[f"eval_{split}_s"] = time.time() - t0
    return evaluations


# what decides the trained model and the evaluation files (not descriptions or timings)
TRAINING_FIELDS = ("tiny", "train", "data", "shuffled_copies", "sft_val_size", "eval_limit", "rl")


def _evaluate_finished(recipe, scienceqa_dir, out_dir, splits):
    """evaluate_only: the run in out_dir must be this recipe's, finished; its summary gains
    the new splits' evaluations (earlier ones are kept)."""
    summary_path = out_dir / "recipe_summary.json"
    if not summary_path.is_file():
        raise RecipeError(f"{summary_path}: no finished recipe run here to evaluate (run it first, without "
                          f"--evaluate_only)")
    summary = json.loads(summary_path.read_text())
    # (runs made before recipes had an RL stage have no "rl": they had none)
    trained = {k: summary.get("recipe", {}).get(k, {} if k == "rl" else None) for k in TRAINING_FIELDS}
    if trained != json.loads(json.dumps({k: getattr(recipe, k) for k in TRAINING_FIELDS}, default=str)):
        raise RecipeError(f"{out_dir} holds a run of other recipe settings ({summary.get('recipe', {}).get('name')}); "
                          f"evaluate it with the settings it was trained with")
    run_dir = out_dir / "sft" / (recipe.sft_tag or recipe.name)
    if not any(run_dir.glob("model_*.pt")):
        raise RecipeError(f"{run_dir}: no fine-tuned checkpoint to evaluate")
    rl_dir = out_dir / "rl" / recipe.name
    if recipe.rl and not any(rl_dir.glob("model_*.pt")):
        raise RecipeError(f"{rl_dir}: no RL checkpoint to evaluate")
    paths, counts = prepare_recipe_data(recipe, scienceqa_dir, out_dir / "data", splits)
    timings = {}
    summary["evaluation"].update(_evaluate_splits(recipe, paths, run_dir, out_dir, splits, timings,
                                                  rl_dir=rl_dir if recipe.rl else None))
    summary["counts"].update(counts)
    summary["timings"].update({k: round(v, 1) for k, v in timings.items()})
    write_json(summary_path, summary)
    return summary


def headline(result, model="finetuned"):
    """The numbers a study row needs from an evaluate() summary of one model (finetuned or rl):
    the scoring rule and its accuracy (also under "<rule>_acc"), generated accuracy, agreement
    with the scored answer, invalid share (fractions) and the question count."""
    rows = {row["name"]: row for row in result["table"]["rows"]}
    generation = result["generation"].get(model) or {}
    constrained = result.get("constrained", {}).get(model) or {}
    scoring = result["settings"].get("scoring", "letter")
    accuracy = rows[model]["cells"]["Avg"]["accuracy"] / 100
    return {
        "count": result["data"]["count"],
        "scoring": scoring,
        "accuracy": accuracy,
        f"{scoring}_acc": accuracy,
        "generated_acc": generation.get("accuracy"),
        "agreement": generation.get("agreement"),
        "invalid": (generation["invalid"] / generation["count"]) if generation else None,
        **{key: generation[key] for key in ("names_an_option", "letter_matches_text") if key in generation},
        "constrained_acc": constrained.get("accuracy"),
        "constrained_agreement": constrained.get("agreement"),
        **({"explanations": result["explanations"]} if result.get("explanations") and model == "finetuned" else {}),
        "out_dir": result["settings"]["out_dir"],
    }


def _per_question(out_dir):
    path = Path(out_dir) / "per_question_finetuned.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def choice_headline(choice_result, letter_result):
    """Choice-scoring accuracy, and how often the greedy reply (from the letter run) names
    the option choice scoring picks."""
    choice = _per_question(choice_result["settings"]["out_dir"])
    letter = _per_question(letter_result["settings"]["out_dir"])
    if [q["pid"] for q in choice] != [q["pid"] for q in letter]:
        raise RecipeError("choice and letter evaluations cover different questions")
    agree = [c["prediction"] == q.get("generated_prediction") for c, q in zip(choice, letter, strict=True)]
    return {"choice_acc": sum(c["correct"] for c in choice) / len(choice),
            "choice_generated_agreement": sum(agree) / len(agree) if letter and "generated_prediction" in letter[0]
            else None,
            "choice_out_dir": choice_result["settings"]["out_dir"]}


@dataclass
class RecipeCommand:
    """`python -m sciassist.pipelines.recipes`: which recipe, on which data, into which folder."""

    preset: str = setting("cpu", "the recipe", choices=sorted(RECIPES))
    scienceqa: str = setting(None, "ScienceQA directory (lupantech layout) or 'sample'", required=True)
    out_dir: str = setting(None, "where the run's data, base, fine-tune and evaluations go", required=True)
    split: str = setting("val", "what to evaluate on (test: only for a final number)",
                         choices=["val", "test", "both", "none"])
    evaluate_only: bool = setting(False, "evaluate the finished run in --out_dir on --split instead of training "
                                         "(the one test number of a recipe chosen on val)")
    base_dir: str | None = setting(None, "reuse the tokenizer + base in this folder when it was built with the same "
                                         "settings (another run's <out_dir>/base); default <out_dir>/base")
    threads: int = setting(1, THREADS_HELP, at_least=1, at_most=4096)
    max_minutes: float | None = setting(None, "opt-in: stop the fine-tune after this many minutes (the result is "
                                              "then not the recipe's model; the summary says so)", above=0)


def main(argv=None):
    parser = settings_parser(RecipeCommand, "python -m sciassist.pipelines.recipes",
                             "Run a whole recipe: data -> tiny base -> fine-tune -> evaluation.")
    command = settings_from_namespace(RecipeCommand, parser.parse_args(argv))
    announce_threads(command.threads)
    try:
        summary = run_recipe(command.preset, command.scienceqa, command.out_dir,
                             evaluate_split=None if command.split == "none" else command.split, progress=True,
                             evaluate_only=command.evaluate_only, max_minutes=command.max_minutes,
                             base_dir=command.base_dir)
    except (UserError, CheckpointError) as e:
        return print_error(e)
    print(json.dumps({"minutes": summary["minutes"], "evaluation": summary["evaluation"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

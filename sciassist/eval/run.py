"""
ScienceQA evaluation of nanochat checkpoints: a base model, a fine-tuned one and, optionally,
an RL one (the fine-tune after python -m sciassist.train.rl), on exactly the same questions.

    python sciassist_evaluate.py --base sft:d20 --finetuned finetuned_model_checkpoint/sciassist --split val
    python sciassist_evaluate.py --rl finetuned_model_checkpoint/rl --finetuned source --base source

The models are the pipeline's stages, named by flag (--base, --finetuned, --rl; any one or
more) rather than by a free list: each stage has a fixed name in every file (predictions_rl.json,
the table's "rl" rows), the comparisons are fixed (fine-tuned - base, RL - fine-tuned, RL - base,
sciassist.eval.table.COMPARISONS), and "source" can follow the chain back: --finetuned source
is the model the --rl run started from (its meta's source_model), --base source the model the
--finetuned run started from, or, without --finetuned, the one the --rl run started from. The
models are loaded, run and freed one at a time, base first.

Each model's answer is read two ways (sciassist.eval.scoring):

1. Scored. Letter scoring: the letter, among the question's, that the model finds most
   likely right after the answer prefix "The correct answer is". Choice scoring: the option
   whose whole answer line, as training writes it, is most likely. Deterministic, and never
   an unparseable answer. Which one is the headline number follows from the answer format
   (sciassist.data.answers.answer_line), read from the evaluated file's reference answers
   with --answer_format auto: letter scoring for letter_first data (the default format),
   choice scoring for text_first data, where the letter only comes after the option text
   and letter scoring cannot apply. --scoring forces one.

2. Generated. Greedy decoding with the KV-cache engine, then a strict parse of "The correct
   answer is X" (text_first: "The correct answer is <option> (X)", the text being that
   option's; sciassist.data.answers.parse_answer). An answer that does not parse counts as
   wrong and is reported as invalid; the agreement with the scored answer is reported too.

--prompt_style nanochat asks the way nanochat's own multiple-choice evaluation does (the
question, options as "- choice=A" lines, "Respond only with the letter of the correct
answer.", no system prompt, the letter as the reply's first token): the fair prompt for an
unmodified nanochat chat model, which never saw the SciAssist answer format.

--explain N gives the first N questions with a gold solution a full tutor reply and judges
its explanation by the ScienceQA paper's BLEU-1, BLEU-4, ROUGE-L and sentence similarity
(sciassist.eval.explain), the models side by side.

The results (sciassist.eval.table: the ScienceQA table with chance and majority rows, 95%
Wilson intervals, topics; with --rl, the paired differences of every comparison) go into
--out_dir (sciassist.eval.report: results.json, the benchmark's predictions_*.json,
per_question_*.jsonl, samples.md, report.md, plots).
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint import CheckpointError, meta_path, model_steps, read_meta
from sciassist.checkpoints import NEWEST, SPEC_HELP, choose_checkpoint, is_repo_id
from sciassist.common import (
    AUTO,
    THREADS_HELP,
    UserError,
    announce_threads,
    check_fields,
    print_error,
    resolve_device,
    setting,
    settings_from_namespace,
    settings_parser,
    write_json,
)
from sciassist.data.answers import ANSWER_FORMATS, detect_answer_format, text_first_breakdown
from sciassist.data.scienceqa import FormatOptions
from sciassist.eval.benchmarks import load_benchmark, parse_benchmarks
from sciassist.eval.explain import (
    DEFAULT_SIMILARITY_MODEL,
    explain_indices,
    judge_explanations,
    paired_explanations,
)
from sciassist.eval.models import model_info, run_models
from sciassist.eval.questions import (
    PROMPT_STYLES,
    SCORING_MODES,
    EvaluationError,
    load_questions,
    resolve_scoring,
    train_letter_counts,
    user_text,
)
from sciassist.eval.report import (
    draw_accuracy_chart,
    draw_loss_curve,
    report_markdown,
    samples_markdown,
    write_model_files,
)
from sciassist.eval.scoring import AUTO_BATCH_SIZE, BatchSize, batches_of
from sciassist.eval.table import (
    MODEL_NAMES,
    build_table,
    format_table_markdown,
    format_table_text,
    generation_summary,
    majority_predictions,
    paired_summary,
    topic_breakdown,
)
from sciassist.eval.transfer import benchmark_run, benchmark_summary, draw_benchmark_chart, scienceqa_summary
from sciassist.memory import OutOfMemory, card_of, first_line, is_out_of_memory, release_memory
from sciassist.plots import parse_training_log, read_metrics

SOURCE_MODEL = "source"


@dataclass
class EvalSettings:
    """Every option of an evaluation, with its default (the CLI, the notebook, the training
    run's --eval_after and the tests all start from this)."""

    base: str | None = setting(None, f"base model: {SPEC_HELP}, or {SOURCE_MODEL} (the model the fine-tuned run "
                                     f"started from, read from its meta; without --finetuned, the one the --rl run "
                                     f"started from)")
    finetuned: str | None = setting(None, f"fine-tuned model, e.g. a fine-tune output dir: {SPEC_HELP}, or "
                                          f"{SOURCE_MODEL} (the model the --rl run started from, read from its meta)")
    rl: str | None = setting(None, f"RL model, e.g. the output dir of python -m sciassist.train.rl: {SPEC_HELP}; "
                                   f"compared with base and fine-tuned on the same questions")
    base_dir: str | None = setting(None, "nanochat base dir for source[:tag[:step]] models "
                                         "(default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    data_path: str | None = setting(None, "prepared JSONL (default: data/scienceqa_<split>.jsonl)")
    scienceqa: str | None = setting(None, "evaluate straight from a ScienceQA source instead: sample | hf | DIR")
    split: str = setting("val", "the split to evaluate: train | val | test", choices=["train", "val", "test"])
    limit: int | None = setting(None, "at most this many questions (JSONL: the first N; source: a seeded subset)",
                                at_least=1)
    seed: int = setting(42, "subset seed with --scienceqa", at_least=0)
    skip_bad_records: bool = setting(False, "with --scienceqa: leave out (and count) source records with a field of "
                                            "the wrong type instead of stopping")
    prompt_style: str = setting("sciassist", "sciassist = the training format; nanochat = nanochat's own "
                                             "multiple-choice prompt", choices=list(PROMPT_STYLES))
    scoring: str = setting("auto", "letter = the letter after the answer prefix; choice = each option's whole "
                                   "answer line as training writes it (sciassist prompt style only); auto = letter, "
                                   "or choice for text_first answers", choices=["auto", *SCORING_MODES])
    answer_format: str = setting("auto", "letter_first | text_first: how the fine-tune's answers were written "
                                         "(python -m sciassist.data.prepare --answer_format); auto reads it from "
                                         "the evaluated file's reference answers (letter_first with --scienceqa)",
                                 choices=["auto", *ANSWER_FORMATS])
    batch_size: int | str = setting(AUTO, f"questions per forward pass and per generation batch: auto = "
                                          f"{AUTO_BATCH_SIZE}, or a number to start from. Either is halved when a "
                                          f"batch runs out of memory (one line each time), and the size that fitted "
                                          f"is kept for the rest of the evaluation; results match at any size up to "
                                          f"the rounding of the forward passes",
                                    at_least=1, auto=True)
    generate: bool = setting(True, "generate greedy replies and parse them strictly; --no_generate skips them")
    constrain_answers: bool = setting(False, "also decode the answer line greedily with every token kept on one of "
                                             "the question's answer lines (sciassist prompt style): a stated mode, "
                                             "reported beside the free reply, never replacing it")
    max_new_tokens: int = setting(32, "generation length (\"The correct answer is X. <choice>\"; text_first "
                                      "needs more for long options)", at_least=1)
    num_samples: int = setting(5, "questions shown side by side in samples.md", at_least=0)
    sample_max_tokens: int = setting(128, "reply length for samples.md (room for the explanation)", at_least=1)
    explain: int = setting(0, "generate the full tutor reply for the first N questions that have a gold solution "
                              "and score its explanation against lecture + solution with the ScienceQA paper's "
                              "BLEU-1, BLEU-4, ROUGE-L and sentence similarity (sciassist.eval.explain); 0 = off",
                           at_least=0)
    explain_max_tokens: int = setting(256, "reply length for --explain (capped so prompt + reply fit the model's "
                                           "sequence_len)", at_least=1)
    similarity_model: str = setting(DEFAULT_SIMILARITY_MODEL, "sentence-transformers model (hub name or local "
                                                              "folder) for --explain's sentence similarity")
    train_path: str | None = setting(None, "train JSONL for the majority row "
                                           "(default: scienceqa_train.jsonl beside the data)")
    metrics_path: str | None = setting(None, "metrics.jsonl of a run to re-draw (default: <finetuned>/metrics.jsonl)")
    log_file: str | None = setting(None, "text log of a training run (e.g. the original project's) to draw as well")
    benchmarks: str = setting("", "other benchmarks beside ScienceQA, comma-separated: arc_easy, arc_challenge, "
                                  "openbookqa, sciq (transfer), mmlu, mmlu_science, mmlu:<subject> (forgetting); "
                                  "the same --split (val = their validation split), --limit and prompt style")
    benchmark_dir: str | None = setting(None, "read the benchmarks from this local root (datasets save_to_disk "
                                              "folders or .jsonl files: ai2_arc/ARC-Easy/validation, "
                                              "mmlu/<subject>/test, ...) instead of the Hugging Face hub")
    benchmark_revision: str | None = setting(None, "hub revision of the benchmarks (default: the pinned one of each)")
    out_dir: str = setting("eval_results", "where the files are written")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)")
    threads: int | None = setting(None, THREADS_HELP, at_least=1, at_most=4096)


@dataclass(frozen=True)
class RunOptions:
    """How each model is run on the questions (sciassist.eval.models.run_model). run_options()
    makes one from EvalSettings, with the answer format and the scoring rule resolved."""

    prompt_style: str = EvalSettings.prompt_style
    scoring: str = "letter"  # letter | choice, never auto
    answer_format: str = "letter_first"  # letter_first | text_first, never auto
    batch_size: int | str | BatchSize = EvalSettings.batch_size  # run_options: one BatchSize for every model
    generate: bool = EvalSettings.generate
    max_new_tokens: int = EvalSettings.max_new_tokens
    constrain_answers: bool = EvalSettings.constrain_answers
    sample_indices: tuple[int, ...] = ()  # questions also answered at sample_max_tokens, for samples.md
    sample_max_tokens: int = EvalSettings.sample_max_tokens
    explain_indices: tuple[int, ...] = ()  # questions given a full tutor reply, for --explain
    explain_max_tokens: int = EvalSettings.explain_max_tokens


def run_options(settings, records):
    """The RunOptions of `settings` on these questions: answer_format "auto" read from their
    reference answers, scoring "auto" resolved from it (resolve_scoring)."""
    answer_format = detect_answer_format(records) if settings.answer_format == "auto" else settings.answer_format
    scoring = resolve_scoring(settings.scoring, answer_format, settings.prompt_style)
    # samples.md shows longer replies (room for the explanation) unless the main
    # generation is already as long; then its texts are reused
    longer = settings.sample_max_tokens > (settings.max_new_tokens if settings.generate else 0)
    sample_indices = tuple(range(min(settings.num_samples, len(records)))) if longer else ()
    return RunOptions(prompt_style=settings.prompt_style, scoring=scoring, answer_format=answer_format,
                      batch_size=batches_of(settings.batch_size), generate=settings.generate,
                      max_new_tokens=settings.max_new_tokens, constrain_answers=settings.constrain_answers,
                      sample_indices=sample_indices,
                      sample_max_tokens=settings.sample_max_tokens,
                      explain_indices=explain_indices(records, settings.explain),
                      explain_max_tokens=settings.explain_max_tokens)


# ----------------------------------------------------------------------------- the whole evaluation

def _check_settings(settings, models):
    """Refuse bad settings before any model is loaded; returns {name: spec} of the models to load."""
    check_fields(settings, EvaluationError)  # each field's declared choices and range
    if settings.scoring == "choice" and settings.prompt_style != "sciassist":
        raise EvaluationError("--scoring choice scores the SciAssist answer line; use it with --prompt_style sciassist")
    if settings.constrain_answers and settings.prompt_style != "sciassist":
        raise EvaluationError("--constrain_answers keeps the reply on the SciAssist answer lines; use it with "
                              "--prompt_style sciassist")
    parse_benchmarks(settings.benchmarks)
    specs = {name: getattr(settings, name) for name in MODEL_NAMES
             if getattr(settings, name) is not None and name not in models}
    if not specs and not models and settings.metrics_path is None and settings.log_file is None:
        raise EvaluationError("nothing to do: give --base, --finetuned and/or --rl (or --log_file / --metrics_path "
                              "to only draw a loss curve)")
    # Fail on a bad log before spending minutes on models.
    if settings.log_file is not None:
        try:
            parse_training_log(settings.log_file)
        except (OSError, ValueError) as e:
            raise EvaluationError(f"--log_file: {e}") from None
    if settings.metrics_path is not None:
        try:
            read_metrics(settings.metrics_path)
        except (OSError, ValueError) as e:
            raise EvaluationError(f"--metrics_path: {e}") from None
    # A missing checkpoint too (choosing one reads no weights); a hub repo id is left to its
    # download, made once, when the model is loaded.
    for spec in specs.values():
        if not is_repo_id(str(spec)):
            choose_checkpoint(spec, base_dir=settings.base_dir)
    return specs


def _results(settings, options, records, runs):
    """(table, topics, generation) of the runs, with the majority and chance rows."""
    letter_counts, majority_source = train_letter_counts(records, settings.train_path, settings.scienceqa,
                                                         settings.data_path, settings.split)
    predictions = {name: run["prediction"] for name, run in runs.items()}
    for name, run in runs.items():
        if run["generated_prediction"] is not None:
            predictions[f"{name} (generated)"] = run["generated_prediction"]
        if run.get("constrained_prediction") is not None:
            predictions[f"{name} (constrained)"] = run["constrained_prediction"]
    predictions["majority"] = majority_predictions(records, letter_counts)
    table = build_table(records, predictions)
    table["majority_source"] = majority_source
    table["majority_letter"] = letter_counts.most_common(1)[0][0] if letter_counts else None
    topics = topic_breakdown(records, predictions)
    generation = {name: generation_summary(records, run) for name, run in runs.items()}
    if options.answer_format == "text_first" and options.prompt_style == "sciassist":
        for name, run in runs.items():
            if generation[name] is not None:
                generation[name].update(text_first_breakdown(run["generated"], records))
    return table, topics, generation


def benchmark_format(records, answer_format):
    """How the benchmarks' questions are written: as the evaluated ScienceQA questions are (their
    system prompt or none, their options layout) with their answer format, so that a benchmark
    is asked the way the fine-tune was trained."""
    messages = records[0]["messages"]
    system = messages[0]["content"] if messages and messages[0].get("role") == "system" else ""
    text = user_text(records[0])
    layout = "letter_after" if "\nA. " not in text and " (A)" in text else "letter_first"
    return FormatOptions(system_prompt=system, answer_format=answer_format, options_layout=layout,
                         include_explanation=False, include_background=False)


def constrained_summaries(records, runs):
    """Per model, the constrained replies read like generated ones (accuracy, agreement with the
    scored answer; never invalid: every constrained reply is one of the answer lines)."""
    return {name: generation_summary(records, {"generated_prediction": run["constrained_prediction"],
                                               "prediction": run["prediction"]})
            for name, run in runs.items() if run.get("constrained_prediction") is not None}


def _write_summary_files(out_dir, files, summary, records, runs, settings, options):
    """table.md, samples.md and report.md, then results.json (the summary, which lists them)."""
    (out_dir / "table.md").write_text(format_table_markdown(summary["table"]) + "\n", encoding="utf-8")
    files["table_md"] = "table.md"
    files["report"] = "report.md"
    files["results"] = "results.json"
    shown = list(range(min(settings.num_samples, len(records))))
    (out_dir / "samples.md").write_text(samples_markdown(records, runs, shown, settings.split, options),
                                        encoding="utf-8")
    files["samples"] = "samples.md"
    (out_dir / "report.md").write_text(report_markdown(summary), encoding="utf-8")
    write_json(out_dir / "results.json", summary)


def _fitting(device, work):
    """work(), with running out of memory where even a batch of 1 does not fit (or a model does
    not load) turned into an EvaluationError that names the card and what to try."""
    try:
        return work()
    except Exception as e:  # noqa: BLE001 - only out-of-memory becomes advice; the rest is re-raised
        if not (isinstance(e, OutOfMemory) or is_out_of_memory(e)):
            raise
        problem = first_line(e)
    release_memory(device)  # outside the except block, whose traceback holds the failed frames
    card = card_of(device)
    raise EvaluationError(f"out of memory on {card.describe() if card else device}: {problem}; try a shorter "
                          f"--max_new_tokens, another card, or --device cpu")


def evaluate(settings, models=None):
    """Run the evaluation and write every file into settings.out_dir; returns the summary
    (also written as results.json; its "settings" show the resolved answer_format and
    scoring). models: optional {"base"|"finetuned"|"rl": (model, tokenizer, info)} already in
    memory (the end of a training run), used instead of loading. With an RL model, the summary
    also holds "paired" (sciassist.eval.table.paired_summary) and each benchmark "changes"."""
    started = time.perf_counter()
    models = dict(models or {})
    specs = _check_settings(settings, models)
    out_dir = Path(settings.out_dir)  # made once every input has been read: a bad one leaves no folder behind
    files = {}
    if not specs and not models:
        loss_summary = draw_loss_curve(out_dir, files, settings.metrics_path, settings.log_file, settings.finetuned)
        summary = {"settings": dataclasses.asdict(settings), "loss_curve": loss_summary, "files": files}
        write_json(out_dir / "results.json", summary)
        print(f"loss curve written to {out_dir / 'loss_curve.png'} (no models given, nothing else to evaluate)")
        return summary

    source_format = "letter_first" if settings.answer_format == "auto" else settings.answer_format
    records, data_info = load_questions(settings.data_path, settings.scienceqa, settings.split,
                                        settings.limit, settings.seed, source_format, settings.skip_bad_records)
    options = run_options(settings, records)
    asked = benchmark_format(records, options.answer_format)
    benchmarks = [(b, *load_benchmark(b, settings.split, settings.benchmark_dir, settings.seed, settings.limit,
                                      settings.benchmark_revision, asked))
                  for b in parse_benchmarks(settings.benchmarks)]
    device = resolve_device(settings.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_summary = draw_loss_curve(out_dir, files, settings.metrics_path, settings.log_file, settings.finetuned)
    if device.type == "cpu":
        announce_threads(settings.threads)

    def on_benchmarks(name, model, tokenizer):
        results = {}
        for benchmark, bench_records, _ in benchmarks:
            print(f"[{name}] {benchmark.title}: {len(bench_records)} questions", flush=True)
            results[benchmark.name] = benchmark_run(model, tokenizer, bench_records, settings.prompt_style,
                                                    options.batch_size, settings.generate, settings.max_new_tokens,
                                                    options.answer_format)
        return results

    runs, infos = _fitting(device, lambda: run_models(models, specs, records, options, device, settings.base_dir,
                                                      also=on_benchmarks if benchmarks else None))
    table, topics, generation = _results(settings, options, records, runs)
    write_model_files(out_dir, files, records, runs)
    write_json(out_dir / "table.json", table)
    files["table_json"] = "table.json"
    draw_accuracy_chart(out_dir, files, table, list(runs),
                        title=f"ScienceQA {settings.split}: accuracy by category ({options.scoring} scoring)")
    summary = {
        "settings": {**dataclasses.asdict(settings), "answer_format": options.answer_format,
                     "scoring": options.scoring, "batch_size": options.batch_size.size},
        "data": data_info,
        "models": infos,
        "table": table,
        "topics": topics,
        "generation": generation,
        "timing": {name: run["timing"] for name, run in runs.items()},
        "prompt_tokens_over_sequence_len": {name: run["prompt_tokens_over_sequence_len"] for name, run in runs.items()},
        "loss_curve": loss_summary,
        "device": str(device),
        "files": files,
    }
    if options.constrain_answers:
        summary["constrained"] = constrained_summaries(records, runs)
    if "rl" in runs:
        summary["paired"] = paired_summary(records, runs)
    if benchmarks:
        summary["benchmarks"] = [scienceqa_summary(records, runs, settings.split, options.scoring)]
        summary["benchmarks"] += [
            benchmark_summary(info, bench_records, {name: run["also"][b.name] for name, run in runs.items()})
            for b, bench_records, info in benchmarks]
        draw_benchmark_chart(out_dir / "benchmarks.png", summary["benchmarks"])
        files["benchmarks_chart"] = "benchmarks.png"
    if settings.explain:
        summary["explanations"], summary["explanations_info"], per_question = judge_explanations(
            out_dir, files, records, runs, options.explain_indices, settings.similarity_model, settings.explain)
        if "rl" in runs:
            summary["paired"].update(paired_explanations(per_question))
    summary["total_s"] = time.perf_counter() - started
    _write_summary_files(out_dir, files, summary, records, runs, settings, options)
    print(format_table_text(table))
    print(f"(majority row: most common gold letter of {table['majority_source']}; files in {out_dir})")
    return summary


# ----------------------------------------------------------------------------- after training, and the CLI

def _run_meta(run_dir, step):
    """The meta of a run's checkpoint; {} without one (an in-memory model needs none)."""
    if step is None:
        return {}
    try:
        return read_meta(meta_path(run_dir, step))
    except CheckpointError:
        return {}


def evaluate_after_training(output_dir, base=None, data_path=None, scienceqa=None, split="val", limit=None,
                            out_dir=None, model=None, tokenizer=None, data_dir=None, **overrides):
    """Evaluate a fine-tuning run's output dir (the checkpoint with the largest step, or the
    given in-memory model/tokenizer) against `base`, writing into <output_dir>/eval by
    default; the same code and files as `python sciassist_evaluate.py`. Returns the summary.

    base: any model spec sciassist.checkpoints accepts; default: the model the run started
    from (meta "source_model" of the run's checkpoint), when that file still exists.
    data_dir: where the prepared scienceqa_<split>.jsonl is, when data_path is not given.
    overrides: any other EvalSettings field (device, batch_size, max_new_tokens, ...)."""
    output_dir = Path(output_dir)
    steps = model_steps(output_dir)
    step = steps[-1] if steps else None
    meta = _run_meta(output_dir, step)
    if base is None:
        source_model = meta.get("source_model")
        if source_model and Path(source_model).exists():
            base = str(source_model)
    if data_path is None and scienceqa is None and data_dir is not None:
        data_path = str(Path(data_dir) / f"scienceqa_{split}.jsonl")
    given = dict(base=base, finetuned=str(output_dir), data_path=data_path, scienceqa=scienceqa, split=split,
                 limit=limit, out_dir=str(out_dir or output_dir / "eval"))
    settings = EvalSettings(**{**given, **overrides})
    models = None
    if model is not None:
        if tokenizer is None:
            raise ValueError("evaluate_after_training: model given without its tokenizer")
        info = model_info(model, meta, spec=str(output_dir), checkpoint_dir=output_dir, step=step)
        models = {"finetuned": (model, tokenizer, info)}
    return evaluate(settings, models)


def _is_source(spec):
    return spec == SOURCE_MODEL and not Path(spec).exists()  # a folder named "source" is that folder


def _source_of(spec, settings, flag):
    """The model file the run `spec` started from (its meta's source_model), for `flag` source."""
    choice = choose_checkpoint(spec, base_dir=settings.base_dir)
    source = _run_meta(choice.checkpoint_dir, choice.step).get("source_model")
    if not source or not Path(source).exists():
        raise EvaluationError(f"{flag} {SOURCE_MODEL}: {choice.model_file}'s meta names no source model that "
                              f"exists here ({source!r}); give {flag} explicitly (e.g. sft:d20)")
    return str(source)


def named_models(settings):
    """The settings with newest and source replaced by what they name. newest: the newest run
    under finetuned_model_checkpoint/. source: the model the next stage's run started from
    (its meta's source_model): --finetuned source is where the --rl run started; --base source
    where the --finetuned run started (after its own source is resolved), or without
    --finetuned where the --rl run started."""
    def newest(spec):
        if spec == NEWEST and not Path(spec).exists():
            return str(choose_checkpoint(NEWEST).checkpoint_dir)
        return spec

    rl, finetuned, base = newest(settings.rl), newest(settings.finetuned), settings.base
    if _is_source(rl):
        raise EvaluationError(f"--rl {SOURCE_MODEL}: {SOURCE_MODEL} names the model a run started from; give --rl "
                              f"the RL run (its folder, a model_<step>.pt, or newest)")
    if _is_source(finetuned):
        if rl is None:
            raise EvaluationError(f"--finetuned {SOURCE_MODEL} is the model the RL run started from: give --rl RUN_DIR")
        finetuned = _source_of(rl, settings, "--finetuned")
    if _is_source(base):
        later = finetuned if finetuned is not None else rl
        if later is None:
            raise EvaluationError(f"--base {SOURCE_MODEL} is the model the fine-tuned run started from: give "
                                  f"--finetuned RUN_DIR (or newest), or --rl RUN_DIR for the RL run's")
        base = _source_of(later, settings, "--base")
    return dataclasses.replace(settings, rl=rl, finetuned=finetuned, base=base)


def build_arg_parser():
    return settings_parser(EvalSettings, prog="sciassist_evaluate.py",
                           description="Evaluate nanochat checkpoints on ScienceQA (base, fine-tuned and RL on "
                                       "the same questions): letter or choice scoring, generated answers, the "
                                       "ScienceQA table, paired differences, plots and a report.")


def main(argv=None):
    settings = settings_from_namespace(EvalSettings, build_arg_parser().parse_args(argv))
    try:
        evaluate(named_models(settings))
    except (UserError, CheckpointError, OSError) as e:
        return print_error(e)
    return 0

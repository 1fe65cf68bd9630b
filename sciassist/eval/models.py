"""One model on the questions: where it comes from (model_info; load_for_evaluation, a spec
through sciassist.checkpoints, the one resolver) and how it is run (run_model: scored answers,
generated replies, timings). `options` is a
sciassist.eval.run.RunOptions (prompt_style, scoring, answer_format, batch_size, generate,
max_new_tokens, sample_indices, sample_max_tokens, explain_indices, explain_max_tokens), read
by attribute.
"""

import dataclasses
import gc
import sys
import time

import torch

from sciassist.checkpoints import choose_checkpoint, load_choice
from sciassist.common import synchronize
from sciassist.data.answers import ANSWER_PREFIX, parse_answer
from sciassist.eval.explain import tutor_replies
from sciassist.eval.questions import SCORING_MODES, EvaluationError, prompts_for
from sciassist.eval.scoring import (
    answer_prefix_check,
    argmax,
    batches_of,
    check_count,
    choice_token_scores,
    constrained_choice,
    generate_answers,
    letter_probabilities,
    softmax,
    summed,
)
from sciassist.eval.table import MODEL_NAMES

# ----------------------------------------------------------------------------- where a model comes from

def model_info(model, meta=None, spec=None, checkpoint_dir=None, step=None):
    """The report's description of a model: where it came from, its shape, a few meta values."""
    meta = meta or {}
    keep = ("val_loss", "best_val_loss", "val_bpb", "source_model", "mmlu_acc", "arc_easy_acc")
    return {
        "spec": spec,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
        "step": step if step is not None else meta.get("step"),
        "model_config": dataclasses.asdict(model.config),
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(model.get_device()),
        "meta": {k: meta[k] for k in keep if k in meta},
    }


def load_for_evaluation(spec, base_dir=None, device="auto"):
    """(model, tokenizer, model_info) for a --base / --finetuned / --rl value (see sciassist.checkpoints)."""
    choice = choose_checkpoint(spec, base_dir=base_dir)
    loaded = load_choice(choice, device)
    info = model_info(loaded.model, loaded.meta, spec=spec, checkpoint_dir=choice.checkpoint_dir, step=choice.step)
    return loaded.model, loaded.tokenizer, info


# ----------------------------------------------------------------------------- running it

def _timed(device, work):
    """(work(), seconds), the GPU's queued work included."""
    t0 = time.perf_counter()
    result = work()
    synchronize(device)
    return result, time.perf_counter() - t0


def _per_s(count, seconds):
    return count / seconds if seconds > 0 else None


def run_model(model, tokenizer, records, options):
    """Scoring (+ generation) of one model on the questions, as `options` (RunOptions) say.
    Returns a dict of per-question lists (probabilities, prediction, generated,
    generated_prediction), the longer sample replies and timings. options.scoring "choice":
    probabilities and prediction come from choice scoring, "letter" from letter scoring."""
    prompts, prefix = prompts_for(records, options.prompt_style)
    if options.scoring not in SCORING_MODES:
        raise EvaluationError(f"scoring must be one of {', '.join(SCORING_MODES)}, got {options.scoring!r}")
    batches = batches_of(options.batch_size)  # checked before any work, as the CLI checks it; shared by every pass
    if options.generate:
        check_count("max_new_tokens", options.max_new_tokens)
    if options.sample_indices:
        check_count("sample_max_tokens", options.sample_max_tokens)
    num_choices = [len(r["meta"]["choices"]) for r in records]
    choices = [r["meta"]["choices"] for r in records]
    device = model.get_device()

    def lines():
        return choice_token_scores(model, tokenizer, prompts, choices, prefix, batches, options.answer_format)

    choice_pass = None  # (continuations, token scores) of every answer line, once choice scoring ran them

    def score():
        nonlocal choice_pass
        if options.scoring == "choice":
            choice_pass = lines()
            return [softmax(scores) for scores in summed(choice_pass[1])]
        return letter_probabilities(model, tokenizer, prompts, num_choices, prefix, batches)

    synchronize(device)
    probabilities, scoring_s = _timed(device, score)
    run = {
        "probabilities": probabilities,
        "prediction": [argmax(p) for p in probabilities],
        "generated": None,
        "generated_prediction": None,
        "constrained_prediction": None,
        "samples": {},
        "timing": {"scoring_s": scoring_s, "scoring_questions_per_s": _per_s(len(records), scoring_s)},
        "prompt_tokens_over_sequence_len": sum(len(tokenizer.render_for_completion(p)) > model.config.sequence_len
                                               for p in prompts),
    }
    if options.generate:
        texts, generate_s = _timed(device, lambda: generate_answers(model, tokenizer, prompts, options.max_new_tokens,
                                                                    batches))
        run["generated"] = texts
        run["generated_prediction"] = [parse_answer(t, k, prefix, c, options.answer_format)
                                       for t, k, c in zip(texts, num_choices, choices, strict=True)]
        run["timing"].update(generate_s=generate_s, generate_questions_per_s=_per_s(len(records), generate_s))
    if options.constrain_answers:
        # choice scoring already ran every answer line; letter scoring needs that pass now
        (continuations, token_scores), constrain_s = _timed(device, lambda: choice_pass or lines())
        run["constrained_prediction"] = [constrained_choice(c, t)
                                         for c, t in zip(continuations, token_scores, strict=True)]
        run["timing"]["constrained_s"] = constrain_s
    if options.sample_indices:
        # longer replies for the few questions shown in samples.md (the explanation too)
        t0 = time.perf_counter()
        texts = generate_answers(model, tokenizer, [prompts[i] for i in options.sample_indices],
                                 options.sample_max_tokens, batches)
        run["samples"] = dict(zip(options.sample_indices, texts, strict=True))
        run["timing"]["samples_s"] = time.perf_counter() - t0
    if options.explain_indices:
        # full tutor replies for --explain (sciassist.eval.explain scores their explanations)
        run["explanation_replies"], run["timing"]["explain_s"] = _timed(device, lambda: tutor_replies(
            model, tokenizer, [records[i] for i in options.explain_indices], options.explain_max_tokens, batches))
    return run


def run_models(in_memory, specs, records, options, device, base_dir=None, also=None):
    """Run base, then fine-tuned, then RL (sciassist.eval.table.MODEL_NAMES, those given): each
    taken (popped) from `in_memory` {name: (model, tokenizer, info)} or loaded from its spec in
    `specs` {name: spec} (onto `device`, under base_dir), and freed after its run, so that one
    model at a time is held. also(name, model, tokenizer): more work for each model while it is
    loaded (the benchmarks), its result kept as run["also"]. Returns ({name: run},
    {name: model_info + answer_prefix_*})."""
    runs, infos = {}, {}
    for name in MODEL_NAMES:
        if name not in in_memory and name not in specs:
            continue
        t0 = time.perf_counter()
        if name in in_memory:
            model, tokenizer, info = in_memory.pop(name)
        else:
            model, tokenizer, info = load_for_evaluation(specs[name], base_dir, device)
        load_s = time.perf_counter() - t0
        print(f"[{name}] {info.get('checkpoint_dir') or info.get('spec')} step {info.get('step')}: "
              f"{options.scoring} scoring {len(records)} questions", file=sys.stderr, flush=True)
        run = run_model(model, tokenizer, records, options)
        run["timing"]["load_s"] = load_s
        if also is not None:
            run["also"] = also(name, model, tokenizer)
        matching, checked = None, None
        if options.prompt_style == "sciassist":
            matching, checked = answer_prefix_check(tokenizer, records, ANSWER_PREFIX, options.scoring,
                                                    options.answer_format)
        runs[name] = run
        infos[name] = dict(info, answer_prefix_matches=matching, answer_prefix_checked=checked)
        del model, tokenizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return runs, infos

"""
Reinforcement learning on the model's own answers (nanochat's chat_rl.py, for multiple choice).

    sciassist rl --checkpoint finetuned_model_checkpoint/finetuned      # = python -m sciassist.train.rl
    sciassist rl --checkpoint sft:d20 --data_path data/scienceqa_train.jsonl --num_steps 200
    sciassist rl --checkpoint sft:d20 --lora_rank 16                    # LoRA adapters, the base frozen
    torchrun --nproc_per_node=8 -m sciassist.train.rl --checkpoint sft:d20   # 8 processes, 2 questions each

Each step asks questions_per_step questions (sciassist.train.rl_questions: chosen by (seed,
step), options shuffled), samples samples_per_question replies to each, rewards every reply with
the evaluator's strict parser (sciassist.train.rl_reward), and updates the model with the
group-relative, token-normalised policy gradient (sciassist.train.rl_step) under the fine-tune's
precision policy and optimizers (Muon + AdamW, built by the same function), every learning rate
x init_lr_frac, decayed linearly to zero over the run.

Several processes (torchrun; NCCL on GPUs, gloo on CPUs, sciassist.train.setup.distributed_runtime):
each rank samples and trains on its own equal share of every step's questions (questions_per_step
must divide among them), every reply drawn with its own seed, so the ranks together sample what one
process would; the samples are exchanged, the gradients summed, and every rank takes the same
update: the one-process run's, up to float rounding (sciassist.train.rl_ranks). Validation is shared
too. Rank 0 alone writes files.

LoRA (--lora_rank R > 0, sciassist.train.lora, as fine-tuning has it): adapters in the block
projections train, with Muon at --lora_lr x init_lr_frac; the base is frozen. The replies are sampled
from the adapted model with dropout off (eval mode); the policy gradient runs in train mode, LoRA's
dropout drawing from a generator seeded by (seed, step, rank).

The run folder, <out_dir>/<output_tag>/ (sciassist.train.files keeps it as the fine-tune does):

  model_<step>.pt, meta_<step>.json  the run's model in nanochat's layout (`sciassist chat/evaluate
                                     --checkpoint <folder>`): with --keep best (the default) and
                                     --val_path, the weights of the validation with the highest greedy
                                     accuracy (step 0's, the starting model, included: early stopping
                                     on val), the folder's only model; else the final weights (and
                                     every --save_every steps);
                                     with LoRA the merged model, its meta with a "lora" entry
  adapter/                           LoRA: the latest saved step's adapter in peft's format
  tokenizer/                         a copy of the tokenizer
  metrics.jsonl                      one line per step (step 0: the validation, if any); the
                                     validations' figures (sciassist.train.rl_validation) in the
                                     records of the steps they follow
  samples.jsonl                      at every validation, the replies to the first 8 val
                                     questions: greedy, then the sampled ones
  rl_curves.png                      reward per step and the validations, redrawn at each one
  run_summary.json                   written at the end
  resume/state.pt                    what --resume needs: weights, optimizer states, the step,
                                     the metrics, every random generator (torch, python, the
                                     sampling generator), the settings (LoRA: the adapters and their
                                     optimizer state); continues bit for bit on CPU

Stopping: Ctrl-C (SIGINT) and SIGTERM save the resume point of the last completed step; the
command exits 130 or 143, as fine-tuning does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from nanochat.checkpoint import CheckpointError, meta_path, model_path, save_checkpoint
from nanochat.engine import Engine
from nanochat.files import load_tensors_file
from sciassist.common import (
    AUTO,
    Precision,
    announce_threads,
    compute_dtype,
    precision_for,
    settings_from_namespace,
    settings_parser,
    use_threads,
    write_json,
)
from sciassist.data.answers import detect_answer_format
from sciassist.data.batching import steps_per_epoch
from sciassist.memory import card_of
from sciassist.plots import plot_rl_curves
from sciassist.train import setup as train_setup
from sciassist.train.files import METRICS_FILE, append_record, open_run_dir, remove_leftovers
from sciassist.train.lora import adapter_optimizers, add_adapters, lora_meta, save_lora_checkpoint
from sciassist.train.rl_batch import CPU_GENERATION_ROWS, CPU_UPDATE_REPLIES, RLBatches, rl_batches
from sciassist.train.rl_questions import dropout_seed, load_questions, step_generator, step_questions
from sciassist.train.rl_reward import load_reward_fn
from sciassist.train.rl_settings import RL_TRAJECTORY_FIELDS, RLError, RLSettings, check_rl_settings
from sciassist.train.rl_step import sample_and_accumulate, step_metrics
from sciassist.train.rl_validation import (
    CURVES_FILE,
    SAMPLES_FILE,
    append_samples,
    keep_samples_until,
    validate,
    validation_line,
)
from sciassist.train.setup import RunPlaces, Runtime, distributed_runtime, load_source_model
from sciassist.train.state import RESUME_DIR, RESUME_FILE, rng_state, set_rng_state, temp_path
from sciassist.train.step import (
    EXIT_CODES,  # noqa: F401 - the command's exit codes, fine-tuning's
    SAVING_NOTICE,
    RunOutOfMemory,
    StepOutOfMemory,
    Terminated,
    apply_update,
    command_exit,
    defer_interrupt,
    guarded,
    keep_after_out_of_memory,
    lr_multiplier,
    set_learning_rates,
    stop_signals,
    stopping,
)


class RLOutOfMemory(RLError, RunOutOfMemory):
    """An RL run stopped by out-of-memory; the command exits with EXIT_CODE, as fine-tuning does."""


FRESH_START = "start a new run without --resume (or another --output_tag)"


@dataclass
class RLRun(RunPlaces):
    """An RL run ready for its first step."""

    settings: RLSettings
    runtime: Runtime
    model: torch.nn.Module  # fp32 master weights, updated in place
    tokenizer: object
    optimizers: list
    precision: Precision
    scaler: object  # fp16's GradScaler, else None
    engine: Engine
    questions: list
    val_questions: list
    answer_format: str
    reward_fn: object  # the --reward_fn function, or None for the built-in reward
    source: dict
    num_steps: int
    pad_id: int
    fingerprint: str  # ties a resume point to its questions
    lora: object = None  # the peft LoraConfig of a LoRA run (--lora_rank > 0), else None
    batches: RLBatches = field(default_factory=lambda: RLBatches(CPU_GENERATION_ROWS, CPU_UPDATE_REPLIES, "default"))


@dataclass
class RLProgress:
    step: int = 0
    metrics: list = field(default_factory=list)
    elapsed_before: float = 0.0
    step_rng: dict | None = None  # the generators as the step in progress found them
    sampling: torch.Tensor | None = None  # a resumed run's sampling generator state for its first step
    updating: bool = False  # inside the optimizer update (cut short there, the weights may be half-updated)
    best: dict = field(default_factory=lambda: {"step": None, "val_accuracy": None})  # --keep best's model
    started: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def step_generator(self, seed: int) -> torch.Generator:
        generator = step_generator(seed, self.step)
        if self.sampling is not None:
            generator.set_state(self.sampling)
            self.sampling = None
        return generator


def rl(settings: RLSettings, on_step=None) -> dict:
    """Run RL as `settings` say; returns the run summary (also in run_summary.json). on_step(record)
    is called after every step (a KeyboardInterrupt from it stops the run as Ctrl-C does)."""
    check_rl_settings(settings)
    resume_file = settings.run_dir() / RESUME_DIR / RESUME_FILE
    if settings.resume and not resume_file.is_file():
        raise RLError(f"--resume: no resume point at {resume_file}; run without --resume to start fresh")
    # the hook is imported before the model is loaded, so a wrong name fails at once
    reward_fn = load_reward_fn(settings.reward_fn) if settings.reward_fn else None
    with stop_signals(), distributed_runtime(settings) as runtime:
        run = prepare_rl_run(settings, runtime, reward_fn)
        remove_leftovers(run)
        progress = start_or_resume(run)
        open_run_dir(run, progress.metrics)
        open_validation_files(run, progress)
        _describe(run)
        status, error = _loop(run, progress, on_step)
        summary = run_summary(run, progress, status)
        if error is not None:
            summary["error"] = error
        if runtime.is_main:
            write_json(run.run_dir / "run_summary.json", summary)
        if status == "out_of_memory":
            raise RLOutOfMemory(error)
    return summary


def prepare_rl_run(settings: RLSettings, runtime: Runtime, reward_fn) -> RLRun:
    """Read the questions (first, so a bad file fails before the weights load), load the model,
    and build the fine-tune's optimizers and precision."""
    torch.manual_seed(settings.seed)
    questions = load_questions(settings.data_path, "--data_path", settings.shuffle_options)
    val_questions = (load_questions(settings.val_path, "--val_path", False, limit=settings.eval_questions)
                     if settings.val_path else [])
    answer_format = (detect_answer_format([q.record for q in questions]) if settings.answer_format == "auto"
                     else settings.answer_format)
    card = card_of(runtime.device)  # its free memory before the weights load, for the auto batches
    model, tokenizer, source = load_source_model(settings, runtime.device)
    if not settings.resume and Path(source["checkpoint_dir"]).resolve() == settings.run_dir().resolve():
        raise RLError(f"the run folder {settings.run_dir()} is the folder of the model it starts from, and a new run "
                      f"clears its folder; choose another --output_tag (or --out_dir)")
    model = model.float()  # fp32 master weights; autocast does the reduced-precision math
    model.train()
    # LoRA: adapters injected into the model (the same object), the base frozen; A's random init
    # follows the seed set above, the same on every rank
    lora = add_adapters(model, settings) if settings.lora_rank > 0 else None
    if lora is not None:
        optimizers = adapter_optimizers(model, settings)
    else:  # the fine-tune's optimizers, built by the same function (its settings' names are these)
        optimizers = train_setup.build_optimizers(model, settings)
    precision = precision_for(runtime.device, settings.dtype)
    prompt_len = (max(len(tokenizer.render_for_completion(q.messages)) for q in [*questions, *val_questions])
                  if card is not None and AUTO in (settings.generation_batch_size, settings.device_batch_size) else 0)
    batches = rl_batches(settings, model.config, runtime.device, prompt_len, precision.name != "float32",
                         card)
    num_steps = settings.num_steps if settings.num_steps > 0 else steps_per_epoch(len(questions),
                                                                                 settings.questions_per_step)
    return RLRun(settings=settings, runtime=runtime, model=model, tokenizer=tokenizer,
                 optimizers=optimizers, precision=precision,
                 scaler=precision.grad_scaler(), engine=Engine(model, tokenizer, compute_dtype(runtime.device,
                                                                                              settings.dtype)),
                 questions=questions, val_questions=val_questions, answer_format=answer_format, reward_fn=reward_fn,
                 source=dict(source, answer_format=answer_format), num_steps=num_steps,
                 pad_id=tokenizer.encode_special("<|assistant_end|>"),
                 fingerprint=questions_fingerprint(questions, val_questions), lora=lora, batches=batches)


def questions_fingerprint(*question_sets) -> str:
    h = hashlib.sha1()
    for questions in question_sets:
        for q in questions:
            h.update(json.dumps(q.record, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"|")
    return h.hexdigest()


# ----------------------------------------------------------------------------- the resume point

# what each part of a resume point must be (checked on loading: the file is untrusted input)
RESUME_FIELDS = {"model": dict, "optimizers": list, "grad_scaler": dict, "rng": dict, "sampling": torch.Tensor,
                 "step": int, "metrics": list, "elapsed_s": float, "settings": dict, "num_steps": int,
                 "fingerprint": str, "best": dict}


def save_resume(run: RLRun, progress: RLProgress) -> None:
    """The resume point after progress.step steps, written atomically (a temp file, then a rename)
    by rank 0 (every rank holds the same weights and optimizer states)."""
    if not run.runtime.is_main:
        return
    state = {"model": run.model.state_dict(), "optimizers": [opt.state_dict() for opt in run.optimizers],
             "grad_scaler": run.scaler.state_dict() if run.scaler is not None else {},
             "rng": progress.step_rng or rng_state(),
             "sampling": step_generator(run.settings.seed, progress.step).get_state(),
             "step": progress.step, "metrics": progress.metrics, "elapsed_s": float(progress.elapsed()),
             "settings": dataclasses.asdict(run.settings), "num_steps": run.num_steps,
             "fingerprint": run.fingerprint, "best": dict(progress.best)}
    path = run.resume_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_resume(run: RLRun) -> dict:
    """The resume point of this run, checked: its parts, its settings, its questions."""
    path = run.resume_path
    try:
        state = load_tensors_file(path, "cpu", "resume point", remedy=FRESH_START)
    except CheckpointError as e:
        raise RLError(str(e)) from e
    if not isinstance(state, dict) or set(state) != set(RESUME_FIELDS):
        raise RLError(f"{path} is not a resume point of an RL run; {FRESH_START}")
    wrong = [name for name, kind in RESUME_FIELDS.items()
             if not isinstance(state[name], kind) or (kind is int and isinstance(state[name], bool))]
    if wrong:
        raise RLError(f"{path} is a damaged resume point ({', '.join(wrong)} of the wrong kind); {FRESH_START}")
    different = [f"--{name} {state['settings'].get(name)!r} there, {getattr(run.settings, name)!r} now"
                 for name in RL_TRAJECTORY_FIELDS if state["settings"].get(name) != getattr(run.settings, name)]
    if different:
        raise RLError(f"{path} was made with other settings ({'; '.join(different)}); resume with the same flags, or "
                      f"{FRESH_START}")
    if state["fingerprint"] != run.fingerprint:
        raise RLError(f"{path} was made with other questions; resume needs the same --data_path and --val_path files")
    return state


def start_or_resume(run: RLRun) -> RLProgress:
    """A fresh RLProgress, or (--resume) the one the resume point holds, its weights, optimizer
    states and random generators put back."""
    if not run.settings.resume:
        return RLProgress()
    state = load_resume(run)
    try:
        run.model.load_state_dict(state["model"])
        for opt, opt_state in zip(run.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        if run.scaler is not None and state["grad_scaler"]:
            run.scaler.load_state_dict(state["grad_scaler"])
        set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RLError(f"{run.resume_path} does not fit this run ({reason}); {FRESH_START}") from e
    run.log(f"resuming {run.run_dir} at step {state['step']}/{run.num_steps}")
    return RLProgress(step=state["step"], metrics=list(state["metrics"]), elapsed_before=state["elapsed_s"],
                      sampling=state["sampling"], best=dict(state["best"]))


# ----------------------------------------------------------------------------- the loop

def save_model(run: RLRun, progress: RLProgress) -> Path:
    """model_<step>.pt + meta_<step>.json in nanochat's layout (atomically; rank 0). With LoRA the
    merged model, and the adapter in <run>/adapter/."""
    if not run.runtime.is_main:
        return model_path(run.run_dir, progress.step)
    last = progress.metrics[-1] if progress.metrics else {}
    meta = {"model_config": dataclasses.asdict(run.model.config), "step": progress.step,
            "source_model": run.source["model_file"], "source_step": run.source["step"],
            "answer_format": run.answer_format,
            "rl": {key: last.get(key) for key in ("reward_mean", "accuracy", "invalid_rate", "val_accuracy")},
            "rl_settings": dataclasses.asdict(run.settings)}
    if run.lora is not None:
        meta["lora"] = lora_meta(run.settings)
        state_dict = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        save_lora_checkpoint(run.run_dir, progress.step, run.model, state_dict, run.lora, meta)
    else:
        save_checkpoint(run.run_dir, progress.step, run.model, meta)
    return model_path(run.run_dir, progress.step)


def _loop(run: RLRun, progress: RLProgress, on_step) -> tuple[str, str | None]:
    """Steps from progress.step to the end; returns (status, error): completed, interrupted (Ctrl-C
    or on_step raised KeyboardInterrupt), terminated (SIGTERM) or out_of_memory (with what to
    say)."""
    bar = tqdm(total=run.num_steps, initial=progress.step, disable=not run.runtime.is_main, dynamic_ncols=True,
               mininterval=1.0, desc="rl", file=sys.stderr)
    saved = []  # the steps whose resume point was saved
    status, error = "completed", None
    try:
        _steps(run, progress, bar, on_step, saved)
    except StepOutOfMemory as e:
        status = "out_of_memory"
        with stopping():
            error = _stop_out_of_memory(run, progress, e, saved)
    except KeyboardInterrupt as e:
        status = "terminated" if isinstance(e, Terminated) else "interrupted"
        with stopping():
            run.model.zero_grad(set_to_none=True)
            if saved[-1:] != [progress.step]:
                save_resume(run, progress)
            how = "terminated (SIGTERM)" if status == "terminated" else "interrupted"
            run.log(f"\n{how} at step {progress.step}/{run.num_steps}; resume point saved in {run.resume_path}. "
                    f"Continue with the same flags plus --resume")
    finally:
        bar.close()
    if status == "completed":
        with stopping():
            if saved[-1:] != [progress.step]:
                if not keeps_best(run):
                    save_model(run, progress)
                save_resume(run, progress)
    return status, error


def _stop_out_of_memory(run: RLRun, progress: RLProgress, error: StepOutOfMemory, saved: list) -> str:
    """Keep what can be kept (step.keep_after_out_of_memory); returns what to say."""
    s = run.settings
    kept, resumable = keep_after_out_of_memory(progress, saved, run.resume_path,
                                               functools.partial(save_resume, run, progress))
    where = {"step": f"step {progress.step + 1} (its sampling or its policy gradient)",
             "update": f"the update of step {progress.step + 1}",
             "validation": f"the validation of step {progress.step} (the step itself is kept; that validation "
                           f"is not redone)"}[error.where]
    card = card_of(run.device)
    device = card.describe() if card is not None else str(run.device)
    batches = run.batches
    smaller = [f"--{name} {value // 2}" for name, value in (("generation_batch_size", batches.generation),
                                                           ("device_batch_size", batches.update)) if value > 1]
    change = (" and ".join(smaller) if smaller
              else f"a smaller --max_new_tokens (now {s.max_new_tokens}) or --lora_rank 16")
    resume = " --resume" if resumable else ""
    return (f"out of memory in {where} on {device} ({error}) with --generation_batch_size {batches.generation} "
            f"and --device_batch_size {batches.update}; {kept}. Run again with the same flags{resume} and "
            f"{change}")


def keeps_best(run: RLRun) -> bool:
    """Whether the run's model is its best validation's (--keep best with validation questions)
    rather than its final weights."""
    return run.settings.keep == "best" and bool(run.val_questions)


def keep_if_best(run: RLRun, progress: RLProgress, record: dict) -> None:
    """--keep best: a validation whose greedy accuracy beats every earlier one writes the model
    and removes the one it beats; the record says which step's model is kept."""
    if not keeps_best(run):
        return
    best = progress.best
    if best["val_accuracy"] is None or record["val_accuracy"] > best["val_accuracy"]:
        previous = best["step"]
        save_model(run, progress)
        progress.best = best = {"step": progress.step, "val_accuracy": record["val_accuracy"]}
        if previous is not None and previous != progress.step and run.runtime.is_main:
            model_path(run.run_dir, previous).unlink(missing_ok=True)
            meta_path(run.run_dir, previous).unlink(missing_ok=True)
    record["best_step"] = best["step"]
    record["best_val_accuracy"] = best["val_accuracy"]


def _steps(run: RLRun, progress: RLProgress, bar, on_step, saved: list) -> None:
    s = run.settings
    if progress.step == 0 and not progress.metrics and run.val_questions:  # where a fresh run starts from
        with defer_interrupt():
            record = {"step": 0, **_validate(run, 0), "elapsed_s": round(progress.elapsed(), 3)}
            keep_if_best(run, progress, record)
            _keep(run, progress, record)
    while progress.step < run.num_steps:
        t0 = time.time()
        progress.step_rng = rng_state()
        generator = progress.step_generator(s.seed)
        questions = step_questions(run.questions, progress.step, s.questions_per_step, s.seed,
                                   generator if s.shuffle_options else None)
        with dropout_generator(run, progress.step):
            work = guarded(run.model, functools.partial(sample_and_accumulate, run, questions, generator), "step")
        if not math.isfinite(work.loss):
            run.model.zero_grad(set_to_none=True)
            raise RLError(f"the policy-gradient loss is {work.loss} at step {progress.step + 1}; nothing was applied. "
                          f"Try lower learning rates (e.g. --init_lr_frac {s.init_lr_frac / 2:g})")
        multiplier = lr_multiplier(progress.step, run.num_steps)
        with defer_interrupt():  # the weights, the optimizers and the records change together
            record = {"step": progress.step + 1, "lr_multiplier": multiplier, **step_metrics(work)}
            if work.trained_tokens:
                progress.updating = True
                update = guarded(run.model, functools.partial(apply_update, run.model, run.optimizers, multiplier, 0.0,
                                                        run.scaler), "update")
                progress.updating = False
                record["updated"] = not update.skipped
                if update.loss_scale is not None:
                    record["loss_scale"] = update.loss_scale
            else:  # no group had a spread: no gradient, and momentum alone must not move the weights
                set_learning_rates(run.optimizers, multiplier)
                record["updated"] = False
            progress.step += 1
            progress.step_rng = None
            cut = None
            if run.val_questions and (progress.step == run.num_steps or
                                      (s.eval_every and progress.step % s.eval_every == 0)):
                try:
                    record.update(guarded(run.model, functools.partial(_validate, run, progress.step), "validation"))
                    keep_if_best(run, progress, record)
                except StepOutOfMemory as e:  # the step stands: its record is kept, then the run stops
                    record["validation"] = "out of memory"
                    cut = e
            record["step_time_s"] = time.time() - t0
            record["elapsed_s"] = round(progress.elapsed(), 3)
            _keep(run, progress, record)
            if cut is not None:
                raise cut
        if s.save_every and progress.step % s.save_every == 0:
            with defer_interrupt(SAVING_NOTICE):  # a signal now stops the run once this is saved
                if not keeps_best(run):
                    save_model(run, progress)
                save_resume(run, progress)
                saved.append(progress.step)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", invalid=f"{record['invalid_rate']:.2f}", refresh=False)
        if on_step is not None:
            on_step(record)


@contextlib.contextmanager
def dropout_generator(run: RLRun, step: int):
    """torch's generator seeded by (seed, step, rank) for the block, then as it was: what LoRA's
    dropout draws in a step's policy gradient is the same in a resumed run, on every rank."""
    if run.lora is None or not run.settings.lora_dropout:
        yield
        return
    cuda = run.device.type == "cuda"
    devices = [run.device.index if run.device.index is not None else torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(dropout_seed(run.settings.seed, step, run.runtime.rank))
        yield


def _keep(run: RLRun, progress: RLProgress, record: dict) -> None:
    progress.metrics.append(record)
    append_record(run, record)
    if "val_accuracy" in record and run.runtime.is_main:
        try:
            plot_rl_curves(run.run_dir / METRICS_FILE, run.run_dir / CURVES_FILE)
        except Exception as e:  # a plot must never stop training
            run.log(f"note: {CURVES_FILE} not updated ({type(e).__name__}: {e})")


def _validate(run: RLRun, step: int) -> dict:
    """The validation after `step` steps: its figures (returned), its replies to the first
    questions (appended to samples.jsonl) and one printed line."""
    metrics, lines = validate(run, step)
    if run.runtime.is_main:
        append_samples(run.run_dir / SAMPLES_FILE, lines)
    run.log(validation_line(step, run.num_steps, metrics))
    return metrics


def open_validation_files(run: RLRun, progress: RLProgress) -> None:
    """A fresh run removes an earlier run's samples file and curves; a resumed run keeps the
    samples of the steps it resumes after (rank 0)."""
    if not run.runtime.is_main:
        return
    samples = run.run_dir / SAMPLES_FILE
    if run.settings.resume:
        keep_samples_until(samples, progress.step)
    else:
        samples.unlink(missing_ok=True)
        (run.run_dir / CURVES_FILE).unlink(missing_ok=True)


def reward_description(run: RLRun) -> str:
    s = run.settings
    if run.reward_fn is not None:
        return f"custom: {s.reward_fn}(prompt, reply, record)"
    return (f"parsed strictly ({run.answer_format}): correct 1, wrong {s.format_bonus:g}, invalid "
            f"{s.invalid_reward:g}")


def _describe(run: RLRun) -> None:
    s, model = run.settings, run.model
    run.log(f"model: {run.source['model_file']} (d{model.config.n_layer}, {model.num_params():,} params)")
    if run.lora is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run.log(f"LoRA: rank {s.lora_rank}, alpha {run.lora.lora_alpha:g}, dropout {s.lora_dropout:g}, targets "
                f"{s.lora_targets}; {trainable:,} trainable parameters, the rest frozen")
    if run.device.type == "cpu" and run.runtime.is_main:
        announce_threads(s.threads)
    elif run.device.type == "cpu":  # the other ranks set theirs without a word
        use_threads(s.threads)
    run.log(f"precision: {run.precision.name} ({run.precision.reason}); fp32 master weights")
    run.log(f"questions: {len(run.questions):,} from {s.data_path}"
            f"{', options shuffled every step' if s.shuffle_options else ''}; validation: "
            f"{validation_description(run) if run.val_questions else 'none'}")
    run.log(f"reward: {reward_description(run)}")
    run.log(run.batches.describe())
    run.log(f"schedule: {run.num_steps} steps of {s.questions_per_step} questions x {s.samples_per_question} "
            f"replies (T={s.temperature:g}, top-k {s.top_k or 'off'}, at most {s.max_new_tokens} tokens), "
            f"{run.runtime.world_size} process(es) on {run.device}")


def validation_description(run: RLRun) -> str:
    s = run.settings
    sampled = min(s.val_questions, len(run.val_questions))
    text = f"{len(run.val_questions)} from {s.val_path}, greedy"
    if sampled:
        text += (f"; the first {sampled} also x {s.val_samples or s.samples_per_question} sampled replies "
                 f"(pass@k, maj@k)")
    return text


def run_summary(run: RLRun, progress: RLProgress, status: str) -> dict:
    steps = [r for r in progress.metrics if "reward_mean" in r]
    val = [r for r in progress.metrics if "val_accuracy" in r]
    final = model_path(run.run_dir, progress.step)
    best_step = progress.best["step"] if keeps_best(run) else (progress.step if final.is_file() else None)
    best = next((r for r in val if r["step"] == best_step), None)
    return {
        "status": status,
        "run_dir": str(run.run_dir),
        "final_checkpoint": str(final) if final.is_file() else None,
        "steps_done": progress.step,
        "num_steps": run.num_steps,
        "questions": len(run.questions),
        "val_questions": len(run.val_questions),
        "answer_format": run.answer_format,
        "reward": reward_description(run),
        "first_reward_mean": steps[0]["reward_mean"] if steps else None,
        "last_reward_mean": steps[-1]["reward_mean"] if steps else None,
        "initial_val_accuracy": val[0]["val_accuracy"] if val else None,
        "final_val_accuracy": val[-1]["val_accuracy"] if val else None,
        "initial_validation": {k: v for k, v in val[0].items() if k.startswith("val_")} if val else None,
        "final_validation": {k: v for k, v in val[-1].items() if k.startswith("val_")} if val else None,
        "keep": run.settings.keep if keeps_best(run) else "last",
        "best_checkpoint": str(model_path(run.run_dir, best_step)) if best_step is not None else None,
        "best_step": best_step,
        "best_validation": {k: v for k, v in best.items() if k.startswith("val_")} if best else None,
        "elapsed_s": round(progress.elapsed(), 3),
        "device": str(run.device),
        "world_size": run.runtime.world_size,
        "precision": run.precision.name,
        "lora": lora_meta(run.settings) if run.lora is not None else None,
        "batches": {"generation": run.batches.generation, "update": run.batches.update, "reason": run.batches.reason},
        "source_model": run.source,
        "resume_point": str(run.resume_path) if run.resume_path.is_file() else None,
        "settings": dataclasses.asdict(run.settings),
    }


# ----------------------------------------------------------------------------- the command

def build_parser():
    return settings_parser(RLSettings, prog="python -m sciassist.train.rl",
                           description="Reinforcement learning of a nanochat checkpoint on its own answers to "
                                       "multiple-choice questions (ScienceQA by default), rewarded by the "
                                       "evaluator's strict parser.")


def main(argv=None) -> int:
    """0 when the run completed; 130 / 143 when Ctrl-C / SIGTERM stopped it (a resume point saved);
    3 with one `error:` line when it ran out of memory (what was saved, which flag to change); 2
    with one `error:` line on a problem the user can fix."""
    settings = settings_from_namespace(RLSettings, build_parser().parse_args(argv))
    return command_exit(lambda: rl(settings))


if __name__ == "__main__":
    sys.exit(main())

"""
Supervised fine-tuning of a nanochat checkpoint on chat conversations.

    python sciassist_train.py                                  # ScienceQA, the seed's settings
    python sciassist_train.py --data_path my.jsonl --source sft --model_tag d32
    torchrun --nproc_per_node=8 sciassist_train.py ...         # data-parallel on 8 GPUs

How steps are counted. One optimizer step uses `target_examples_per_step` conversations
(64) in total over all ranks. With packing (the default) they are packed into rows (see
sciassist.data.batching: about pack_len positions per row, several conversations per row, each
attending only to itself), and each rank runs its share of the rows as micro-batches of up
to device_batch_size x max_seq_len positions, accumulating gradients. So the number of
micro-batches per step follows the lengths of those 64 conversations (one on ScienceQA at
the default device batch); the number of conversations per step does not change. Without
packing (--packing false) a micro-batch is device_batch_size conversations padded to the
longest, as nanochat did: 64 / (device_batch_size x ranks) micro-batches per step.
An epoch is len(train) // 64 steps, nanochat's count (12,000 examples: 187 steps per epoch,
748 in 4 epochs; the few left over are a different few each epoch, as the order is
reshuffled); --num_iterations overrides the total. Warmup, the linear decay to zero,
--eval_every and --save_every all count optimizer steps.

The loop (as nanochat's chat_sft.py): the validation of step 0, then per step the
forward/backward, and, with Ctrl-C held back, the update, the validation if due and the
step's record; then the resume point if due. The files are described in sciassist.train.files.

Stopping. Ctrl-C (SIGINT) and SIGTERM (schedulers, `timeout`, `docker stop`, Colab) stop a run
the same way: the resume point of the last completed step is saved, and the run ends with
status "interrupted" (Ctrl-C) or "terminated" (SIGTERM); sciassist_train.py exits 130 or 143.
More signals while the resume point is being saved are held, with a notice, never cutting the
save short. A SIGINT ignored when the run starts (`nohup ... &`) stays ignored; SIGTERM is always
handled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time

from tqdm import tqdm

from nanochat.optim import muon_dtype_of
from sciassist.common import announce_threads, synchronize, use_threads, write_json
from sciassist.data.batching import step_examples
from sciassist.train.files import (
    BestCheckpointWriter,
    append_record,
    checkpoint_meta,
    open_run_dir,
    remove_leftovers,
)
from sciassist.train.settings import TrainError, TrainSettings, check_settings
from sciassist.train.setup import Run, distributed_runtime, prepare_run
from sciassist.train.state import Progress, ResumeState, resume_path, rng_state, start_or_resume
from sciassist.train.step import (
    SAVING_NOTICE,
    RunOutOfMemory,
    StepOutOfMemory,
    Terminated,
    apply_update,
    defer_interrupt,
    evaluate_loss,
    forward_backward,
    guarded,
    keep_after_out_of_memory,
    lr_multiplier,
    step_record,
    stop_signals,
    stopping,
)
from sciassist.train.tracking import open_tracker


class _Diverged(Exception):
    pass


class TrainOutOfMemory(TrainError, RunOutOfMemory):
    """A fine-tune stopped by out-of-memory; sciassist_train.py exits with EXIT_CODE."""


def train(settings: TrainSettings, on_step=None) -> dict:
    """Fine-tune as `settings` say; returns the run summary (also in run_summary.json).

    on_step(record): called after every optimizer step with that step's metrics record
    (a notebook can plot live; tests stop runs with it). A KeyboardInterrupt, from Ctrl-C
    or from on_step, saves a resume point and returns a summary with status "interrupted";
    SIGTERM does the same with status "terminated".
    """
    check_settings(settings)
    if settings.resume and not resume_path(settings).is_file():
        raise TrainError(f"--resume: no resume point at {resume_path(settings)}; run without --resume to start "
                         f"fresh (or check --out_dir / --output_tag)")
    with stop_signals(), distributed_runtime(settings) as runtime:
        run = prepare_run(settings, runtime)
        remove_leftovers(run)
        progress = start_or_resume(run)
        open_run_dir(run, progress.metrics)
        run.tracker = open_tracker(settings, run.run_dir, progress.step, runtime.is_main)
        _describe(run)
        try:
            status, error = _loop(run, progress, on_step)
        finally:
            run.tracker.close()
        summary = run_summary(run, progress, status, error)
        if runtime.is_main:
            write_json(run.run_dir / "run_summary.json", summary)
            if progress.best["val_loss"] is not None:
                run.log(f"best checkpoint: {summary['best_checkpoint']} "
                        f"(val loss {progress.best['val_loss']:.4f} at step {progress.best['step']})")
            elif progress.best["step"] is not None:
                run.log(f"checkpoint (no validation set): {summary['best_checkpoint']}")
        if status == "out_of_memory":
            raise TrainOutOfMemory(error)
        if status == "diverged":
            kept = (f"the best checkpoint so far is kept at {summary['best_checkpoint']}"
                    if progress.best["step"] is not None else "no checkpoint was written")
            resume_point = f" and the last resume point at {run.resume_path}" if run.resume_path.is_file() else ""
            raise TrainError(f"{error}: training stopped before applying that update; {kept}{resume_point}. Try lower "
                             f"learning rates (e.g. --matrix_lr {settings.matrix_lr / 2:g}) or --grad_clip 1.0")
    return summary


def _loop(run: Run, progress: Progress, on_step) -> tuple[str, str | None]:
    """Train from progress.step to the end; returns (status, error): completed, interrupted
    (Ctrl-C or on_step raised KeyboardInterrupt), terminated (SIGTERM), diverged or out_of_memory
    (the error then says what was saved and what to change)."""
    writer = BestCheckpointWriter(run.run_dir, run.learner.lora)
    bar = tqdm(total=run.num_steps, initial=progress.step, disable=not run.runtime.is_main, dynamic_ncols=True,
               mininterval=1.0, desc="fine-tuning", file=sys.stderr)
    saved = []  # the steps whose resume point was saved
    status, error = "completed", None
    try:
        _steps(run, progress, writer, bar, on_step, saved)
    except KeyboardInterrupt as e:
        status = "terminated" if isinstance(e, Terminated) else "interrupted"
        with stopping():
            if saved[-1:] != [progress.step]:
                _save_resume(run, progress)
            how = "terminated (SIGTERM)" if status == "terminated" else "interrupted"
            run.log(f"\n{how} at step {progress.step}/{run.num_steps}; resume point saved in {run.resume_path}.\n"
                    f"Continue with the same flags plus --resume, e.g.: python sciassist_train.py "
                    f"{_flags_text(run.settings)} --resume")
            writer.wait()
    except _Diverged as e:
        status, error = "diverged", str(e)
    except StepOutOfMemory as e:
        status = "out_of_memory"
        with stopping():  # (guarded released the allocator's cache)
            error = _stop_out_of_memory(run, progress, e, saved)
            writer.wait()
    finally:
        bar.close()
        writer.wait()

    if status == "completed":
        with stopping():
            if saved[-1:] != [progress.step]:
                _save_resume(run, progress)
            if not run.data.val_batches:  # nothing to choose the best by: the final weights are the result
                progress.best = {"step": progress.step, "val_loss": None}
                if run.runtime.is_main:
                    meta = checkpoint_meta(run, progress.step, None, progress.best)
                    writer.save(progress.step, run.learner.model, meta, None)
                    writer.wait()
    return status, error


def _steps(run: Run, progress: Progress, writer: BestCheckpointWriter, bar, on_step, saved: list) -> None:
    """The validation of a fresh run's step 0, then the steps from progress.step to the end."""
    settings, device, learner = run.settings, run.device, run.learner
    if progress.step == 0 and not progress.metrics and run.data.val_batches:  # a fresh run: where it starts from
        with defer_interrupt():
            record = {"step": 0, "elapsed_s": round(progress.elapsed(), 3)}
            _validate(run, progress, writer, record)
            _keep(run, progress, record)
    while progress.step < run.num_steps:
        synchronize(device)
        t0 = time.time()  # from here: batching, forward/backward, update (what a step costs)
        progress.step_rng = rng_state()
        work = guarded(learner.model, functools.partial(forward_backward, run, progress.step), "step")
        if not math.isfinite(work.train_loss):
            raise _Diverged(f"training loss is {work.train_loss} at step {progress.step + 1}")
        multiplier = lr_multiplier(progress.step, run.num_steps, settings.warmup_steps)
        with defer_interrupt():  # the weights, the optimizers and the records change together
            progress.updating = True
            update = guarded(learner.model, functools.partial(apply_update, learner.model, learner.optimizers,
                                                              multiplier, settings.grad_clip, learner.scaler), "update")
            synchronize(device)
            seconds = max(time.time() - t0, 1e-9)
            progress.step += 1
            progress.step_rng, progress.updating = None, False
            progress.totals["positions"] += work.positions
            progress.totals["tokens"] += work.tokens
            progress.totals["supervised"] += work.supervised
            record = step_record(run, progress.step, work, multiplier, update.grad_norm, seconds, progress.elapsed(),
                                 update)
            try:
                if run.is_eval_step(progress.step):
                    guarded(learner.model, functools.partial(_validate, run, progress, writer, record), "validation")
            except StepOutOfMemory:
                _keep(run, progress, record)  # the step stands, without its validation
                raise
            _keep(run, progress, record)
        if settings.save_every and progress.step % settings.save_every == 0 and progress.step < run.num_steps:
            with defer_interrupt(SAVING_NOTICE):  # a signal now stops the run once this resume point is saved
                _save_resume(run, progress)
                saved.append(progress.step)
        bar.update(1)
        bar.set_postfix(loss=f"{work.train_loss:.4f}", lr=f"{multiplier:.3f}",
                        pos_s=f"{work.positions / seconds:,.0f}", refresh=False)
        if on_step is not None:
            on_step(record)


def _stop_out_of_memory(run: Run, progress: Progress, error: StepOutOfMemory, saved: list) -> str:
    """Keep what can be kept (step.keep_after_out_of_memory); returns what to say."""
    batch = run.batch
    kept, resumable = keep_after_out_of_memory(progress, saved, run.resume_path,
                                               functools.partial(_save_resume, run, progress))
    where = {"step": f"step {progress.step + 1}", "update": f"the update of step {progress.step + 1}",
             "validation": f"the validation of step {progress.step}"}[error.where]
    card = run.card.describe() if run.card is not None else str(run.device)
    smaller = max(1, batch.positions // 2 // run.data.max_seq_len)
    if smaller * run.data.max_seq_len < batch.positions:
        change = f"--device_batch_size {smaller}"
    else:
        change = f"a shorter --max_seq_len (now {run.data.max_seq_len}) or --lora_rank 16"
    resume = " --resume" if resumable else ""
    return (f"out of memory in {where} on {card} ({error}) with a micro-batch of {batch.rows} row(s) of "
            f"{batch.widest} positions ({batch.positions:,}); {kept}. Run again with the same flags{resume} and "
            f"{change}")


def _validate(run: Run, progress: Progress, writer: BestCheckpointWriter, record: dict) -> None:
    """The validation loss at progress.step into `record`; a new best is written as the checkpoint."""
    step = progress.step
    learner = run.learner
    val_loss = evaluate_loss(learner.model, run.data.val_batches, learner.precision.autocast(), run.runtime.distributed)
    if not math.isfinite(val_loss):
        raise _Diverged(f"validation loss is {val_loss} at step {step}")
    best = progress.best
    if best["val_loss"] is None or val_loss < best["val_loss"]:
        previous = best["step"]
        progress.best = best = {"step": step, "val_loss": val_loss}
        if run.runtime.is_main:
            writer.save(step, learner.model, checkpoint_meta(run, step, val_loss, best), previous)
    record["val_loss"] = val_loss
    record["best_val_loss"] = best["val_loss"]
    run.log(f"step {step}/{run.num_steps}: val loss {val_loss:.4f} "
            f"(best {best['val_loss']:.4f} at step {best['step']})")


def _keep(run: Run, progress: Progress, record: dict) -> None:
    progress.metrics.append(record)
    append_record(run, record)
    run.tracker.log(record)


def _save_resume(run: Run, progress: Progress) -> None:
    if run.runtime.is_main:
        ResumeState.capture(run, progress).save(run.resume_path)


def _describe(run: Run) -> None:
    learner, data, s = run.learner, run.data, run.settings
    model = learner.model
    run.log(f"model: {run.source['model_file']} (d{model.config.n_layer}, {model.num_params():,} params)")
    if learner.lora is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        run.log(f"LoRA: rank {s.lora_rank}, alpha {learner.lora.lora_alpha:g}, dropout {s.lora_dropout:g}, targets "
                f"{s.lora_targets}; {trainable:,} trainable parameters, the rest frozen")
    if run.device.type == "cpu" and run.runtime.is_main:
        announce_threads(s.threads)
    elif run.device.type == "cpu":  # the other ranks set theirs without a word
        use_threads(s.threads)
    run.log(f"precision: {learner.precision.name} ({learner.precision.reason}); fp32 master weights"
            f"{', loss scaling (GradScaler)' if learner.scaler is not None else ''}")
    if run.batch is not None:
        run.log(run.batch.describe())
    run.log(f"data: {data.description}")
    run.log(f"  train: {data.train_set.describe()}")
    run.log(f"  val:   {data.val_set.describe()}; evaluating on {data.num_val} of them")
    run.log(f"schedule: {run.num_steps} steps ({data.per_epoch} per epoch, {s.target_examples_per_step} conversations "
            f"each), {run.runtime.world_size} process(es) on {run.device}, "
            f"{'packed rows' if s.packing else 'padded batches'}")
    compiled = "blocks and loss compiled (dynamic shapes, packed attention eager)" if learner.compiled else "off"
    asked = s.compile if s.compile is not None else "default: on CUDA only"
    run.log(f"torch.compile: {compiled} (--compile {asked})")
    if muon_dtype_of(learner.optimizers):
        run.log(f"Muon: Newton-Schulz in {muon_dtype_of(learner.optimizers)} (--muon_dtype {s.muon_dtype})")
    if learner.attention_kernel is not None:
        run.log(f"attention for packed rows: {learner.attention_kernel} (nanochat.attention; checked against the "
                f"reference on {run.device} in {learner.precision.name})")


def _flags_text(settings: TrainSettings) -> str:
    defaults = TrainSettings()
    parts = []
    for f in dataclasses.fields(TrainSettings):
        value = getattr(settings, f.name)
        if f.name != "resume" and value != getattr(defaults, f.name):
            parts.append(f"--{f.name} {value}")
    return " ".join(parts)


def mix_summary(run: Run, steps_done: int) -> dict | None:
    """--mix: each source's share, conversations in the training set, and how many of its
    conversations the steps done so far used (epochs repeat them)."""
    mix = run.data.mix
    if mix is None:
        return None
    seen = [0] * len(mix["sources"])
    origins = mix["origins"]
    for step in range(steps_done):
        for i in step_examples(len(origins), step, run.settings.target_examples_per_step, run.settings.seed)[1]:
            seen[origins[i]] += 1
    return [dict(source, seen=n) for source, n in zip(mix["sources"], seen, strict=True)]


def run_summary(run: Run, progress: Progress, status: str, error: str | None) -> dict:
    """run_summary.json: how the run went, from the run and where it got to."""
    metrics, best, totals = progress.metrics, progress.best, progress.totals
    train_losses = [r["train_loss"] for r in metrics if "train_loss" in r]
    val_losses = [r["val_loss"] for r in metrics if "val_loss" in r]
    elapsed_s = progress.elapsed()
    train_set, val_set = run.data.train_set, run.data.val_set
    return {
        "status": status,
        "error": error,
        "run_dir": str(run.run_dir),
        "best_checkpoint": str(run.run_dir / f"model_{best['step']:06d}.pt") if best["step"] is not None else None,
        "best_step": best["step"],
        "best_val_loss": best["val_loss"],
        "initial_val_loss": val_losses[0] if val_losses else None,
        "final_val_loss": val_losses[-1] if val_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "steps_done": progress.step,
        "num_steps": run.num_steps,
        "steps_per_epoch": run.data.per_epoch,
        "train_conversations": len(train_set),
        "val_conversations": len(val_set),
        "val_conversations_evaluated": run.data.num_val,
        "truncated": {"train": train_set.num_truncated, "val": val_set.num_truncated},
        "dropped_without_supervision": {"train": train_set.num_dropped, "val": val_set.num_dropped},
        "positions_processed": totals["positions"],
        "real_tokens": totals["tokens"],
        "supervised_tokens": totals["supervised"],
        "token_efficiency": totals["tokens"] / totals["positions"] if totals["positions"] else None,
        "elapsed_s": round(elapsed_s, 3),
        "minutes": round(elapsed_s / 60, 2),
        "world_size": run.runtime.world_size,
        "device_batch": run.batch.record() if run.batch is not None else None,
        "card": dataclasses.asdict(run.card) if run.card is not None else None,
        "device": str(run.device),
        "attention_kernel": run.learner.attention_kernel,
        "muon_dtype": muon_dtype_of(run.learner.optimizers),
        "compiled": run.learner.compiled,
        "data_mix": mix_summary(run, progress.step),
        "source_model": run.source,
        "resume_point": str(run.resume_path) if run.resume_path.is_file() else None,
        "settings": dataclasses.asdict(run.settings),
    }

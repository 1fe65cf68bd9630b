"""Where a run is (Progress) and what a resume point holds (ResumeState): one file,
resume/state.pt, saved whole every --save_every steps, at the end and on Ctrl-C or SIGTERM, and
loaded whole by --resume, which continues bit for bit where the run stopped."""

from __future__ import annotations

import dataclasses
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.files import CheckpointError, load_tensors_file
from sciassist.train.settings import TRAJECTORY_FIELDS, TrainError, TrainSettings

RESUME_DIR = "resume"
RESUME_FILE = "state.pt"
FRESH_START = "start a new run without --resume (or another --output_tag)"


def resume_path(settings: TrainSettings) -> Path:
    return settings.run_dir() / RESUME_DIR / RESUME_FILE


def temp_path(path) -> Path:
    """Where ResumeState.save writes before the rename (a killed save leaves it behind)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@dataclass
class Progress:
    """The counters of a run in progress; every step's record is complete once appended."""

    step: int = 0  # optimizer steps done
    metrics: list = field(default_factory=list)  # the records of metrics.jsonl
    best: dict = field(default_factory=lambda: {"step": None, "val_loss": None})
    totals: dict = field(default_factory=lambda: {"positions": 0, "tokens": 0, "supervised": 0})
    elapsed_before: float = 0.0  # seconds trained before this process (resumed runs)
    # the random generators as the step in progress found them (None between steps): a run stopped
    # inside a step resumes from them, as if that step had not begun
    step_rng: dict | None = None
    updating: bool = False  # inside the optimizer update: the weights may be half-updated
    started: float = field(default_factory=time.time)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# what each part of a resume point must be (checked on loading: the file is untrusted input)
FIELD_TYPES = {"model": dict, "optimizers": list, "rng": dict, "step": int, "metrics": list, "best": dict,
               "elapsed_s": float, "totals": dict, "settings": dict, "data_fingerprint": str, "num_steps": int,
               "epoch": int, "step_in_epoch": int, "grad_scaler": dict, "device_batch": dict}
# parts added later, with the value a resume point written before them stands for
OPTIONAL_FIELDS = {"grad_scaler": {}, "device_batch": {}}


def _wrong_types(data: dict) -> list[str]:
    """The parts of a loaded resume point that are not of the kind FIELD_TYPES says."""
    def fits(value, kind):
        if isinstance(value, bool):
            return kind is bool
        return isinstance(value, kind) or (kind is float and isinstance(value, int))

    wrong = [f"{name} is {type(data[name]).__name__}, not {kind.__name__}" for name, kind in FIELD_TYPES.items()
             if not fits(data[name], kind)]
    if not wrong and not all(isinstance(v, torch.Tensor) for v in data["model"].values()):
        wrong.append("model is not a state dict of tensors")
    return wrong


@dataclass
class ResumeState:
    """Everything --resume needs, after `step` optimizer steps. Stored as a plain dict of
    tensors and Python values, so torch.load(weights_only=True) reads it."""

    model: dict  # state dict
    optimizers: list  # one state dict per optimizer
    rng: dict
    step: int
    metrics: list
    best: dict  # {"step", "val_loss"} of the best checkpoint written so far
    elapsed_s: float
    totals: dict  # positions, tokens and supervised tokens processed
    settings: dict  # TrainSettings as a dict
    data_fingerprint: str
    num_steps: int
    # the data position: step s is batch s % per_epoch of epoch s // per_epoch, whose order is
    # a function of (seed, epoch); kept for readers, resuming needs only step
    epoch: int
    step_in_epoch: int
    # the GradScaler's state_dict of an fp16 run (the loss scale and its growth counter); {} without one
    grad_scaler: dict = field(default_factory=dict)
    # the micro-batch the run chose (sciassist.train.batch.DeviceBatch.record()): --device_batch_size auto
    # resumes with it, so the steps are arranged as before; {} in resume points written before it
    device_batch: dict = field(default_factory=dict)

    @classmethod
    def capture(cls, run, progress: Progress) -> ResumeState:
        learner, per_epoch = run.learner, run.data.per_epoch
        return cls(model=learner.model.state_dict(), optimizers=[opt.state_dict() for opt in learner.optimizers],
                   rng=progress.step_rng or rng_state(), step=progress.step, metrics=progress.metrics,
                   best=progress.best,
                   elapsed_s=progress.elapsed(), totals=progress.totals, settings=dataclasses.asdict(run.settings),
                   data_fingerprint=run.data.fingerprint, num_steps=run.num_steps,
                   epoch=progress.step // per_epoch, step_in_epoch=progress.step % per_epoch,
                   grad_scaler=learner.scaler.state_dict() if learner.scaler is not None else {},
                   device_batch=run.batch.record() if run.batch is not None else {})

    def save(self, path) -> None:
        """Atomically: a crash while saving leaves the previous resume point intact (and a
        failed save no temp file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            torch.save({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path, device) -> ResumeState:
        """The resume point in `path`, or a one-line TrainError saying what is wrong with it."""
        try:
            data = load_tensors_file(path, device, "resume point", remedy=FRESH_START)
        except CheckpointError as e:
            raise TrainError(str(e)) from e
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(data, dict):
            data = {**{k: dict(v) for k, v in OPTIONAL_FIELDS.items()}, **data}
        missing = [n for n in names if not isinstance(data, dict) or n not in data]
        unexpected = sorted(set(data) - set(names)) if isinstance(data, dict) else []
        if missing or unexpected:
            raise TrainError(f"{path} is not a resume point this version can continue (missing: "
                             f"{', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'}); "
                             f"{FRESH_START}")
        wrong = _wrong_types(data)
        if wrong:
            raise TrainError(f"{path} is a damaged resume point ({'; '.join(wrong[:3])}); {FRESH_START}")
        return cls(**data)

    def check_model(self, model, path) -> None:
        """Refuse the resume point of another model: the state dict's keys and shapes must be the model's."""
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in self.model.items()}
        if found == expected:
            return
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shapes = [f"{k} {list(found[k])} there, {list(expected[k])} now" for k in sorted(set(found) & set(expected))
                  if found[k] != expected[k]]
        parts = [f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}" for label, items in
                 (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes)) if items]
        raise TrainError(f"{path} is the resume point of another model ({'; '.join(parts)}); resume with the model "
                         f"it was made from, or {FRESH_START}")

    def check_compatible(self, settings: TrainSettings, fingerprint: str, path) -> None:
        """Refuse to continue with other trajectory settings or other data."""
        different = [f"--{name} {self.settings.get(name)!r} there, {getattr(settings, name)!r} now"
                     for name in TRAJECTORY_FIELDS if self.settings.get(name) != getattr(settings, name)]
        if different:
            raise TrainError(f"{path} was made with other settings ({'; '.join(different)}); resume with the same "
                             f"flags, or start a new run (another --output_tag)")
        if self.data_fingerprint != fingerprint:
            raise TrainError(f"{path} was made with different training/validation data (or a different tokenizer); "
                             f"resume needs exactly the same data")

    def restore(self, model, optimizers, path, scaler=None) -> Progress:
        """Put the weights, the optimizer states, the GradScaler's loss scale (fp16) and the random
        generators back; the counters. A scaler resumed from a point without one (another --dtype
        or an older resume point) starts from its initial scale; a saved scale without a scaler
        now (bf16 / fp32) is not needed."""
        try:
            model.load_state_dict(self.model)
            for opt, opt_state in zip(optimizers, self.optimizers, strict=True):
                opt.load_state_dict(opt_state)
            if scaler is not None and self.grad_scaler:
                scaler.load_state_dict(self.grad_scaler)
            set_rng_state(self.rng)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TrainError(f"{path} does not fit this run ({reason}); {FRESH_START}") from e
        return Progress(step=self.step, metrics=list(self.metrics), best=dict(self.best), totals=dict(self.totals),
                        elapsed_before=self.elapsed_s)


def start_or_resume(run) -> Progress:
    """A fresh Progress, or (--resume) the one the resume point holds, checked against this run."""
    if not run.settings.resume:
        return Progress()
    state = ResumeState.load(run.resume_path, run.device)
    # the settings first: another --lora_rank (or --lora_targets) also changes the state dict's keys, and
    # "--lora_rank 8 there, 16 now" says more than the keys that differ
    state.check_compatible(run.settings, run.data.fingerprint, run.resume_path)
    learner = run.learner
    state.check_model(learner.model, run.resume_path)
    progress = state.restore(learner.model, learner.optimizers, run.resume_path, learner.scaler)
    best_step = progress.best["step"]
    if best_step is not None and not (run.run_dir / f"model_{best_step:06d}.pt").is_file():
        # removed meanwhile (e.g. by a fresh run started in the same folder): the next
        # evaluation writes a new best
        run.log(f"note: the best checkpoint of step {best_step} is gone from {run.run_dir}; the next evaluation "
                f"saves a new one")
        progress.best = {"step": None, "val_loss": None}
    run.log(f"resuming {run.run_dir} at step {progress.step}/{run.num_steps}")
    return progress

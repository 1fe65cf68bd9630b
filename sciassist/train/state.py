"""Where a run is (Progress) and what a resume point holds (ResumeState): one file,
resume/state.pt, saved whole every --save_every steps, at the end and on Ctrl-C, and
loaded whole by --resume, which continues bit for bit where the run stopped."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sciassist.train.settings import TRAJECTORY_FIELDS, TrainError, TrainSettings

RESUME_DIR = "resume"
RESUME_FILE = "state.pt"


def resume_path(settings: TrainSettings) -> Path:
    return settings.run_dir() / RESUME_DIR / RESUME_FILE


@dataclass
class Progress:
    """The counters of a run in progress; every step's record is complete once appended."""

    step: int = 0  # optimizer steps done
    metrics: list = field(default_factory=list)  # the records of metrics.jsonl
    best: dict = field(default_factory=lambda: {"step": None, "val_loss": None})
    totals: dict = field(default_factory=lambda: {"positions": 0, "tokens": 0, "supervised": 0})
    elapsed_before: float = 0.0  # seconds trained before this process (resumed runs)
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

    @classmethod
    def capture(cls, run, progress: Progress) -> ResumeState:
        return cls(model=run.model.state_dict(), optimizers=[opt.state_dict() for opt in run.optimizers],
                   rng=rng_state(), step=progress.step, metrics=progress.metrics, best=progress.best,
                   elapsed_s=progress.elapsed(), totals=progress.totals, settings=dataclasses.asdict(run.settings),
                   data_fingerprint=run.fingerprint, num_steps=run.num_steps,
                   epoch=progress.step // run.per_epoch, step_in_epoch=progress.step % run.per_epoch)

    def save(self, path) -> None:
        """Atomically: a crash while saving leaves the previous resume point intact."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, device) -> ResumeState:
        try:
            data = torch.load(path, map_location=device, weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise TrainError(f"{path} cannot be read as a resume point ({e}); start a new run without --resume "
                             f"(or another --output_tag)") from e
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if not isinstance(data, dict) or n not in data]
        unexpected = sorted(set(data) - set(names)) if isinstance(data, dict) else []
        if missing or unexpected:
            raise TrainError(f"{path} is not a resume point this version can continue (missing: "
                             f"{', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'}); "
                             f"start a new run without --resume (or another --output_tag)")
        return cls(**data)

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

    def restore(self, model, optimizers) -> Progress:
        """Put the weights, the optimizer states and the random generators back; the counters."""
        model.load_state_dict(self.model)
        for opt, opt_state in zip(optimizers, self.optimizers, strict=True):
            opt.load_state_dict(opt_state)
        set_rng_state(self.rng)
        return Progress(step=self.step, metrics=list(self.metrics), best=dict(self.best), totals=dict(self.totals),
                        elapsed_before=self.elapsed_s)


def start_or_resume(run) -> Progress:
    """A fresh Progress, or (--resume) the one the resume point holds, checked against this run."""
    if not run.settings.resume:
        return Progress()
    state = ResumeState.load(run.resume_path, run.device)
    state.check_compatible(run.settings, run.fingerprint, run.resume_path)
    progress = state.restore(run.model, run.optimizers)
    best_step = progress.best["step"]
    if best_step is not None and not (run.run_dir / f"model_{best_step:06d}.pt").is_file():
        # removed meanwhile (e.g. by a fresh run started in the same folder): the next
        # evaluation writes a new best
        run.log(f"note: the best checkpoint of step {best_step} is gone from {run.run_dir}; the next evaluation "
                f"saves a new one")
        progress.best = {"step": None, "val_loss": None}
    run.log(f"resuming {run.run_dir} at step {progress.step}/{run.num_steps}")
    return progress

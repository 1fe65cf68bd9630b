"""
A notebook run that survives a Colab disconnect (the notebook's PERSIST parameter).

Colab recycles its machines: after a disconnect the disk is new, and the nanochat base dir
(the d20 download is 2.1 GB), the prepared data and the runs are gone with it. With
persistence on they live in one folder on Google Drive instead (DRIVE_DIR, mounted here
inside Colab; anywhere else it is an ordinary folder), and running the notebook again:

- finds the published checkpoint in place (sciassist.hub skips complete files, each with a
  line saying so) or, in smoke mode, the tiny base trained by an earlier run (train_tiny_once);
- keeps the data an earlier run prepared with the same request (prepare_once);
- resumes the interrupted run from its last resume point, or says that the run is complete and
  does not train it again (where_to_start).

A disconnect then costs at most --save_every steps (COLAB_SAVE_EVERY unless the notebook's
TRAIN says otherwise) and no download. The resume itself is training's own --resume, which
continues bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sciassist.common import write_json
from sciassist.data.prepare import prepare
from sciassist.data.scienceqa import SPLITS
from sciassist.pipelines.tiny import MARKER_FILE, train_tiny
from sciassist.train.settings import TRAJECTORY_FIELDS, TrainSettings
from sciassist.train.state import resume_path

DRIVE_MOUNT = "/content/drive"
DEFAULT_DRIVE_DIR = "/content/drive/MyDrive/sciassist"
# A resume point every 100 steps: the d20 run's 748 steps save 7 along the way (about 5 GB
# each: the fp32 weights and the optimizers' state), and a disconnect redoes at most 100 steps
# (about two minutes on an A100).
COLAB_SAVE_EVERY = 100
PREPARED_FILE = "prepared.json"  # what prepare_once was asked for, next to the files it wrote
SUMMARY_FILE = "run_summary.json"


def in_colab() -> bool:
    return "google.colab" in sys.modules


def persistence_on(persist: bool | None) -> bool:
    """The notebook's PERSIST: None means on inside Colab, off elsewhere."""
    return in_colab() if persist is None else bool(persist)


@dataclass(frozen=True)
class PersistentDirs:
    """Where a persistent notebook run keeps what must outlive the machine."""

    root: Path
    base_dir: Path  # the nanochat base dir: the published checkpoint (or smoke mode's tiny base)
    data_dir: Path  # scienceqa_{train,val,test}.jsonl
    out_dir: Path  # the runs: <out_dir>/<output_tag>/, resume points included


def use_drive(drive_dir=DEFAULT_DRIVE_DIR) -> PersistentDirs:
    """Mount Google Drive when drive_dir is on it (inside Colab), create drive_dir, and return
    the folders under it."""
    root = Path(drive_dir).expanduser()
    if in_colab() and root.is_relative_to(DRIVE_MOUNT):
        from google.colab import drive  # exists only inside Colab

        drive.mount(DRIVE_MOUNT)
    root.mkdir(parents=True, exist_ok=True)
    return PersistentDirs(root, root / "nanochat", root / "data", root / "runs")


def prepare_once(source, data_dir, sizes=None):
    """sciassist.data.prepare.prepare(source, data_dir, sizes), unless data_dir holds every split
    an earlier call with the same source and sizes wrote. Returns prepare's report, or None
    when the data was kept (a line says so)."""
    data_dir = Path(data_dir)
    request = json.loads(json.dumps({"scienceqa": str(source), "sizes": sizes or {}}, default=str))
    marker = data_dir / PREPARED_FILE
    files = [data_dir / f"scienceqa_{split}.jsonl" for split in SPLITS]
    if all(f.is_file() for f in files) and _read_json(marker) == request:
        print(f"data: {data_dir} already holds ScienceQA prepared from {source} (sizes {sizes or 'default'}); "
              f"not prepared again")
        return None
    marker.unlink(missing_ok=True)  # the files are about to change
    report = prepare(source, data_dir, sizes=sizes)
    write_json(marker, request)
    return report


def train_tiny_once(settings):
    """sciassist.pipelines.tiny.train_tiny(settings), unless settings.out_dir holds the tiny base an
    earlier call with the same settings wrote (its tiny_base.json is written last). Returns the
    summary of the base that is there."""
    marker = Path(settings.out_dir).expanduser() / MARKER_FILE
    wanted = _tiny_recipe(dataclasses.asdict(settings))
    earlier = _read_json(marker)
    if earlier is not None and _tiny_recipe(earlier.get("settings", {})) == wanted:
        print(f"tiny base: already in {marker.parent} (step {earlier.get('step')}); not trained again")
        return earlier
    return train_tiny(settings)


def _tiny_recipe(settings: dict) -> dict:
    # what makes the weights: not where the progress goes, nor whether an old base may be replaced
    return {k: v for k, v in settings.items() if k not in ("overwrite", "progress", "out_dir")}


@dataclass(frozen=True)
class RunStart:
    """How the notebook's training cell goes on: a new run, resuming, or nothing to train."""

    action: str  # "new" | "resume" | "completed"
    settings: TrainSettings  # what to train with (resume set when resuming)
    message: str  # the line the notebook prints
    step: int | None = None  # the resume point's step (resume), the steps done (completed)
    summary: dict | None = None  # run_summary.json of a completed run
    records: list = dataclasses.field(default_factory=list)  # the step records a resumed run keeps (its curve)

    @property
    def completed(self) -> bool:
        return self.action == "completed"


def where_to_start(settings: TrainSettings) -> RunStart:
    """Look at the run folder of `settings` (<out_dir>/<output_tag>/) and say how to go on:

    - completed: its run_summary.json says completed, with the same trajectory settings;
    - resume: it has a resume point made with the same trajectory settings and the run did not
      complete (a disconnect leaves no run_summary.json; Ctrl-C or SIGTERM leave "interrupted" /
      "terminated"). Training then continues from that point (--resume);
    - new: nothing of this run is there, or what is there was made with other settings (a new run
      starts; training keeps an earlier resume point until it saves its own)."""
    run_dir = settings.run_dir()
    summary = _read_json(run_dir / SUMMARY_FILE)
    if summary is not None and summary.get("status") == "completed":
        changed = changed_settings(summary.get("settings", {}), settings)
        if not changed:
            done = summary.get("steps_done")
            return RunStart("completed", settings,
                            f"{run_dir} holds this run, completed ({done}/{summary.get('num_steps')} steps; best "
                            f"checkpoint {summary.get('best_checkpoint')}): not training it again (another "
                            f"TRAIN['output_tag'] trains a new run)", step=done, summary=summary)
        return RunStart("new", settings, f"{run_dir} holds a completed run made with other settings "
                                         f"({'; '.join(changed)}); a new run replaces it")
    point = resume_path(settings)
    if not point.is_file():
        return RunStart("new", settings, f"starting a new run in {run_dir}")
    try:
        saved = resume_point_header(point)
    except Exception as e:  # a damaged or foreign file: a new run, which replaces it once it saves its own
        return RunStart("new", settings, f"the resume point {point} cannot be read ({type(e).__name__}: {e}); "
                                         f"starting a new run in {run_dir}")
    changed = changed_settings(saved["settings"], settings)
    if changed:
        return RunStart("new", settings, f"the resume point in {run_dir} was made with other settings "
                                         f"({'; '.join(changed)}); starting a new run there")
    step, total = saved["step"], saved["num_steps"]
    status = (summary or {}).get("status")
    how = f"the run was {status}" if status else "the run was cut off, by a disconnect or a crash"
    return RunStart("resume", dataclasses.replace(settings, resume=True),
                    f"resuming the run in {run_dir} from step {step} of {total}, its last resume point ({how})",
                    step=step, records=[r for r in saved["metrics"] if isinstance(r, dict) and "train_loss" in r])


def changed_settings(saved: dict, settings: TrainSettings) -> list[str]:
    """The trajectory settings (those --resume insists on) whose value in `saved` (a run's
    settings as a dict) differs from `settings`, as `name: saved -> now`."""
    return [f"{name}: {saved.get(name)!r} -> {getattr(settings, name)!r}" for name in TRAJECTORY_FIELDS
            if saved.get(name) != getattr(settings, name)]


def resume_point_header(path) -> dict:
    """The step, num_steps, settings and metrics records of a resume point, without reading its
    tensors (the file is memory-mapped: a d20 resume point is about 5 GB)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or not all(k in state for k in ("step", "num_steps", "settings", "metrics")):
        raise ValueError("not a resume point (no step, num_steps, settings and metrics)")
    return {"step": int(state["step"]), "num_steps": int(state["num_steps"]), "settings": dict(state["settings"]),
            "metrics": list(state["metrics"])}


class SimulatedDisconnect(Exception):
    """Training stopped by disconnect_after: no resume point is saved at the stop."""


def disconnect_after(steps: int, on_step=None):
    """An on_step for sciassist.train.loop.train that stops training after `steps` steps of this
    call, as a disconnect does: the exception ends the run without the resume point that Ctrl-C
    would save, so the next run resumes from the last one saved every --save_every steps.
    on_step, if given, still sees every step's record."""
    done = []

    def callback(record):
        if on_step is not None:
            on_step(record)
        done.append(record["step"])
        if len(done) >= steps:
            raise SimulatedDisconnect(f"training stopped after step {record['step']}, as a disconnect would "
                                      f"(DISCONNECT_AFTER_STEPS = {steps}); run the notebook again without it to "
                                      f"resume")

    return callback


def _read_json(path) -> dict | None:
    """The JSON object in `path`, or None when it cannot be read as one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None

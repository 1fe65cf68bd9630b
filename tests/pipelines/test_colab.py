"""sciassist.pipelines.colab: what lets the notebook's run survive a Colab disconnect (Drive,
work done once, resuming). The notebook itself, cut off and run again, is in test_notebook.py."""

import dataclasses
import json
import sys
import types

import pytest
import torch

from sciassist.pipelines import colab
from sciassist.pipelines.tiny import MARKER_FILE, TinySettings
from sciassist.train.settings import TrainSettings
from sciassist.train.state import ResumeState, resume_path


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    """google.colab as Colab has it, with drive.mount recording where it mounted; the mount
    point is a folder of the test's."""
    mounted = []
    drive = types.SimpleNamespace(mount=lambda where: mounted.append(where))
    module = types.ModuleType("google.colab")
    module.drive = drive
    monkeypatch.setitem(sys.modules, "google.colab", module)
    monkeypatch.setattr(colab, "DRIVE_MOUNT", str(tmp_path / "content" / "drive"))
    return mounted


def test_persist_is_on_inside_colab_unless_said_otherwise(fake_colab):
    assert colab.persistence_on(None) is True
    assert colab.persistence_on(False) is False


def test_persist_is_off_elsewhere_unless_said_otherwise():
    assert "google.colab" not in sys.modules
    assert colab.persistence_on(None) is False
    assert colab.persistence_on(True) is True


def test_drive_is_mounted_inside_colab_and_a_plain_folder_elsewhere(tmp_path, fake_colab):
    on_drive = tmp_path / "content" / "drive" / "MyDrive" / "sciassist"
    dirs = colab.use_drive(on_drive)
    assert fake_colab == [colab.DRIVE_MOUNT]
    assert (dirs.root, dirs.base_dir, dirs.data_dir, dirs.out_dir) == (
        on_drive, on_drive / "nanochat", on_drive / "data", on_drive / "runs")
    assert on_drive.is_dir()
    colab.use_drive(tmp_path / "elsewhere")  # not on Drive: nothing to mount
    assert fake_colab == [colab.DRIVE_MOUNT] and (tmp_path / "elsewhere").is_dir()


def test_outside_colab_drive_dir_is_just_a_folder(tmp_path):
    dirs = colab.use_drive(tmp_path / "drive")
    assert dirs.root.is_dir() and dirs.out_dir == tmp_path / "drive" / "runs"


def test_data_is_prepared_once_per_request(tmp_path, capsys):
    data_dir = tmp_path / "data"
    sizes = {"train": 10, "val": "all", "test": 3}

    def lines(split):
        return len((data_dir / f"scienceqa_{split}.jsonl").read_text().splitlines())

    report = colab.prepare_once("sample", data_dir, sizes)
    assert report.splits["train"].kept == lines("train") and report.splits["test"].kept == lines("test")
    files = sorted(data_dir.glob("scienceqa_*.jsonl"))
    written = {p: p.stat().st_mtime_ns for p in files}
    assert colab.prepare_once("sample", data_dir, dict(sizes)) is None
    assert "not prepared again" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in files} == written
    # another request prepares again; so does a missing split
    before = lines("train")
    assert colab.prepare_once("sample", data_dir, {**sizes, "train": "all"}) is not None
    assert lines("train") > before
    (data_dir / "scienceqa_val.jsonl").unlink()
    assert colab.prepare_once("sample", data_dir, {**sizes, "train": "all"}) is not None
    assert (data_dir / "scienceqa_val.jsonl").is_file()


def test_the_tiny_base_is_trained_once_per_recipe(tmp_path, monkeypatch, capsys):
    trained = []

    def train_tiny(settings):  # writes the marker as sciassist.pipelines.tiny does, last
        trained.append(settings)
        summary = {"step": settings.steps, "settings": dataclasses.asdict(settings)}
        (tmp_path / "base").mkdir(exist_ok=True)
        (tmp_path / "base" / MARKER_FILE).write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(colab, "train_tiny", train_tiny)
    settings = TinySettings(out_dir=str(tmp_path / "base"), depth=2, steps=30, overwrite=True, progress=False)
    colab.train_tiny_once(settings)
    assert colab.train_tiny_once(dataclasses.replace(settings, progress=True))["step"] == 30
    assert len(trained) == 1 and "not trained again" in capsys.readouterr().out
    colab.train_tiny_once(dataclasses.replace(settings, steps=40))  # another recipe: trained
    assert len(trained) == 2


def _settings(tmp_path, **changes):
    return TrainSettings(out_dir=str(tmp_path / "runs"), output_tag="notebook", data_dir=str(tmp_path / "data"),
                         **changes)


def _save_resume_point(settings, step, num_steps=4):
    metrics = [{"step": 0, "val_loss": 3.0}] + [{"step": s, "train_loss": 2.0 - s / 10} for s in range(1, step + 1)]
    ResumeState(model={"w": torch.zeros(3)}, optimizers=[{}], rng={}, step=step, metrics=metrics,
                best={"step": 0, "val_loss": 3.0}, elapsed_s=1.5, totals={}, settings=dataclasses.asdict(settings),
                data_fingerprint="abc", num_steps=num_steps, epoch=0, step_in_epoch=step).save(resume_path(settings))


def _write_summary(settings, status, steps_done=4):
    settings.run_dir().mkdir(parents=True, exist_ok=True)
    summary = {"status": status, "steps_done": steps_done, "num_steps": 4, "best_checkpoint": "model_000004.pt",
               "settings": dataclasses.asdict(settings)}
    (settings.run_dir() / "run_summary.json").write_text(json.dumps(summary))


def test_nothing_there_is_a_new_run(tmp_path):
    start = colab.where_to_start(_settings(tmp_path))
    assert start.action == "new" and not start.settings.resume and "starting a new run" in start.message


def test_a_run_cut_off_resumes_from_its_last_resume_point(tmp_path):
    settings = _settings(tmp_path)
    _save_resume_point(settings, step=2)
    start = colab.where_to_start(settings)
    assert start.action == "resume" and start.step == 2 and start.settings.resume
    assert start.settings == dataclasses.replace(settings, resume=True)
    assert "from step 2 of 4" in start.message and "disconnect" in start.message
    assert [r["step"] for r in start.records] == [1, 2]  # the curve's earlier steps (step 0 has no train loss)


def test_an_interrupted_run_resumes_and_says_how_it_stopped(tmp_path):
    settings = _settings(tmp_path)
    _save_resume_point(settings, step=3)
    _write_summary(settings, "interrupted", steps_done=3)
    start = colab.where_to_start(settings)
    assert start.action == "resume" and "from step 3 of 4" in start.message and "was interrupted" in start.message


def test_a_completed_run_is_not_trained_again(tmp_path):
    settings = _settings(tmp_path)
    _save_resume_point(settings, step=4)
    _write_summary(settings, "completed")
    start = colab.where_to_start(dataclasses.replace(settings, save_every=7))  # not a trajectory setting
    assert start.completed and start.summary["steps_done"] == 4 and "not training it again" in start.message


def test_what_other_settings_made_is_not_continued(tmp_path):
    settings = _settings(tmp_path)
    _save_resume_point(settings, step=2)
    start = colab.where_to_start(dataclasses.replace(settings, matrix_lr=0.5))
    assert start.action == "new" and not start.settings.resume and "matrix_lr: 0.01 -> 0.5" in start.message
    _write_summary(settings, "completed")
    start = colab.where_to_start(dataclasses.replace(settings, num_epochs=2))
    assert start.action == "new" and "num_epochs: 4 -> 2" in start.message and "completed run" in start.message


def test_an_unreadable_resume_point_means_a_new_run(tmp_path):
    settings = _settings(tmp_path)
    resume_path(settings).parent.mkdir(parents=True)
    resume_path(settings).write_bytes(b"not a torch file")
    start = colab.where_to_start(settings)
    assert start.action == "new" and "cannot be read" in start.message


def test_a_simulated_disconnect_is_not_an_interrupt_and_counts_this_calls_steps():
    seen = []
    callback = colab.disconnect_after(2, seen.append)
    callback({"step": 5})  # a resumed run's first step
    with pytest.raises(colab.SimulatedDisconnect, match="after step 6") as stopped:
        callback({"step": 6})
    assert not isinstance(stopped.value, KeyboardInterrupt)  # train() saves no resume point for it
    assert seen == [{"step": 5}, {"step": 6}]

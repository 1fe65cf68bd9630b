"""--report_to: TensorBoard event files read back, wandb in offline mode, and a resumed run
continuing the same tracker run."""

import dataclasses

import pytest

from sciassist.train.loop import train
from sciassist.train.settings import TrainError
from sciassist.train.tracking import WANDB_ID_FILE, scalars
from tests.train.test_train import data_file, read_metrics, tiny_settings  # noqa: F401 (data_file is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scalars_name_train_and_val_numbers():
    record = {"step": 4, "train_loss": 1.5, "val_loss": 1.2, "best_val_loss": 1.2, "mfu": None, "epoch": 0,
              "compiled": True}
    assert scalars(record) == {"train/train_loss": 1.5, "val/val_loss": 1.2, "val/best_val_loss": 1.2,
                               "train/epoch": 0.0}


def tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_every_record_also_across_a_resume(tmp_path, tiny_base_dir, data_file):  # noqa: F811
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path, num_epochs=2, report_to="tensorboard")

    def stop_at_5(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    assert train(settings, on_step=stop_at_5)["status"] == "interrupted"
    assert train(dataclasses.replace(settings, resume=True))["status"] == "completed"
    run_dir = tmp_path / "run"
    logged = tensorboard_scalars(run_dir / "tensorboard")
    records = read_metrics(run_dir)
    expected_train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    expected_val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [s for s, _ in logged["train/train_loss"]] == [s for s, _ in expected_train] == list(range(1, 9))
    assert [v for _, v in logged["train/train_loss"]] == pytest.approx([v for _, v in expected_train], rel=1e-6)
    assert [s for s, _ in logged["val/val_loss"]] == [s for s, _ in expected_val] == [0, 2, 4, 6, 8]
    assert [v for _, v in logged["val/val_loss"]] == pytest.approx([v for _, v in expected_val], rel=1e-6)


def test_wandb_offline_run_is_continued_by_the_resumed_run(tmp_path, tiny_base_dir, data_file, monkeypatch):  # noqa: F811
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    logged = []  # what reached the real (offline) wandb run: (run id, step, values)
    real_log = wandb.sdk.wandb_run.Run.log

    def recording_log(self, data, step=None, **kwargs):
        logged.append((self.id, step, dict(data)))
        return real_log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", recording_log)
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=4, report_to="wandb",
                             wandb_project="sciassist-test")

    def stop_at_2(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    train(settings, on_step=stop_at_2)
    run_dir = tmp_path / "run"
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    train(dataclasses.replace(settings, resume=True))
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == run_id
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # one wandb run in two sessions (their folders are named by the second they started: may be one folder)
    assert 1 <= len(runs) <= 2 and all(name.endswith(run_id) for name in runs)
    assert {ident for ident, _, _ in logged} == {run_id}
    train_losses = [(step, values["train/train_loss"]) for _, step, values in logged if "train/train_loss" in values]
    expected = [(r["step"], r["train_loss"]) for r in read_metrics(run_dir) if "train_loss" in r]
    assert [s for s, _ in train_losses] == [1, 2, 3, 4] and train_losses == expected


def test_report_to_is_refused_when_unknown(tmp_path, tiny_base_dir, data_file):  # noqa: F811
    with pytest.raises(TrainError, match="--report_to must be one of none, tensorboard, wandb"):
        train(tiny_settings(tiny_base_dir, data_file, tmp_path, report_to="mlflow"))

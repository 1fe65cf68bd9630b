"""sciassist_train.py's stage: training, then --eval_after; and its command line."""

import dataclasses

import pytest
import torch

from nanochat.checkpoint import load_model
from sciassist.data.prepare import prepare
from sciassist.pipelines.finetune import finetune, main
from sciassist.train.settings import TrainSettings
from tests.train.test_train import data_file, resume_weights, tiny_settings  # noqa: F401 (data_file is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_errors_are_short_and_say_what_to_do(tmp_path, tiny_base_dir, data_file, capsys):  # noqa: F811
    def run(*argv):
        code = main(list(argv))
        return code, capsys.readouterr().err

    code, err = run("--data_path", str(tmp_path / "missing.jsonl"), "--base_dir", str(tiny_base_dir),
                    "--source", "base", "--device", "cpu")
    assert code == 2 and "missing.jsonl not found" in err and "Traceback" not in err
    code, err = run("--data_dir", str(tmp_path), "--base_dir", str(tiny_base_dir), "--source", "base",
                    "--device", "cpu")
    assert code == 2 and "scienceqa_train.jsonl not found" in err and "python -m sciassist.data.prepare" in err
    code, err = run("--data_path", str(data_file), "--base_dir", str(tmp_path / "nowhere"), "--device", "cpu")
    assert code == 2 and "looked in --base_dir" in err and str(tmp_path / "nowhere") in err
    assert "python -m sciassist.hub" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, err = run("--data_path", str(bad), "--base_dir", str(tiny_base_dir), "--source", "base", "--device", "cpu")
    assert code == 2 and f"{bad}:1:" in err
    with pytest.raises(SystemExit) as e:
        main(["--matrix_lr", "0"])
    assert e.value.code == 2 and "argument --matrix_lr: must be a positive number <= 100.0, got 0" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--num_epochs", "four"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
    code, err = run("--resume", "--out_dir", str(tmp_path), "--data_path", str(data_file),
                    "--base_dir", str(tiny_base_dir), "--source", "base", "--device", "cpu")
    assert code == 2 and "no resume point" in err


def test_without_validation_the_final_weights_are_saved(tmp_path, tiny_base_dir, data_file):  # noqa: F811
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path, val_split=0.0, num_iterations=2)
    assert main([arg for f in dataclasses.fields(TrainSettings) if getattr(settings, f.name) is not None
                 for arg in (f"--{f.name}", str(getattr(settings, f.name)))]) == 0
    run_dir = tmp_path / "run"
    _, _, meta = load_model(run_dir, device="cpu")
    assert meta["step"] == 2 and meta["val_loss"] is None
    assert torch.equal(resume_weights(run_dir)["lm_head.weight"], torch.load(
        run_dir / "model_000002.pt", weights_only=True)["lm_head.weight"])


def test_bundled_sample_run_learns_and_evaluates_after(tmp_path, tiny_base_dir):
    prepare("sample", tmp_path / "data", sizes={"train": "all", "val": "all", "test": 0}, splits=("train", "val"))
    settings = tiny_settings(tiny_base_dir, "scienceqa", tmp_path / "out", data_dir=str(tmp_path / "data"),
                             max_seq_len=256, num_epochs=4, eval_every=0, eval_steps=4, eval_after=True,
                             device_batch_size=4)
    summary = finetune(settings)
    lines = len((tmp_path / "data" / "scienceqa_train.jsonl").read_text().splitlines())
    assert summary["status"] == "completed"
    assert summary["train_conversations"] + summary["dropped_without_supervision"]["train"] == lines
    assert summary["truncated"]["train"] > 0  # a 512-token vocabulary makes long questions; cut and counted
    assert summary["final_val_loss"] < 0.8 * summary["initial_val_loss"]
    evaluation = summary["evaluation"]
    assert evaluation is not None and "error" not in evaluation
    assert (tmp_path / "out" / "run" / "eval").is_dir()


def test_preset_flag_points_to_the_recipes_command(capsys):
    assert main(["--preset", "cpu", "--scienceqa", "sample", "--out_dir", "unused"]) == 2
    err = capsys.readouterr().err
    assert "recipes are their own command: python -m sciassist.pipelines.recipes --preset NAME" in err


def test_dry_run_prints_the_memory_plan_and_loads_nothing(tmp_path, tiny_base_dir, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("--dry_run must not load weights")

    monkeypatch.setattr(torch, "load", no_loading)
    code = main(["--dry_run", "--base_dir", str(tiny_base_dir), "--source", "base", "--device", "cpu",
                 "--data_path", str(tmp_path / "not_there.jsonl"), "--device_batch_size", "2",
                 "--max_seq_len", "128", "--out_dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert "memory plan for base checkpoint" in out and "device batch 2 x 128 positions" in out
    for line in ("parameters (fp32)", "gradients (fp32)", "optimizer states", "activations", "**total**"):
        assert line in out
    assert not (tmp_path / "runs").exists()
    # auto on a CPU: the CPU's micro-batch (2,048 positions: 16 rows of 128)
    code = main(["--dry_run", "--base_dir", str(tiny_base_dir), "--source", "base", "--device", "cpu",
                 "--max_seq_len", "128", "--out_dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0 and "(--device_batch_size auto on cpu: 16 row(s) of 128 positions)" in out
    assert "device batch 16 x 128 positions" in out


def test_dry_run_is_a_flag_of_the_command_not_of_the_settings():
    from sciassist.pipelines.finetune import FinetuneCommand, command_from_args
    command = command_from_args(["--dry_run", "--device_batch_size", "3"])
    assert isinstance(command, FinetuneCommand) and command.dry_run
    settings = command.train_settings()
    assert type(settings) is TrainSettings and settings.device_batch_size == 3
    assert "dry_run" not in {f.name for f in dataclasses.fields(TrainSettings)}
    code = main(["--dry_run", "--base_dir", "/nonexistent/base", "--device", "cpu"])
    assert code == 2

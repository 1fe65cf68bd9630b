"""Stopping a run: SIGTERM is handled as Ctrl-C (a resume point, then exit 143), a second signal
never cuts the resume point's save short, and nothing of a stopped run is lost or left behind."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import sciassist.train.state as state_module
from sciassist.pipelines import finetune as finetune_module
from sciassist.train.loop import train
from sciassist.train.settings import TrainSettings
from sciassist.train.step import Terminated, defer_interrupt
from tests.train.test_train import (  # noqa: F401 (data_file and live_base_dir are fixtures)
    REPO_ROOT,
    data_file,
    live_base_dir,
    read_metrics,
    resume_weights,
    tiny_settings,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def command_line(settings):
    flags = []
    for f in dataclasses.fields(TrainSettings):
        value = getattr(settings, f.name)
        if value is not None:
            flags += [f"--{f.name}", str(value)]
    return [sys.executable, str(REPO_ROOT / "sciassist_train.py"), *flags]


def records_in(run_dir):
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def leftovers(run_dir):
    return sorted(p.name for p in run_dir.rglob("*.tmp"))


def test_sigterm_saves_a_resume_point_exits_143_and_resume_matches(tmp_path, live_base_dir, data_file):  # noqa: F811
    settings = tiny_settings(live_base_dir, data_file, tmp_path / "cut", num_iterations=60, eval_every=10)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(command_line(settings), cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    run_dir = settings.run_dir()
    deadline = time.time() + 120
    while records_in(run_dir) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-3000:]
    assert "terminated (SIGTERM) at step" in out and "--resume" in out and "Traceback" not in err
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "terminated" and 2 <= summary["steps_done"] < 60
    state = torch.load(run_dir / "resume" / "state.pt", weights_only=True)
    assert state["step"] == summary["steps_done"] and leftovers(run_dir) == []

    resumed = train(dataclasses.replace(settings, resume=True))
    assert resumed["status"] == "completed" and resumed["steps_done"] == 60
    full = dataclasses.replace(settings, out_dir=str(tmp_path / "full"))
    train(full)
    weights_full, weights_cut = resume_weights(full.run_dir()), resume_weights(run_dir)
    assert all(torch.equal(weights_full[k], weights_cut[k]) for k in weights_full)
    steps = [[r["step"] for r in read_metrics(s.run_dir())] for s in (full, settings)]
    assert steps[0] == steps[1] == list(range(61))  # nothing lost or repeated around the stop


def saves_sending(monkeypatch, signals):
    """torch.save that sends `signals` to this process before writing a resume point: signals
    in the middle of its save. Returns the list of the resume point's saves."""
    real = torch.save
    saves = []

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(".state.pt.tmp"):
            assert threading.current_thread() is threading.main_thread()
            saves.append(f)
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(state_module.torch, "save", save)
    return saves


@pytest.mark.usefixtures("sigint_from_a_terminal")
@pytest.mark.parametrize("first, second, status", [
    (signal.SIGINT, signal.SIGTERM, "interrupted"),
    (signal.SIGTERM, signal.SIGINT, "terminated"),
])
def test_a_second_signal_while_saving_is_held(tmp_path, live_base_dir, data_file, monkeypatch, capsys,  # noqa: F811
                                              first, second, status):
    settings = tiny_settings(live_base_dir, data_file, tmp_path, num_iterations=6, eval_every=0)
    saves = saves_sending(monkeypatch, [second, second])

    def stop_at_2(record):
        if record["step"] == 2:
            os.kill(os.getpid(), first)

    summary = train(settings, on_step=stop_at_2)
    assert summary["status"] == status and summary["steps_done"] == 2 and len(saves) == 1
    assert "saving the resume point, one moment" in capsys.readouterr().err
    assert torch.load(settings.run_dir() / "resume" / "state.pt", weights_only=True)["step"] == 2
    assert leftovers(settings.run_dir()) == []
    # the handlers of before the run are back
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.undo()
    assert train(dataclasses.replace(settings, resume=True))["steps_done"] == 6


@pytest.mark.usefixtures("sigint_ignored")
def test_an_ignored_sigint_stays_ignored_and_sigterm_still_stops_the_run(tmp_path, live_base_dir,  # noqa: F811
                                                                          data_file):  # noqa: F811
    """Started with SIGINT ignored (`nohup sciassist train ... &`): Ctrl-C is not the run's to take,
    SIGTERM stops it as always, and the handlers found are put back."""
    settings = tiny_settings(live_base_dir, data_file, tmp_path / "int", num_iterations=4, eval_every=0)
    sigterm_before, seen = signal.getsignal(signal.SIGTERM), []

    def send(signum, at_step):
        def on_step(record):
            seen.append(signal.getsignal(signal.SIGINT))
            if record["step"] == at_step:
                os.kill(os.getpid(), signum)
        return on_step

    summary = train(settings, on_step=send(signal.SIGINT, 2))
    assert summary["status"] == "completed" and summary["steps_done"] == 4
    assert seen and all(handler == signal.SIG_IGN for handler in seen)
    settings = dataclasses.replace(settings, out_dir=str(tmp_path / "term"))
    summary = train(settings, on_step=send(signal.SIGTERM, 2))
    assert summary["status"] == "terminated" and summary["steps_done"] == 2
    assert torch.load(settings.run_dir() / "resume" / "state.pt", weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == sigterm_before


@pytest.mark.usefixtures("sigint_ignored")
def test_holding_ctrl_c_outside_a_run_leaves_an_ignored_sigint_alone():
    done = []
    with defer_interrupt():
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        done.append("the rest of the update ran")
    assert done == ["the rest of the update ran"] and signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_a_signal_during_a_periodic_save_stops_the_run_once_it_is_saved(tmp_path, live_base_dir,  # noqa: F811
                                                                         data_file, monkeypatch, capsys):  # noqa: F811
    settings = tiny_settings(live_base_dir, data_file, tmp_path, num_iterations=6, eval_every=0, save_every=2)
    saves = saves_sending(monkeypatch, [signal.SIGTERM])
    summary = train(settings)
    assert "saving the resume point, one moment" in capsys.readouterr().err
    # the save of step 2 finished, then the run stopped there, without saving the same point again
    assert summary["status"] == "terminated" and summary["steps_done"] == 2 and len(saves) == 1
    assert torch.load(settings.run_dir() / "resume" / "state.pt", weights_only=True)["step"] == 2
    assert leftovers(settings.run_dir()) == []


def test_exit_codes_of_stopped_runs(monkeypatch, capsys):
    monkeypatch.setattr(finetune_module, "train", lambda settings, on_step=None: {"status": "terminated"})
    assert finetune_module.main([]) == 143
    monkeypatch.setattr(finetune_module, "train", lambda settings, on_step=None: {"status": "interrupted"})
    assert finetune_module.main([]) == 130

    def stopped_while_starting(settings, on_step=None):
        raise Terminated

    monkeypatch.setattr(finetune_module, "train", stopped_while_starting)
    assert finetune_module.main([]) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM) while the run was starting or finishing" in err and "Traceback" not in err

"""The files a run reads and leaves: a damaged resume point is one line saying what to do (and is
left as it was), a resume point of another model is refused, what killed writes left in a run
folder is removed when a run starts there, and the training data's path is checked."""

import dataclasses
import pickle
import shutil

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from sciassist.pipelines.finetune import main, settings_from_args
from sciassist.train.loop import train
from sciassist.train.settings import TrainError, TrainSettings, check_settings
from sciassist.train.setup import load_conversation_sets
from tests.train.test_stopping import command_line, leftovers
from tests.train.test_train import data_file, tiny_settings  # noqa: F401 (data_file is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

FRESH_START = "start a new run without --resume (or another --output_tag)"


def stop(record):
    raise KeyboardInterrupt


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_base_dir, data_file):  # noqa: F811
    """(settings, run folder) of a run stopped after its first step, with its resume point."""
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path_factory.mktemp("stopped"), num_iterations=3,
                             eval_every=0)
    assert train(settings, on_step=stop)["status"] == "interrupted"
    return settings, settings.run_dir()


@pytest.fixture
def copied_run(tmp_path, stopped_run):
    settings, run_dir = stopped_run
    shutil.copytree(run_dir, tmp_path / "run")
    return dataclasses.replace(settings, out_dir=str(tmp_path), resume=True), tmp_path / "run" / "resume" / "state.pt"


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 40)
    elif how == "pickle payload":  # a non-weights-only object, e.g. a whole config object
        torch.save({"model": GPTConfig()}, path)
    elif how == "raw pickle":
        path.write_bytes(pickle.dumps(print))
    elif how == "wrong types":
        state = torch.load(path, weights_only=True)
        torch.save({**state, "step": "2", "rng": []}, path)


@pytest.mark.parametrize("how, problem", [
    ("truncated", "is unreadable: truncated or corrupt"),
    ("empty", "is empty (0 bytes"),
    ("garbage", "is unreadable: truncated or corrupt"),
    ("pickle payload", "holds Python objects other than tensors and plain data (nanochat.gpt.GPTConfig); "
                       "refusing to unpickle it for safety"),
    ("raw pickle", "holds Python objects other than tensors and plain data (a plain pickle of protocol"),
    ("wrong types", "is a damaged resume point (rng is list, not dict; step is str, not int)"),
])
def test_a_damaged_resume_point_is_one_line_and_left_as_it_was(copied_run, capsys, how, problem):
    settings, path = copied_run
    damage(path, how)
    before = path.read_bytes()
    with pytest.raises(TrainError) as info:
        train(settings)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and problem in message and FRESH_START in message
    assert "weights_only" not in message and "\x1b" not in message
    assert path.read_bytes() == before and leftovers(path.parent.parent) == []
    # the command line says the same in one line
    assert main(command_line(settings)[2:]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and problem in err


def test_a_resume_point_of_another_model_is_refused(copied_run):
    settings, path = copied_run
    state = torch.load(path, weights_only=True)
    other = GPT(GPTConfig(sequence_len=256, vocab_size=512, n_layer=3, n_head=2, n_kv_head=2, n_embd=32))
    torch.save({**state, "model": other.state_dict()}, path)
    with pytest.raises(TrainError) as info:
        train(settings)
    message = str(info.value)
    assert message.startswith(f"{path} is the resume point of another model (unexpected: transformer.h.2.")
    assert "other shapes: lm_head.weight [512, 32] there, [512, 64] now" in message
    assert "\n" not in message and FRESH_START in message


def test_what_killed_writes_left_is_removed_when_a_run_starts(copied_run, capsys):
    settings, path = copied_run
    run_dir = path.parent.parent
    planted = {
        ".model_000002.pt.k3j2h1.tmp": b"half a model",  # a checkpoint's temp file
        ".meta_000002.json.a8d7f6.tmp": b"{",
        "meta_000002.json": b"{}",  # its meta, put in place before the model, which never came
        "model_000007.pt": b"a model without meta",  # an older version's cut save
    }
    for name, data in planted.items():
        (run_dir / name).write_bytes(data)
    (path.parent / ".state.pt.tmp").write_bytes(b"half a resume point")
    summary = train(settings)
    assert summary["status"] == "completed" and summary["steps_done"] == 3
    out = capsys.readouterr().out
    assert f"note: removed what an interrupted save left in {run_dir}: " in out
    for name in [*planted, "resume/.state.pt.tmp"]:
        assert name in out
    assert leftovers(run_dir) == [] and not (run_dir / "model_000007.pt").exists()
    assert sorted(p.name for p in run_dir.glob("me*_*")) == ["meta_000003.json"]  # this run's checkpoint


def test_a_directory_as_data_path_is_named(tmp_path):
    with pytest.raises(TrainError) as info:
        load_conversation_sets(TrainSettings(data_path=str(tmp_path), val_split=0))
    assert str(info.value) == (f"--data_path: {tmp_path} is a directory; expected a JSONL file, one conversation per "
                               f"line (ScienceQA files prepared in it: --data_path scienceqa --data_dir {tmp_path})")


def test_the_skip_bad_lines_hint_only_when_it_is_off(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{bad\n')
    with pytest.raises(TrainError, match="--skip_bad_lines true skips such lines"):
        load_conversation_sets(TrainSettings(data_path=str(path), val_split=0))
    with pytest.raises(TrainError) as info:
        load_conversation_sets(TrainSettings(data_path=str(path), val_split=0, skip_bad_lines=True))
    assert "no conversations (2 bad lines skipped)" in str(info.value) and "--skip_bad_lines" not in str(info.value)


NUMBER_FLAGS = [f for f in dataclasses.fields(TrainSettings)
                if f.type in ("int", "float", "int | None", "float | None", "int | str")]


def test_every_number_flag_has_a_range_checked_when_parsed(capsys):
    assert len(NUMBER_FLAGS) == 24  # 19 + lora_rank, lora_alpha, lora_dropout, lora_lr, threads
    for f in NUMBER_FLAGS:
        bounded_below = "at_least" in f.metadata or "above" in f.metadata
        bounded_above = "at_most" in f.metadata or "below" in f.metadata
        assert bounded_below and bounded_above or f.name == "model_step", f.name
    for flag, value, expected in [("--device_batch_size", "0", "must be between 1 and 1000000, got 0"),
                                  ("--seed", "-1", "must be between 0 and"),
                                  ("--max_seq_len", "2000000", "must be between 16 and 1048576"),
                                  ("--model_step", "-5", "must be >= 0, got -5"),
                                  ("--matrix_lr", "inf", "must be a finite number")]:
        with pytest.raises(SystemExit) as exit_info:
            settings_from_args([flag, value])
        assert exit_info.value.code == 2
        assert f"argument {flag}: {expected}" in capsys.readouterr().err


def test_check_settings_reports_ranges_once_per_flag():
    with pytest.raises(TrainError) as info:
        check_settings(TrainSettings(matrix_lr=-1.0, pack_len=0, eval_every=-2, grad_clip=float("nan")))
    message = str(info.value)
    assert message.count("--matrix_lr") == 1 and "--matrix_lr must be a positive number <= 100.0, got -1.0" in message
    assert "--pack_len must be between 1 and 1048576, got 0" in message
    assert "--eval_every must be between 0 and 1000000000, got -2" in message
    assert message.count("--grad_clip") == 1
    with pytest.raises(TrainError, match=r"--warmup_steps must be between 0 and 1000000000, got 10000000000"):
        check_settings(TrainSettings(warmup_steps=10**10))

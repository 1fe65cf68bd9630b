"""The one checkpoint resolver (sciassist.checkpoints): folders, model files, source:tag[:step]
specs, the newest fine-tuned run and the base-dir fallbacks, on the tiny checkpoint."""

import os
import shutil
from pathlib import Path

import pytest

import sciassist.checkpoints
from nanochat.checkpoint import CheckpointError
from sciassist.checkpoints import (
    SPEC_HELP,
    CheckpointChoice,
    CheckpointSettings,
    choose_checkpoint,
    default_base_dir,
    is_repo_id,
    latest_finetuned,
    load_choice,
    model_steps,
    parse_spec,
    resolve_from_settings,
)
from sciassist.common import settings_from_namespace, settings_parser


def make_finetuned_run(root, name, base_dir, step, mtime):
    """A fine-tuned run as sciassist.train.loop writes it: model + meta + tokenizer/."""
    run = root / name
    run.mkdir(parents=True)
    source = base_dir / "base_checkpoints" / "d2"
    shutil.copy(source / "model_000000.pt", run / f"model_{step:06d}.pt")
    shutil.copy(source / "meta_000000.json", run / f"meta_{step:06d}.json")
    shutil.copytree(base_dir / "tokenizer", run / "tokenizer", dirs_exist_ok=True)
    os.utime(run / f"model_{step:06d}.pt", (mtime, mtime))
    return run


def test_newest_finetuned_run_is_the_default(tmp_path, tiny_base_dir):
    root = tmp_path / "finetuned_model_checkpoint"
    make_finetuned_run(root, "long_run", tiny_base_dir, step=500, mtime=1_000_000)
    recent = make_finetuned_run(root, "short_run", tiny_base_dir, step=20, mtime=2_000_000)
    (root / "stray.txt").write_text("not a run")
    assert latest_finetuned(root) == (recent, 20)
    choice = choose_checkpoint(finetuned_dir=root, base_dir=tiny_base_dir)
    assert (choice.kind, choice.checkpoint_dir, choice.step) == ("finetuned", recent, 20)
    assert choice.tokenizer_dir == recent / "tokenizer"
    assert "fine-tuned" in choice.describe() and "step 20" in choice.describe()
    assert choice.name == "short_run"
    loaded = load_choice(choice, device="cpu")
    assert loaded.info()["checkpoint"] == str(recent) and loaded.info()["kind"] == "finetuned"
    assert loaded.sequence_len == 256 and loaded.meta["model_config"]["n_layer"] == 2


def test_model_step_applies_to_the_finetuned_run(tmp_path, tiny_base_dir):
    root = tmp_path / "ft"
    run = make_finetuned_run(root, "run", tiny_base_dir, step=10, mtime=1_000_000)
    shutil.copy(run / "model_000010.pt", run / "model_000020.pt")
    shutil.copy(run / "meta_000010.json", run / "meta_000020.json")
    assert model_steps(run) == [10, 20]
    assert choose_checkpoint(finetuned_dir=root, model_step=10, base_dir=tiny_base_dir).step == 10
    with pytest.raises(Exception, match="no model file for step 30"):
        choose_checkpoint(finetuned_dir=root, model_step=30, base_dir=tiny_base_dir)


def test_base_dir_sft_is_preferred_over_base(tmp_path, tiny_base_dir):
    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base)
    assert choose_checkpoint(base_dir=base, finetuned_dir=tmp_path / "none").source == "base"
    shutil.copytree(base / "base_checkpoints" / "d2", base / "chatsft_checkpoints" / "d2")
    choice = choose_checkpoint(base_dir=base, finetuned_dir=tmp_path / "none")
    assert (choice.kind, choice.source, choice.step) == ("base_dir", "sft", 0)
    assert choice.checkpoint_dir == base / "chatsft_checkpoints" / "d2"
    assert choice.name == "sft d2"
    # An explicit source or tag skips the fine-tuned runs and the fallback order.
    root = tmp_path / "ft"
    make_finetuned_run(root, "run", tiny_base_dir, step=5, mtime=1_000_000)
    assert choose_checkpoint(source="base", base_dir=base, finetuned_dir=root).source == "base"
    assert choose_checkpoint(model_tag="d2", base_dir=base, finetuned_dir=root).source == "sft"


def test_explicit_checkpoint_dir_or_file(tiny_base_dir):
    directory = tiny_base_dir / "base_checkpoints" / "d2"
    choice = choose_checkpoint(checkpoint=directory)
    assert (choice.kind, choice.step, choice.tokenizer_dir) == ("checkpoint", 0, tiny_base_dir / "tokenizer")
    from_file = choose_checkpoint(checkpoint=directory / "model_000000.pt")
    assert (from_file.checkpoint_dir, from_file.step) == (directory, 0)
    assert isinstance(from_file, CheckpointChoice)


def test_checkpoint_errors_say_what_is_wrong(tmp_path, tiny_base_dir):
    with pytest.raises(CheckpointError, match=f"^no such folder: {tmp_path / 'missing'} \\(expected a "):
        choose_checkpoint(checkpoint=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_<step>.pt files"):
        choose_checkpoint(checkpoint=tmp_path / "empty")
    no_meta = tmp_path / "no_meta"
    no_meta.mkdir()
    shutil.copy(tiny_base_dir / "base_checkpoints" / "d2" / "model_000000.pt", no_meta / "model_000000.pt")
    with pytest.raises(CheckpointError) as info:  # the model is there: the missing file is its meta
        choose_checkpoint(checkpoint=no_meta)
    assert str(info.value) == (f"{no_meta}: meta_000000.json is missing beside model_000000.pt (a checkpoint is "
                               f"model_<step>.pt plus meta_<step>.json, its config)")
    with pytest.raises(CheckpointError, match="not both"):
        choose_checkpoint(checkpoint=tmp_path, source="sft")
    with pytest.raises(CheckpointError, match="disagrees"):
        choose_checkpoint(checkpoint=tiny_base_dir / "base_checkpoints" / "d2" / "model_000000.pt", model_step=3)
    with pytest.raises(CheckpointError) as info:
        choose_checkpoint(base_dir=tmp_path / "nothing", finetuned_dir=tmp_path / "ft")
    message = str(info.value)
    assert "no fine-tuned run" in message and "sft in" in message and "base in" in message
    with pytest.raises(CheckpointError):
        choose_checkpoint(source="rl", base_dir=tiny_base_dir)


@pytest.fixture
def hub_forbidden(monkeypatch):
    """snapshot_download fails the test: nothing named here may be sent to the hub."""
    def forbidden(*args, **kwargs):
        pytest.fail(f"the hub was asked for {kwargs.get('repo_id', args[:1])}")
    monkeypatch.setattr(sciassist.checkpoints, "snapshot_download", forbidden)


@pytest.mark.parametrize(("spec", "message"), [
    ("finetuned_model_checkpoint/finetunde", "no such folder: finetuned_model_checkpoint/finetunde"),  # no run yet
    ("my_runs/finetunde", "no such folder: my_runs/finetunde"),  # --finetuned_dir my_runs
    ("runs/finetunde", "no such folder: runs/finetunde"),  # runs/ exists
    ("run1/model_000100.pt", "no such file: run1/model_000100.pt"),
    ("run1/meta_000100.json", "no such folder: run1/meta_000100.json"),
    ("./run1/x", "no such folder: run1/x"),
    ("../run1", "no such folder: ../run1"),
    ("~/run1", "no such folder: {tmp}/home/run1"),
    ("chatsft_checkpoints/d20", "no such folder: chatsft_checkpoints/d20"),
    ("notes.txt", "not a folder: notes.txt"),
])
def test_a_missing_local_path_never_goes_to_the_hub(tmp_path, monkeypatch, hub_forbidden, spec, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "runs").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as error:
        choose_checkpoint(spec, finetuned_dir="my_runs", base_dir=tmp_path)
    assert str(error.value).startswith(message.format(tmp=tmp_path) + " (expected a ")
    assert "\n" not in str(error.value)


def test_only_an_owner_name_that_cannot_be_local_is_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert is_repo_id("karpathy/nanochat-d32") and is_repo_id("you/sciassist-d20.v2")
    assert is_repo_id("runz/finetuned")  # the shape of a repo id and nothing local says otherwise
    for local in ("runs/x", "finetuned_model_checkpoint/x", "base_checkpoints/d20", "hf_models/x", "a/b.pt",
                  "a/b.safetensors", "./a/b", ".a/b", "~a/b", "a\\b", "a/b/c", "a/", "sft:d20"):
        assert not is_repo_id(local), local
    assert not is_repo_id("out/x", finetuned_dir="some/where/out") and is_repo_id("out/x")


def test_chat_with_a_mistyped_path_is_one_error_line(tmp_path, monkeypatch, hub_forbidden, capsys):
    from sciassist import cli
    monkeypatch.chdir(tmp_path)
    code = cli.main(["chat", "--checkpoint", "finetuned_model_checkpoint/finetunde", "-p", "hi", "--device", "cpu"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: no such folder: finetuned_model_checkpoint/finetunde (")


def test_default_base_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    assert default_base_dir() == tmp_path
    monkeypatch.delenv("NANOCHAT_BASE_DIR")
    assert default_base_dir() == Path.home() / ".cache" / "nanochat"


def test_latest_finetuned_and_model_steps_on_missing_dirs(tmp_path):
    assert latest_finetuned(tmp_path / "nope") is None
    assert model_steps(tmp_path / "nope") == []
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model_7.pt").write_bytes(b"")
    (tmp_path / "run" / "model_x.pt").write_bytes(b"")
    assert model_steps(tmp_path / "run") == [7]


def test_checkpoint_settings_round_trip(tiny_base_dir):
    parser = settings_parser(CheckpointSettings, "test", "the model flags")
    args = parser.parse_args(["--base_dir", str(tiny_base_dir), "--source", "base", "--device", "cpu"])
    loaded = resolve_from_settings(settings_from_namespace(CheckpointSettings, args))
    assert loaded.choice.source == "base" and loaded.info()["device"] == "cpu"


def test_source_specs_name_a_base_dir_checkpoint(tiny_base_dir):
    directory = tiny_base_dir / "base_checkpoints" / "d2"
    choice = choose_checkpoint("base:d2", base_dir=tiny_base_dir)
    assert (choice.kind, choice.checkpoint_dir, choice.step, choice.source) == ("base_dir", directory, 0, "base")
    assert choose_checkpoint("base", base_dir=tiny_base_dir).checkpoint_dir == directory  # default tag
    assert choose_checkpoint("base:d2:0", base_dir=tiny_base_dir).step == 0
    assert choose_checkpoint(str(directory)).step == 0  # a folder: its latest step
    from_file = choose_checkpoint(str(directory / "model_000000.pt"))
    assert (from_file.checkpoint_dir, from_file.step) == (directory, 0)
    assert from_file.model_file == directory / "model_000000.pt"
    assert parse_spec("sft:d20:650") == ("sft", "d20", 650) and parse_spec("chatsft:d20") == ("sft", "d20", None)
    assert parse_spec("runs/my_run") is None
    with pytest.raises(CheckpointError, match="neither"):
        choose_checkpoint("nowhere/d2", base_dir=tiny_base_dir)
    with pytest.raises(CheckpointError, match="the step must be a number"):
        choose_checkpoint("base:d2:last", base_dir=tiny_base_dir)
    with pytest.raises(CheckpointError, match="latest step present: 0"):
        choose_checkpoint("base:d2:5", base_dir=tiny_base_dir)


def test_a_save_cut_short_is_invisible_to_the_resolver(tmp_path, tiny_base_dir):
    # what a save killed after putting meta in place leaves: the meta and the model's temp file
    root = tmp_path / "ft"
    run = make_finetuned_run(root, "run", tiny_base_dir, step=5, mtime=1_000_000)
    shutil.copy(run / "meta_000005.json", run / "meta_000009.json")
    (run / ".model_000009.pt.x1y2z3.tmp").write_bytes(b"half a model")
    assert latest_finetuned(root) == (run, 5)
    for choice in (choose_checkpoint(finetuned_dir=root, base_dir=tiny_base_dir), choose_checkpoint(str(run))):
        assert choice.step == 5
        assert load_choice(choice, device="cpu").meta["step"] == 0  # the copied tiny base's meta


def test_a_model_without_its_meta_is_passed_over_with_a_note(tmp_path, tiny_base_dir, capsys):
    root = tmp_path / "ft"
    run = make_finetuned_run(root, "run", tiny_base_dir, step=10, mtime=1_000_000)
    shutil.copy(run / "model_000010.pt", run / "model_000020.pt")  # as an older version's cut-short save left it
    choice = choose_checkpoint(checkpoint=run)
    assert choice.step == 10 and latest_finetuned(root) == (run, 10)
    assert "model_000020.pt has no meta_000020.json" in capsys.readouterr().err
    assert load_choice(choice, device="cpu").meta["model_config"]["n_layer"] == 2


def test_a_transformers_folder_is_accepted_wherever_a_checkpoint_is(tmp_path, tiny_base_dir):
    from sciassist.export import main as export_main  # the export, a higher layer, writes the folder
    hf_dir = tmp_path / "hf" / "tiny"
    assert export_main(["--checkpoint", str(tiny_base_dir / "base_checkpoints" / "d2"), "--out_dir", str(hf_dir)]) == 0
    parser = settings_parser(CheckpointSettings, "test", "the model flags")
    args = parser.parse_args(["--checkpoint", str(hf_dir), "--device", "cpu"])
    loaded = resolve_from_settings(settings_from_namespace(CheckpointSettings, args))
    assert (loaded.choice.kind, loaded.choice.name, loaded.choice.step) == ("transformers", "tiny", 0)
    assert loaded.sequence_len == 256 and loaded.info()["vocab_size"] == 512
    assert choose_checkpoint(str(hf_dir), model_step=0).checkpoint_dir == loaded.choice.checkpoint_dir
    with pytest.raises(CheckpointError, match="a transformers model has one step"):
        choose_checkpoint(str(hf_dir), model_step=3)
    assert "transformers" in SPEC_HELP and "owner/name" in SPEC_HELP

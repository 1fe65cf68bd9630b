import json
import subprocess
import sys

import pytest

from sciassist.common import UserError, settings_from_namespace
from sciassist.eval import run as ev
from sciassist.eval.questions import EvaluationError
from sciassist.eval.report import read_results_file
from tests.conftest import REPO_ROOT
from tests.eval.stubs import finetuned_dir_from, record

EXPECTED_FILES = ["predictions_base.json", "predictions_finetuned.json", "predictions_base_generated.json",
                  "predictions_finetuned_generated.json", "per_question_base.jsonl", "per_question_finetuned.jsonl",
                  "accuracy_by_category.png", "loss_curve.png", "samples.md", "report.md", "results.json",
                  "table.json", "table.md"]


@pytest.mark.slow
def test_cli_end_to_end_on_tiny_checkpoints(tiny_base_dir, tmp_path):
    run = finetuned_dir_from(tiny_base_dir, tmp_path)
    out = tmp_path / "out"
    log = tmp_path / "train.log"
    log.write_text("Step 25/748 | train loss: 1.234 | val loss: 1.100\nStep 50/748 | train loss: 1.0\n")
    cmd = [sys.executable, "sciassist_evaluate.py", "--base", str(tiny_base_dir / "base_checkpoints" / "d2"),
           "--finetuned", str(run), "--scienceqa", "sample", "--out_dir", str(out), "--device", "cpu",
           "--limit", "6", "--max_new_tokens", "6", "--num_samples", "2", "--sample_max_tokens", "8",
           "--log_file", str(log)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in EXPECTED_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert "Avg" in result.stdout and "chance" in result.stdout

    summary = json.loads((out / "results.json").read_text())
    n = summary["data"]["count"]
    assert n == 6 and summary["data"]["available"] == 12  # a seeded subset of the sample's val split
    base = read_results_file(out / "predictions_base.json")
    assert base["count"] == n
    # the same checkpoint weights: identical letter-scored answers on the same questions
    assert read_results_file(out / "predictions_finetuned.json")["results"] == base["results"]
    lines = [json.loads(line) for line in (out / "per_question_base.jsonl").read_text().splitlines()]
    assert len(lines) == n and set(lines[0]) >= {"pid", "gold", "prediction", "probabilities", "generated", "valid"}
    assert all(abs(sum(line["probabilities"]) - 1) < 1e-4 for line in lines)
    assert summary["models"]["finetuned"]["step"] == 10
    assert summary["settings"]["scoring"] == "letter" and summary["settings"]["answer_format"] == "letter_first"
    assert {"scoring_s", "scoring_questions_per_s", "load_s"} <= set(summary["timing"]["base"])
    avg = next(r for r in summary["table"]["rows"] if r["name"] == "base")["cells"]["Avg"]
    assert avg["correct"] == base["correct"] and avg["count"] == n
    report = (out / "report.md").read_text()
    assert "| questions |" in report and "majority" in report and str(log) in report
    assert "| letter scoring s |" in report
    assert "## s" in (out / "samples.md").read_text()


def test_cli_reports_bad_input(tmp_path, capsys):
    code = ev.main(["--base", "nowhere:d2", "--scienceqa", "sample", "--base_dir", str(tmp_path),
                    "--out_dir", str(tmp_path / "o")])
    assert code == 2
    assert "error:" in capsys.readouterr().err
    assert ev.main(["--out_dir", str(tmp_path / "o")]) == 2
    assert "nothing to do" in capsys.readouterr().err
    log = tmp_path / "notes.txt"
    log.write_text("no losses here\n")
    assert ev.main(["--log_file", str(log), "--out_dir", str(tmp_path / "o")]) == 2
    assert "no loss values found" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--log_file", "{tmp}/missing.log"], "error: --log_file: [Errno 2] No such file or directory"),
    (["--metrics_path", "{tmp}/missing.jsonl"], "error: --metrics_path: [Errno 2] No such file or directory"),
    (["--finetuned", "{tmp}/missing_run", "--scienceqa", "sample"], "error: no such folder: {tmp}/missing_run"),
    (["--base", "sft:d2", "--base_dir", "{tmp}", "--scienceqa", "sample"], "error: {tmp}/chatsft_checkpoints"),
    (["--finetuned", "{checkpoint}", "--data_path", "{tmp}/missing.jsonl"], "error: {tmp}/missing.jsonl: no such"),
    (["--finetuned", "{checkpoint}", "--scienceqa", "{tmp}/no_copy"], "error: ScienceQA source"),
])
def test_a_bad_input_leaves_no_output_folder(tiny_base_dir, tmp_path, argv, message, capsys):
    """Every input is read before --out_dir is made, so a typo leaves no empty eval_results/ behind."""
    names = {"tmp": tmp_path, "checkpoint": tiny_base_dir / "base_checkpoints" / "d2"}
    out = tmp_path / "eval_results"
    assert ev.main([a.format(**names) for a in argv] + ["--out_dir", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith(message.format(**names))
    assert not out.exists()


def test_cli_flags_come_from_eval_settings():
    parser = ev.build_arg_parser()
    assert settings_from_namespace(ev.EvalSettings, parser.parse_args([])) == ev.EvalSettings()
    assert parser.parse_args(["--scoring", "choice"]).scoring == "choice"
    assert ev.EvalSettings().scoring == "auto" and ev.EvalSettings().answer_format == "auto"
    assert parser.parse_args(["--no_generate"]).generate is False
    assert parser.parse_args(["--generate", "false"]).generate is False
    assert parser.parse_args(["--limit", "none"]).limit is None and parser.parse_args(["--limit", "7"]).limit == 7
    assert parser.parse_args([]).device == "auto"
    for flag, bad in (("--split", "dev"), ("--scoring", "words"), ("--answer_format", "x"), ("--prompt_style", "x")):
        with pytest.raises(SystemExit):
            parser.parse_args([flag, bad])


def test_evaluate_refuses_choice_scoring_with_the_nanochat_prompt():
    with pytest.raises(EvaluationError, match="prompt_style sciassist"):
        ev.evaluate(ev.EvalSettings(finetuned="x", scoring="choice", prompt_style="nanochat"))
    with pytest.raises(EvaluationError, match="--constrain_answers keeps the reply on the SciAssist answer lines"):
        ev.evaluate(ev.EvalSettings(finetuned="x", constrain_answers=True, prompt_style="nanochat"))


def test_run_options_resolve_auto_without_touching_the_settings():
    settings = ev.EvalSettings(num_samples=2, max_new_tokens=8, sample_max_tokens=8)
    options = ev.run_options(settings, [record("1", 0), record("2", 1), record("3", 2)])
    assert (options.answer_format, options.scoring) == ("letter_first", "letter")
    assert options.sample_indices == ()  # the main generation is as long: its replies are reused
    assert (settings.answer_format, settings.scoring) == ("auto", "auto")
    assert ev.run_options(ev.EvalSettings(num_samples=2), [record("1", 0)]).sample_indices == (0,)


@pytest.mark.slow
def test_evaluate_after_training_as_training_calls_it(tiny_base_dir, tmp_path):
    # in memory, the base found from the run's meta, the data from the prepared data dir
    from nanochat.checkpoint import load_model
    from sciassist.data.prepare import prepare
    run = finetuned_dir_from(tiny_base_dir, tmp_path)
    data_dir = tmp_path / "data"
    prepare("sample", data_dir, sizes={"train": "all", "val": "all", "test": "all"})
    model, tokenizer, _ = load_model(run, device="cpu")
    summary = ev.evaluate_after_training(run, device=None, data_path=None, data_dir=str(data_dir), limit=5,
                                         model=model, tokenizer=tokenizer, prompt_style="nanochat",
                                         max_new_tokens=3, num_samples=1, sample_max_tokens=3)
    out = run / "eval"
    for name in EXPECTED_FILES:
        assert (out / name).is_file(), name
    assert summary["data"]["count"] == 5 and summary["data"]["source"] == str(data_dir / "scienceqa_val.jsonl")
    assert summary["settings"]["prompt_style"] == "nanochat"
    assert summary["models"]["finetuned"]["step"] == 10
    assert summary["models"]["base"]["checkpoint_dir"] == str(tiny_base_dir / "base_checkpoints" / "d2")
    assert summary["table"]["majority_source"] == str(data_dir / "scienceqa_train.jsonl")
    base = read_results_file(out / "predictions_base.json")
    assert read_results_file(out / "predictions_finetuned.json")["results"] == base["results"]


@pytest.mark.slow
def test_evaluate_text_first_file_end_to_end(tiny_base_dir, tmp_path):
    from sciassist.data.prepare import prepare
    from sciassist.data.scienceqa import FormatOptions
    run = finetuned_dir_from(tiny_base_dir, tmp_path)
    prepare("sample", tmp_path / "data", sizes={"val": "all"}, splits=("val",),
            options=FormatOptions(answer_format="text_first"))
    out = tmp_path / "out"
    summary = ev.evaluate(ev.EvalSettings(finetuned=str(run), data_path=str(tmp_path / "data" / "scienceqa_val.jsonl"),
                                          limit=4, max_new_tokens=4, num_samples=1, sample_max_tokens=4,
                                          out_dir=str(out), device="cpu", constrain_answers=True))
    assert summary["settings"]["answer_format"] == "text_first" and summary["settings"]["scoring"] == "choice"
    constrained = summary["constrained"]["finetuned"]
    assert constrained["invalid"] == 0 and constrained["count"] == 4  # always one of the answer lines
    per_question = [json.loads(line) for line in (out / "per_question_finetuned.jsonl").read_text().splitlines()]
    row = next(r for r in summary["table"]["rows"] if r["name"] == "finetuned (constrained)")
    assert row["cells"]["Avg"]["count"] == 4
    assert constrained["accuracy"] == row["cells"]["Avg"]["correct"] / 4
    assert constrained["accuracy"] == sum(q["constrained_correct"] for q in per_question) / 4
    assert all(q["constrained_correct"] == (q["constrained_prediction"] == q["gold"]) for q in per_question)
    info = summary["models"]["finetuned"]
    assert (info["answer_prefix_matches"], info["answer_prefix_checked"]) == (4, 4)
    report = (out / "report.md").read_text()
    assert "CHOICE scoring" in report and "answer format text_first" in report
    assert "agreement with choice scoring" in report
    generation = summary["generation"]["finetuned"]
    assert 0 <= generation["letter_matches_text"] <= generation["names_an_option"] <= 4
    assert "replies name an option's text" in report
    assert "finetuned, constrained answer line | 4 (100.0%) | 0 |" in report
    with pytest.raises(EvaluationError, match="use --scoring choice"):
        ev.evaluate(ev.EvalSettings(finetuned=str(run), data_path=str(tmp_path / "data" / "scienceqa_val.jsonl"),
                                    scoring="letter", out_dir=str(out), device="cpu"))


def test_newest_run_against_its_source_model_as_make_evaluate_asks(tiny_base_dir, tmp_path, monkeypatch):
    root = tmp_path / "finetuned_model_checkpoint"
    root.mkdir()
    run = finetuned_dir_from(tiny_base_dir, root)
    monkeypatch.chdir(tmp_path)  # the default finetuned_dir is relative, as for a user in the repository
    named = ev.named_models(ev.EvalSettings(finetuned="newest", base="source"))
    assert named.finetuned == "finetuned_model_checkpoint/run"
    assert named.base == str(tiny_base_dir / "base_checkpoints" / "d2" / "model_000000.pt")
    assert ev.named_models(ev.EvalSettings(finetuned=str(run))).base is None  # nothing asked, nothing added
    with pytest.raises(EvaluationError, match="--base source is the model the fine-tuned run started from"):
        ev.named_models(ev.EvalSettings(base="source"))
    meta = json.loads((run / "meta_000010.json").read_text())
    (run / "meta_000010.json").write_text(json.dumps({**meta, "source_model": str(tmp_path / "gone.pt")}))
    with pytest.raises(EvaluationError, match="names no source model that exists here"):
        ev.named_models(ev.EvalSettings(finetuned=str(run), base="source"))
    monkeypatch.chdir(tmp_path / "finetuned_model_checkpoint")
    assert ev.main(["--finetuned", "newest", "--out_dir", str(tmp_path / "o")]) == 2  # no run here


# ----------------------------------------------------------------------------- numbers in range

@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "argument --batch_size: must be >= 1, got 0"),
    (["--batch_size", "-1"], "argument --batch_size: must be >= 1, got -1"),
    (["--max_new_tokens", "-5"], "argument --max_new_tokens: must be >= 1, got -5"),
    (["--num_samples", "-1"], "argument --num_samples: must be >= 0, got -1"),
    (["--sample_max_tokens", "0"], "argument --sample_max_tokens: must be >= 1, got 0"),
    (["--limit", "0"], "argument --limit: must be >= 1, got 0"),
    (["--seed", "-2"], "argument --seed: must be >= 0, got -2"),
])
def test_cli_refuses_numbers_out_of_range_before_anything_runs(tmp_path, argv, message, capsys):
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exit_info:
        ev.main(["--finetuned", "x", "--scienceqa", "sample", "--out_dir", str(out), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_refuses_numbers_out_of_range_for_library_callers(tmp_path):
    out = tmp_path / "o"
    settings = ev.EvalSettings(finetuned="x", scienceqa="sample", batch_size=-1, max_new_tokens=-5, num_samples=-1,
                               out_dir=str(out))
    with pytest.raises(UserError) as error:
        ev.evaluate(settings)
    assert str(error.value) == ("invalid settings: --batch_size must be >= 1, got -1; --max_new_tokens must be >= 1, "
                                "got -5; --num_samples must be >= 0, got -1")
    for bad in ({"batch_size": 0}, {"limit": 0}, {"seed": -1}, {"sample_max_tokens": 0}):
        with pytest.raises(UserError, match=f"--{next(iter(bad))} must be >= "):
            ev.evaluate(ev.EvalSettings(finetuned="x", out_dir=str(out), **bad))
    assert not out.exists()  # nothing written, nothing loaded
    assert ev.build_arg_parser().parse_args(["--skip_bad_records"]).skip_bad_records is True

"""`make demo` in miniature: every stage runs offline on the bundled sample and writes its files."""

import json

import pytest

from sciassist.pipelines.demo import DemoSettings, main, run_demo


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    result = run_demo(DemoSettings(out_dir=str(out), base_steps=3, depth=2, num_epochs=1, eval_limit=6))
    assert sorted(p.name for p in (out / "data").glob("*.jsonl")) == [
        "scienceqa_test.jsonl", "scienceqa_train.jsonl", "scienceqa_val.jsonl"]
    assert list((out / "base" / "base_checkpoints" / "d2").glob("model_*.pt"))
    run_dir = out / "runs" / "demo"
    assert list(run_dir.glob("model_*.pt")) and (run_dir / "loss_curve.png").exists()
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps_done"] == 5  # 40 questions / 8 per step
    for name in ("report.md", "table.md", "accuracy_by_category.png", "samples.md", "predictions_finetuned.json"):
        assert (out / "eval" / name).exists(), name
    predictions = json.loads((out / "eval" / "predictions_finetuned.json").read_text())
    assert predictions["count"] == 6 and 0 <= predictions["correct"] <= 6
    assert result["minutes"] > 0
    printed = capsys.readouterr().out
    assert "Demo finished" in printed
    last = printed.rstrip().splitlines()[-3:]  # the closing words say what the numbers are and are not
    assert last[0] == ("These numbers come from the bundled toy sample (66 questions in all): 40 training questions, "
                       "6 evaluated, on a tiny base trained for seconds. They show that every stage runs, not how good "
                       "a model gets.")
    assert "the generated rows can be 0.00 while scored accuracy" in last[1]
    assert last[2].startswith("For real numbers: make recipe-cpu SCIENCEQA=DIR")


def test_demo_reports_a_bad_source_without_a_traceback(tmp_path, capsys):
    assert main(["--scienceqa", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err

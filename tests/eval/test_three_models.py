"""Base -> fine-tuned -> RL on the same questions: three accuracy rows, the paired differences
of every comparison (report, results.json, the benchmark tables), the plots, and what
`source` names along the chain."""

import json

import pytest

from sciassist.eval import run as ev
from sciassist.eval import transfer
from sciassist.eval.explain import paired_explanations
from sciassist.eval.questions import EvaluationError
from sciassist.eval.report import read_results_file
from sciassist.eval.table import paired_change, paired_summary
from tests.conftest import nontrivial_gpt
from tests.eval.stubs import finetuned_dir_from, rl_dir_from
from tests.eval.test_benchmarks import write_root

COMPARED = ["finetuned_vs_base", "rl_vs_finetuned", "rl_vs_base"]


@pytest.fixture
def runs(tiny_base_dir, tiny_tokenizer, tmp_path):
    """(base dir, fine-tune run, RL run): the fine-tune has the base's weights; the RL model
    its own (random blocks), so that its answers differ."""
    finetuned = finetuned_dir_from(tiny_base_dir, tmp_path)
    rl = rl_dir_from(finetuned, tmp_path, nontrivial_gpt(tiny_tokenizer.get_vocab_size(), seed=7,
                                                         projection_std=0.5, lm_head_std=1.0))
    return tiny_base_dir / "base_checkpoints" / "d2", finetuned, rl


def test_paired_summary_values_of_every_comparison():
    records = [{"meta": {"answer": a, "choices": ["x", "y", "z"]}} for a in (0, 1, 2, 0)]
    runs = {"base": {"prediction": [1, 1, 1, 1], "generated_prediction": [None, 1, None, 1]},
            "finetuned": {"prediction": [0, 1, 1, 1], "generated_prediction": [0, 1, None, None]},
            "rl": {"prediction": [0, 1, 2, 0], "generated_prediction": [0, 1, 2, 0]}}
    paired = paired_summary(records, runs)
    assert list(paired) == ["scored", "generated", "invalid"]  # no constrained answers: no row
    assert paired["scored"]["values"] == {"base": 25.0, "finetuned": 50.0, "rl": 100.0}
    assert list(paired["scored"]["changes"]) == COMPARED
    assert paired["scored"]["changes"]["rl_vs_finetuned"] == paired_change([1, 1, 0, 0], [1, 1, 1, 1])
    assert paired["scored"]["changes"]["rl_vs_base"]["difference"] == 75.0
    assert paired["generated"]["values"] == {"base": 25.0, "finetuned": 50.0, "rl": 100.0}
    assert paired["invalid"]["values"] == {"base": 50.0, "finetuned": 50.0, "rl": 0.0}
    invalid = paired["invalid"]["changes"]["rl_vs_finetuned"]
    assert (invalid["difference"], invalid["improved"], invalid["worsened"]) == (-50.0, 0, 2)
    # two models: the one comparison they make
    assert list(paired_summary(records, {k: runs[k] for k in ("base", "rl")})["scored"]["changes"]) == ["rl_vs_base"]


def test_paired_explanations_on_the_questions_every_model_has():
    def rows(*bleu1):
        return [{"bleu1": b, "bleu4": 0.0, "rouge_l": None, "similarity": None} for b in bleu1]
    paired = paired_explanations({"base": rows(0.2, 0.4, None), "finetuned": rows(0.3, 0.5, 0.9),
                                  "rl": rows(0.5, 0.5, 0.1)})
    assert list(paired) == ["explanation_bleu1", "explanation_bleu4"]  # ROUGE-L and similarity: no values
    bleu1 = paired["explanation_bleu1"]
    assert bleu1["count"] == 2  # the third question has no value for base
    assert bleu1["values"] == pytest.approx({"base": 30.0, "finetuned": 40.0, "rl": 50.0})
    assert list(bleu1["changes"]) == COMPARED
    change = bleu1["changes"]["rl_vs_finetuned"]
    assert change["difference"] == pytest.approx(10.0) and (change["improved"], change["worsened"]) == (1, 0)
    assert paired["explanation_bleu4"]["changes"]["rl_vs_base"]["difference"] == 0


def test_benchmark_summary_and_tables_with_three_models():
    records = [{"meta": {"answer": a, "choices": c}} for a, c in
               ((0, ["a", "bbb", "cc"]), (1, ["aaa", "b"]), (2, ["aa", "bb", "c", "dddd"]), (0, ["x", "yy"]))]
    runs = {"base": {"letter": [0, 0, 0, 1], "generated": [0, None, None, 1], "timing_s": 1.0, "headline": "letter"},
            "finetuned": {"letter": [0, 1, 0, 1], "generated": [0, 1, 2, None], "timing_s": 2.0,
                          "headline": "letter"},
            "rl": {"letter": [0, 1, 2, 0], "generated": [0, 1, 2, 0], "timing_s": 3.0, "headline": "letter"}}
    s = transfer.benchmark_summary({"benchmark": "x", "title": "X", "kind": "transfer", "split": "validation"},
                                   records, runs)
    assert s["models"]["rl"]["letter"]["accuracy"] == 100 and s["models"]["rl"]["generated"]["invalid"] == 0
    assert s["change"]["letter"]["difference"] == 25  # fine-tuned - base, as with two models
    assert list(s["changes"]) == COMPARED
    assert s["changes"]["finetuned_vs_base"] == s["change"]
    assert s["changes"]["rl_vs_finetuned"]["letter"]["difference"] == 50
    assert s["changes"]["rl_vs_base"]["letter"]["difference"] == 75
    assert s["changes"]["rl_vs_base"]["letter"]["improved"] == 3
    lines = transfer.benchmarks_markdown([s])
    header = next(line for line in lines if line.startswith("| | benchmark |"))
    assert ("| base | fine-tuned | RL | fine-tuned - base | RL - fine-tuned | RL - base | "
            "invalid replies (base / fine-tuned / RL) |") in header
    row = next(line for line in lines if line.startswith("| transfer | X | validation | 4 | letter |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[6].startswith("25.0 [") and cells[8].startswith("100.0 [")
    assert cells[10] == transfer.change_cell(s["changes"]["rl_vs_finetuned"]["letter"])
    assert cells[11].startswith("+75.0 [") and cells[11].endswith(" better")
    assert cells[12] == "50.0 / 25.0 / 0.0"
    assert any(line.startswith("| X | greedy reply | ") for line in lines)
    # without RL, the two-model layout is unchanged
    two = transfer.benchmark_summary({"benchmark": "x", "title": "X", "kind": "transfer", "split": "validation"},
                                     records, {k: runs[k] for k in ("base", "finetuned")})
    assert "changes" not in two
    assert any("| base | fine-tuned | change | verdict |" in line for line in transfer.benchmarks_markdown([two]))


@pytest.mark.slow
def test_base_finetuned_rl_end_to_end_with_benchmarks(runs, tmp_path, capsys, one_thread):
    base, finetuned, rl = runs
    out = tmp_path / "out"
    code = ev.main(["--base", str(base), "--finetuned", str(finetuned), "--rl", str(rl), "--scienceqa", "sample",
                    "--limit", "6", "--max_new_tokens", "6", "--num_samples", "1", "--device", "cpu",
                    "--benchmarks", "arc_easy,sciq", "--benchmark_dir", str(write_root(tmp_path / "bench")),
                    "--out_dir", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert [line.split()[0] for line in printed.splitlines() if line.split()[:1] in (["base"], ["finetuned"],
                                                                                     ["rl"])] == [
        "base", "finetuned", "rl", "base", "finetuned", "rl"]  # scored rows, then generated ones
    for name in ("rl", "base", "finetuned"):
        assert read_results_file(out / f"predictions_{name}.json")["count"] == 6
        assert (out / f"per_question_{name}.jsonl").is_file() and (out / f"predictions_{name}_generated.json").is_file()

    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["rl"] == str(rl)
    assert list(summary["models"]) == ["base", "finetuned", "rl"]
    assert summary["models"]["rl"]["step"] == 5 and summary["models"]["rl"]["meta"]["source_model"] == str(
        finetuned / "model_000010.pt")
    assert set(summary["generation"]) == set(summary["timing"]) == {"base", "finetuned", "rl"}
    avg = {row["name"]: row["cells"]["Avg"] for row in summary["table"]["rows"]}
    assert {"base", "finetuned", "rl", "rl (generated)"} <= set(avg)
    assert read_results_file(out / "predictions_rl.json")["correct"] == avg["rl"]["correct"]
    paired = summary["paired"]
    assert list(paired) == ["scored", "generated", "invalid"]
    for metric in paired:
        assert list(paired[metric]["changes"]) == COMPARED
    scored = paired["scored"]
    assert scored["values"] == {name: avg[name]["accuracy"] for name in ("base", "finetuned", "rl")}
    rl_vs_ft = scored["changes"]["rl_vs_finetuned"]
    assert rl_vs_ft["difference"] == pytest.approx(avg["rl"]["accuracy"] - avg["finetuned"]["accuracy"])
    assert rl_vs_ft["improved"] - rl_vs_ft["worsened"] == avg["rl"]["correct"] - avg["finetuned"]["correct"]
    assert rl_vs_ft["ci95"][0] <= rl_vs_ft["difference"] <= rl_vs_ft["ci95"][1]
    # the fine-tune has the base's weights: no change, within noise
    same = scored["changes"]["finetuned_vs_base"]
    assert same["difference"] == 0 and not same["beyond_noise"]
    assert scored["changes"]["rl_vs_base"]["difference"] == pytest.approx(rl_vs_ft["difference"])

    report = (out / "report.md").read_text()
    section = report[report.index("## Paired differences"):report.index("## Beyond ScienceQA")]
    assert "| metric | base | fine-tuned | RL | fine-tuned - base | RL - fine-tuned | RL - base |" in section
    row = next(line for line in section.splitlines() if line.startswith("| letter scoring accuracy |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3] == f"{avg['rl']['accuracy']:.2f}"
    assert cells[5] == transfer.change_cell(rl_vs_ft)
    assert "| invalid replies |" in section and "| greedy reply accuracy |" in section

    benchmarks = summary["benchmarks"]
    assert [b["benchmark"] for b in benchmarks] == ["scienceqa", "arc_easy", "sciq"]
    for b in benchmarks:
        assert list(b["models"]) == ["base", "finetuned", "rl"] and list(b["changes"]) == COMPARED
        assert b["changes"]["finetuned_vs_base"] == b["change"]
        assert set(transfer.RULES) - {"letter"} <= set(b["changes"]["rl_vs_finetuned"]) or b["kind"] == "scienceqa"
    assert benchmarks[0]["changes"]["rl_vs_finetuned"]["letter"] == rl_vs_ft
    table = report[report.index("## Beyond ScienceQA"):]
    assert "| base | fine-tuned | RL | fine-tuned - base | RL - fine-tuned | RL - base |" in table
    arc = next(line for line in table.splitlines() if line.startswith("| transfer | ARC-Easy |"))
    assert len(arc.split("|")) - 2 == 13  # kind .. chance, three models, three changes, invalid replies
    assert "| rl |" in (out / "samples.md").read_text().replace("| base | finetuned | rl |", "| rl |")
    for picture in ("accuracy_by_category.png", "benchmarks.png"):
        assert (out / picture).stat().st_size > 1000


def test_source_follows_the_chain_from_the_rl_run(runs, tmp_path):
    base, finetuned, rl = runs
    named = ev.named_models(ev.EvalSettings(rl=str(rl), finetuned="source", base="source"))
    assert named.finetuned == str(finetuned / "model_000010.pt")  # where the RL run started
    assert named.base == str(base / "model_000000.pt")  # where that fine-tune started
    assert named.rl == str(rl)
    # without --finetuned, --base source is where the RL run started: base -> RL
    assert ev.named_models(ev.EvalSettings(rl=str(rl), base="source")).base == str(finetuned / "model_000010.pt")
    # with two models nothing changes: --base source is the fine-tune's start
    assert ev.named_models(ev.EvalSettings(finetuned=str(finetuned), base="source")).base == str(
        base / "model_000000.pt")
    with pytest.raises(EvaluationError, match="--finetuned source is the model the RL run started from: give --rl"):
        ev.named_models(ev.EvalSettings(finetuned="source", base="source"))
    with pytest.raises(EvaluationError, match="--rl source: source names the model a run started from"):
        ev.named_models(ev.EvalSettings(rl="source"))
    meta = json.loads((rl / "meta_000005.json").read_text())
    (rl / "meta_000005.json").write_text(json.dumps({**meta, "source_model": str(tmp_path / "gone.pt")}))
    with pytest.raises(EvaluationError, match="--finetuned source: .*names no source model that exists here"):
        ev.named_models(ev.EvalSettings(rl=str(rl), finetuned="source"))


@pytest.mark.slow
def test_rl_and_its_source_from_the_command_line(runs, tmp_path, capsys, one_thread):
    """--rl DIR --finetuned source: the fine-tune's loss curve comes from the run folder of
    the checkpoint the RL run started from; --explain's metrics get their paired differences."""
    _, finetuned, rl = runs
    out = tmp_path / "out"
    assert ev.main(["--rl", str(rl), "--finetuned", "source", "--scienceqa", "sample", "--limit", "3",
                    "--no_generate", "--num_samples", "0", "--explain", "2", "--explain_max_tokens", "6",
                    "--similarity_model", str(tmp_path / "no_such_model"), "--device", "cpu",
                    "--out_dir", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["models"]) == ["finetuned", "rl"]
    assert summary["models"]["finetuned"]["checkpoint_dir"] == str(finetuned)
    assert list(summary["paired"]["scored"]["changes"]) == ["rl_vs_finetuned"]
    assert summary["loss_curve"]["sources"] == [str(finetuned / "metrics.jsonl")]
    assert set(summary["explanations"]) == {"finetuned", "rl"}
    bleu1 = summary["paired"]["explanation_bleu1"]
    assert bleu1["count"] == 2 and "explanation_similarity" not in summary["paired"]  # no similarity model
    assert bleu1["values"]["rl"] == pytest.approx(100 * summary["explanations"]["rl"]["bleu1"])
    assert bleu1["changes"]["rl_vs_finetuned"]["difference"] == pytest.approx(
        100 * (summary["explanations"]["rl"]["bleu1"] - summary["explanations"]["finetuned"]["bleu1"]))
    assert "| explanation BLEU-1 (x100, 2 questions) |" in (out / "report.md").read_text()


def test_a_bad_rl_spec_is_one_error_line_and_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "o"
    assert ev.main(["--rl", str(tmp_path / "missing_rl"), "--scienceqa", "sample", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no such folder: {tmp_path / 'missing_rl'}") and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert ev.main(["--rl", "source", "--out_dir", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: --rl source: source names the model a run started from")

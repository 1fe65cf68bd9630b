import json
import random

import pytest

from sciassist.data.conversations import read_conversations
from sciassist.data.scienceqa import FormatOptions, load_scienceqa
from sciassist.pipelines import presets, recipes


def raw_question(pid="1", choices=("cat", "dog", "fish"), answer=1):
    return {"pid": pid, "split": "train", "question": "Which is a mammal?", "choices": list(choices),
            "answer": answer, "hint": "", "has_image": False, "caption": None, "solution": "Dogs are mammals.",
            "lecture": "Mammals have fur."}


def test_get_recipe_merges_dict_fields_and_rejects_unknown_names():
    recipe = presets.get_recipe("cpu", train={"num_iterations": 7}, shuffled_copies=1)
    assert recipe.train["num_iterations"] == 7
    assert recipe.train["matrix_lr"] == presets.CPU.train["matrix_lr"]  # the other keys stay
    assert recipe.shuffled_copies == 1 and presets.CPU.shuffled_copies == 7  # the preset is untouched
    with pytest.raises(recipes.RecipeError, match="unknown recipe 'nope'"):
        presets.get_recipe("nope")
    with pytest.raises(recipes.RecipeError, match="unknown recipe field"):
        presets.get_recipe("cpu", epochs=3)
    assert presets.RECIPES["gpu"].tested is False


def test_shuffled_copy_moves_the_answer_with_its_option():
    rng = random.Random(0)
    record = raw_question(choices=("a", "b", "c", "d", "e"), answer=3)
    seen = set()
    for _ in range(30):
        copy = recipes.shuffled_copy(record, rng)
        assert sorted(copy["choices"]) == sorted(record["choices"])
        assert copy["choices"][copy["answer"]] == "d"
        seen.add(tuple(copy["choices"]))
    assert len(seen) > 5
    assert record["choices"] == ["a", "b", "c", "d", "e"]  # the input is not modified


def test_training_records_answer_only_with_copies():
    options = FormatOptions(**presets.CPU.data)
    raw = [raw_question("1"), raw_question("2", answer=0), {**raw_question("3"), "question": None}]
    records, skipped = recipes.training_records(raw, options, shuffled_copies=2, seed=1)
    assert skipped == 1 and len(records) == 6
    first = records[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant"]  # no system prompt
    assert first[1]["content"] == "The correct answer is dog (B)."  # answer line only, the option first
    for record in records:
        meta = record["meta"]
        assert record["messages"][-1]["content"] == \
            f"The correct answer is {meta['choices'][meta['answer']]} ({meta['answer_letter']})."


def test_headline_reads_an_evaluation_summary():
    result = {"data": {"count": 4},
              "table": {"rows": [{"name": "finetuned", "cells": {"Avg": {"accuracy": 75.0}}}]},
              "generation": {"finetuned": {"count": 4, "invalid": 1, "accuracy": 0.5, "agreement": 0.75}},
              "settings": {"out_dir": "x", "scoring": "choice"}}
    row = recipes.headline(result)
    assert row == {"count": 4, "scoring": "choice", "accuracy": 0.75, "choice_acc": 0.75, "generated_acc": 0.5,
                   "agreement": 0.75, "invalid": 0.25, "constrained_acc": None, "constrained_agreement": None,
                   "out_dir": "x"}
    result["constrained"] = {"finetuned": {"count": 4, "invalid": 0, "accuracy": 0.75, "agreement": 1.0}}
    row = recipes.headline(result)
    assert (row["constrained_acc"], row["constrained_agreement"]) == (0.75, 1.0)


def test_prepare_recipe_data_keeps_selection_and_sft_val_apart(tmp_path, scienceqa_dir):
    recipe = presets.get_recipe("cpu", eval_limit=50, sft_val_size=20, shuffled_copies=0)
    paths, counts = recipes.prepare_recipe_data(recipe, scienceqa_dir, tmp_path, splits=("val",))
    eval_pids = {r["meta"]["pid"] for r in read_conversations(paths["eval_val"])}
    sft_pids = {r["meta"]["pid"] for r in read_conversations(paths["sft_val"])}
    train_pids = {r["meta"]["pid"] for r in read_conversations(paths["train"])}
    assert len(eval_pids) == 50 and len(sft_pids) == 20
    assert not eval_pids & sft_pids and not (eval_pids | sft_pids) & train_pids
    assert counts["train"] == 12352 and "eval_test" not in paths  # test is written only when asked


def test_run_recipe_in_miniature(tmp_path, sample_dir):
    out = tmp_path / "run"
    summary = recipes.run_recipe(
        "cpu", str(sample_dir), out, evaluate_split="val",
        tiny=dict(vocab_size=320, n_embd=32, n_head=2, sequence_len=128, device_batch_size=2, steps=2, val_rows=2),
        train=dict(num_iterations=2, max_seq_len=128, pack_len=128, device_batch_size=4,
                   target_examples_per_step=4, eval_every=0, eval_steps=1),
        shuffled_copies=1, eval_limit=6, sft_val_size=4, eval_max_new_tokens=8)
    assert summary["finetune"]["status"] == "completed" and summary["finetune"]["steps_done"] == 2
    for name in ("recipe_summary.json", "data/scienceqa_train.jsonl", "data/eval_val.jsonl", "base/tiny_base.json",
                 "sft/cpu/model_000002.pt", "eval_val/table.md", "eval_val/results.json"):
        assert (out / name).is_file(), name
    assert not (out / "data" / "eval_test.jsonl").exists()
    assert not (out / "eval_val_choice").exists()  # text_first answers: choice scoring is the headline already
    meta = json.loads(next((out / "sft" / "cpu").glob("meta_*.json")).read_text())
    assert meta["answer_format"] == "text_first"  # the chat page scores this model's answers by option
    val = summary["evaluation"]["val"]
    assert val["count"] == summary["counts"]["eval_val"] > 0
    assert val["scoring"] == "choice" and val["accuracy"] == val["choice_acc"]
    for key in ("accuracy", "generated_acc", "agreement", "invalid", "constrained_acc", "constrained_agreement"):
        assert 0.0 <= val[key] <= 1.0
    assert 0 <= val["letter_matches_text"] <= val["names_an_option"] <= val["count"]
    assert summary["counts"]["train"] == 2 * (len(load_scienceqa(str(sample_dir), "train"))
                                              - summary["counts"]["train_skipped"])
    assert 0 < summary["minutes"] < 5
    # the one test number of a finished run, without training again
    overrides = dict(tiny=summary["recipe"]["tiny"], train=summary["recipe"]["train"], shuffled_copies=1,
                     eval_limit=6, sft_val_size=4, eval_max_new_tokens=8)
    tested = recipes.run_recipe("cpu", str(sample_dir), out, evaluate_split="test", evaluate_only=True, **overrides)
    assert set(tested["evaluation"]) == {"val", "test"} and tested["evaluation"]["val"] == val
    assert tested["evaluation"]["test"]["count"] == tested["counts"]["eval_test"] > 0
    assert json.loads((out / "recipe_summary.json").read_text())["evaluation"]["test"] == tested["evaluation"]["test"]
    with pytest.raises(recipes.RecipeError, match="other recipe settings"):
        recipes.run_recipe("cpu", str(sample_dir), out, evaluate_split="test", evaluate_only=True,
                           **{**overrides, "shuffled_copies": 2})
    with pytest.raises(recipes.RecipeError, match="no finished recipe run"):
        recipes.run_recipe("cpu", str(sample_dir), tmp_path / "none", evaluate_split="test", evaluate_only=True)
    # a letter_first recipe is scored by letter, and by choice on the side
    letter = recipes.run_recipe(
        "cpu", str(sample_dir), tmp_path / "letter", evaluate_split="val", base_dir=out / "base",
        tiny=summary["recipe"]["tiny"], data=dict(answer_format="letter_first"),
        train=dict(num_iterations=1, max_seq_len=128, pack_len=128, device_batch_size=4,
                   target_examples_per_step=4, eval_every=0, eval_steps=1),
        shuffled_copies=0, eval_limit=6, sft_val_size=4, eval_max_new_tokens=8)
    val = letter["evaluation"]["val"]
    assert letter["base_reused"] and val["scoring"] == "letter" and 0.0 <= val["choice_acc"] <= 1.0
    assert (tmp_path / "letter" / "eval_val_choice" / "table.md").is_file()
    # a second run with the same base settings reuses the base
    again, reused = recipes.build_base(presets.get_recipe("cpu", tiny=summary["recipe"]["tiny"]), str(sample_dir),
                                       out / "base")
    assert reused and again["step"] == 2


def test_main_reports_a_bad_source(tmp_path, capsys):
    import torch
    threads = str(torch.get_num_threads())  # main sets the thread count; keep the session's
    assert recipes.main(["--scienceqa", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "o"),
                         "--threads", threads]) == 2
    assert "missing" in capsys.readouterr().err


MINIATURE = dict(
    tiny=dict(vocab_size=320, n_embd=32, n_head=2, sequence_len=128, device_batch_size=2, steps=3, val_rows=2),
    train=dict(num_iterations=3, max_seq_len=128, pack_len=128, device_batch_size=4, target_examples_per_step=4,
               eval_every=0, eval_steps=1),
    shuffled_copies=1, eval_limit=6, sft_val_size=4, eval_max_new_tokens=8)


def test_every_recipe_is_budgeted_in_steps():
    # a time limit would make the trained model depend on the machine's speed
    for recipe in presets.RECIPES.values():
        assert isinstance(recipe.tiny.get("steps"), int) and "max_minutes" not in recipe.tiny, recipe.name
        assert isinstance(recipe.train.get("num_iterations"), int), recipe.name
        assert not any("minutes" in key for key in recipe.train), recipe.name


def test_the_same_recipe_gives_bit_identical_models(tmp_path, sample_dir, one_thread):
    import torch

    from nanochat.checkpoint import load_model, load_model_from
    runs = [recipes.run_recipe("cpu", str(sample_dir), tmp_path / name, evaluate_split=None, **MINIATURE)
            for name in ("a", "b")]
    assert runs[0]["finetune"]["steps_done"] == runs[1]["finetune"]["steps_done"] == 3
    assert runs[0]["finetune"]["time_limited"] is False
    for load in (lambda d: load_model_from(d / "base", "base", device="cpu")[0],
                 lambda d: load_model(d / "sft" / "cpu", device="cpu")[0]):
        a, b = (load(tmp_path / name).state_dict() for name in ("a", "b"))
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [(tmp_path / name / "sft" / "cpu" / "metrics.jsonl").read_text().splitlines() for name in ("a", "b")]
    losses = [[json.loads(line).get("train_loss") for line in m] for m in metrics]
    assert losses[0] == losses[1] and any(value is not None for value in losses[0])


def test_a_time_limit_is_opt_in_and_stated(tmp_path, sample_dir, one_thread, capsys):
    summary = recipes.run_recipe("cpu", str(sample_dir), tmp_path / "cut", evaluate_split=None, max_minutes=1e-9,
                                 **{**MINIATURE, "train": {**MINIATURE["train"], "num_iterations": 50}})
    assert summary["finetune"]["time_limited"] is True
    assert summary["finetune"]["steps_done"] < summary["finetune"]["num_steps"] == 50
    assert "is not the cpu recipe's model" in capsys.readouterr().err
    with pytest.raises(recipes.RecipeError, match="max_minutes must be positive"):
        recipes.run_recipe("cpu", str(sample_dir), tmp_path / "x", max_minutes=0, **MINIATURE)


def test_the_tutor_recipe_judges_explanations_beside_its_base(tmp_path, sample_dir, one_thread):
    summary = recipes.run_recipe("cpu-tutor", str(sample_dir), tmp_path / "tutor", evaluate_split="val",
                                 explain=2, **MINIATURE)
    train = read_conversations(tmp_path / "tutor" / "data" / "scienceqa_train.jsonl")
    assert any("\n\nExplanation: " in r["messages"][-1]["content"] for r in train)
    val = summary["evaluation"]["val"]
    assert set(val["explanations"]) == {"base", "finetuned"}
    for metrics in val["explanations"].values():
        assert metrics["count"] == 2 and 0.0 <= metrics["bleu1"] <= 1.0
    results = json.loads((tmp_path / "tutor" / "eval_val" / "results.json").read_text())
    assert results["models"]["base"]["checkpoint_dir"].endswith("d3")
    assert results["explanations_info"]["questions"] == 2


def test_the_fine_tune_time_is_estimated_from_its_first_steps(monkeypatch, capsys):
    from sciassist.pipelines import recipes
    clock = iter([100.0 + 0.5 * k for k in range(30)])  # step 1 at 100 s, then 0.5 s per step
    monkeypatch.setattr(recipes.time, "time", lambda: next(clock))
    limit = recipes.TimeLimit(None, started=40.0, num_steps=4000)
    for step in range(1, 23):
        limit.check({"step": step, "train_loss": 1.0})
        if step == 5:
            limit.check({"step": step, "val_loss": 1.0})  # a validation record is not a step
    out = capsys.readouterr().out
    assert out == ("fine-tune: 0.50 s/step over steps 2-21 -> about 33 min for the other 3,979 steps; the recipe "
                   "will have taken about 34 min before its evaluation\n")
    assert not limit.reached


def test_a_recipe_with_an_rl_stage_evaluates_fine_tuned_and_rl_on_the_same_questions(tmp_path, sample_dir,
                                                                                       one_thread, capsys):
    stage = dict(num_steps=2, questions_per_step=2, samples_per_question=2, max_new_tokens=8, eval_questions=2,
                 val_questions=0, eval_every=0, generation_batch_size=4)
    out = tmp_path / "run"
    recipes.run_recipe("cpu", str(sample_dir), out, evaluate_split=None, **MINIATURE)
    capsys.readouterr()
    # cpu-rl is the CPU recipe and a stage: in a CPU recipe's folder it trains only the stage
    summary = recipes.run_recipe("cpu-rl", str(sample_dir), out, evaluate_split="val", **MINIATURE, rl=stage)
    assert "already holds this recipe's completed fine-tune" in capsys.readouterr().out
    assert not (out / "sft" / "cpu-rl").exists()
    rl = summary["rl"]
    assert rl["status"] == "completed" and rl["steps_done"] == 2
    assert rl["run_dir"] == str(out / "rl" / "cpu-rl")
    settings = json.loads((out / "rl" / "cpu-rl" / "run_summary.json").read_text())["settings"]
    # practises on the training questions, validates on the fine-tune's validation questions
    assert settings["data_path"] == str(out / "data" / "scienceqa_train.jsonl")
    assert settings["val_path"] == str(out / "data" / "sft_val.jsonl")
    assert settings["checkpoint"] == str(out / "sft" / "cpu")
    val = summary["evaluation"]["val"]
    assert val["rl"]["count"] == val["count"] == summary["counts"]["eval_val"]
    assert 0.0 <= val["rl"]["accuracy"] <= 1.0 and 0.0 <= val["rl"]["invalid"] <= 1.0
    changes = val["paired"]["generated"]["changes"]
    assert set(val["paired"]["generated"]["values"]) == {"finetuned", "rl"} and changes
    results = json.loads((out / "eval_val" / "results.json").read_text())
    assert results["settings"]["rl"] == str(out / "rl" / "cpu-rl")
    # a finished run's test number covers both models; another RL stage is another recipe's run
    overrides = {key: summary["recipe"][key] for key in ("tiny", "train", "shuffled_copies", "eval_limit",
                                                         "sft_val_size", "eval_max_new_tokens", "rl")}
    tested = recipes.run_recipe("cpu-rl", str(sample_dir), out, evaluate_split="test", evaluate_only=True,
                                **overrides)
    assert tested["evaluation"]["test"]["rl"]["count"] == tested["counts"]["eval_test"]
    with pytest.raises(recipes.RecipeError, match="other recipe settings"):
        recipes.run_recipe("cpu-rl", str(sample_dir), out, evaluate_split="test", evaluate_only=True,
                           **{**overrides, "rl": {**stage, "num_steps": 3}})


def test_a_completed_fine_tune_of_the_same_settings_is_kept(tmp_path, sample_dir, one_thread, capsys):
    out = tmp_path / "run"
    first = recipes.run_recipe("cpu", str(sample_dir), out, evaluate_split=None, **MINIATURE)
    model = out / "sft" / "cpu" / "model_000003.pt"
    stamp = model.stat().st_mtime_ns
    capsys.readouterr()
    again = recipes.run_recipe("cpu", str(sample_dir), out, evaluate_split=None, **MINIATURE)
    assert "already holds this recipe's completed fine-tune" in capsys.readouterr().out
    assert model.stat().st_mtime_ns == stamp and again["finetune"] == first["finetune"]
    # other fine-tuning settings train again
    recipes.run_recipe("cpu", str(sample_dir), out, evaluate_split=None,
                       **{**MINIATURE, "train": {**MINIATURE["train"], "init_lr_frac": 0.25}})
    assert "already holds" not in capsys.readouterr().out and model.stat().st_mtime_ns != stamp

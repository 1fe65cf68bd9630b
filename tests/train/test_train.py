import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sciassist.train.step as step_module
from nanochat.checkpoint import load_model, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from sciassist.data.batching import arrange_step, step_batches, tokenize_conversations
from sciassist.data.conversations import write_conversations
from sciassist.pipelines.finetune import build_parser, settings_from_args
from sciassist.train.loop import train
from sciassist.train.settings import TrainError, TrainSettings, check_settings
from sciassist.train.setup import load_conversation_sets
from sciassist.train.step import (
    accumulate_gradients,
    defer_interrupt,
    evaluate_loss,
    lr_multiplier,
    peak_flops,
    set_learning_rates,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def arithmetic_conversations(n=40):
    return [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"The correct answer is {a + b}."}]}
            for a in range(10) for b in range(n // 10)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "arith.jsonl"
    write_conversations(path, arithmetic_conversations(40))
    return path


@pytest.fixture(scope="module")
def live_base_dir(tmp_path_factory, tiny_base_dir, tiny_tokenizer):
    """tiny_base_dir's model with non-zero output projections: at nanochat's init they are
    zero, so attention gets no gradient in the first step, which would make comparisons of
    the first updates meaningless."""
    base_dir = tmp_path_factory.mktemp("live_base")
    model, _, meta = load_model(tiny_base_dir / "base_checkpoints" / "d2", device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
    save_checkpoint(base_dir / "base_checkpoints" / "d2", 0, model, {"model_config": meta["model_config"]})
    tiny_tokenizer.save(base_dir / "tokenizer")
    return base_dir


def tiny_settings(base_dir, data_file, out_dir, **overrides):
    # lrs x init_lr_frac 0.02 are what a 64-wide random model needs to learn in a few steps; fp32, so
    # that the figures compared do not depend on whether this CPU computes bf16 natively (auto's choice)
    values = dict(data_path=str(data_file), base_dir=str(base_dir), source="base", out_dir=str(out_dir),
                  output_tag="run", max_seq_len=64, target_examples_per_step=8, device_batch_size=2,
                  num_epochs=1, eval_every=2, eval_steps=2, save_every=0, matrix_lr=0.5, embedding_lr=5.0,
                  unembedding_lr=0.2, device="cpu", dtype="float32")
    values.update(overrides)
    return TrainSettings(**values)


def resume_weights(run_dir):
    state = torch.load(Path(run_dir) / "resume" / "state.pt", weights_only=True)
    return state["model"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- settings and CLI

def test_defaults_reproduce_the_scienceqa_run_and_every_field_is_a_flag():
    s = TrainSettings()
    assert (s.num_epochs, s.device_batch_size, s.target_examples_per_step) == (4, "auto", 64)
    assert (s.unembedding_lr, s.embedding_lr, s.matrix_lr, s.init_lr_frac) == (2e-3, 1e-1, 1e-2, 0.02)
    assert (s.eval_every, s.source, s.data_path, s.out_dir) == (25, "sft", "scienceqa", "finetuned_model_checkpoint")
    help_text = build_parser().format_help()
    for f in dataclasses.fields(TrainSettings):
        assert f"--{f.name}" in help_text
    assert settings_from_args([]) == s
    parsed = settings_from_args(["--compile", "--packing", "false", "--model_step", "650", "--model_tag", "d20",
                                 "--matrix_lr", "0.02", "--val_path", "none"])
    assert parsed.compile is True and parsed.packing is False and parsed.model_step == 650
    assert parsed.model_tag == "d20" and parsed.matrix_lr == 0.02 and parsed.val_path is None


def test_lr_schedule_counts_optimizer_steps():
    assert [lr_multiplier(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [round(lr_multiplier(s, 10, warmup_steps=2), 6) for s in (0, 1, 2)] == [0.5, 0.9, 0.8]


@pytest.mark.usefixtures("sigint_from_a_terminal")
def test_ctrl_c_waits_for_the_end_of_an_optimizer_update():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with defer_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the update ran")
    assert done == ["the rest of the update ran"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert peak_flops(torch.device("cpu")) is None


def test_evaluate_loss_is_per_supervised_token(tiny_tokenizer):
    dataset = tokenize_conversations(tiny_tokenizer, arithmetic_conversations(10), max_seq_len=32)
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                          n_kv_head=2, n_embd=32))
    model.init_weights()
    batches = step_batches(dataset, arrange_step(dataset, range(len(dataset)), 1), 0)
    with torch.no_grad():
        total = sum(model(b["inputs"], b["targets"], loss_reduction="sum", layout=b["layout"],
                          supervised_index=b["supervised_index"]).item()
                    for b in batches)
    expected = total / dataset.total_supervised()
    assert evaluate_loss(model, batches) == pytest.approx(expected, rel=1e-6)
    empty = step_batches(dataset, arrange_step(dataset, [0], 1, world_size=2, rank=1), 0)  # an all-ignored batch
    assert evaluate_loss(model, batches + empty) == pytest.approx(expected, rel=1e-6)
    assert model.training  # evaluation leaves the mode as it found it


@pytest.mark.parametrize("flag, value, expected", [
    ("matrix_lr", -1.0, "--matrix_lr must be a positive number"),
    ("embedding_lr", float("nan"), "--embedding_lr must be a finite number"),
    ("embedding_lr", 0.0, "--embedding_lr must be a positive number <= 100.0, got 0.0"),
    ("num_iterations", 0, "--num_iterations must be -1 (from epochs) or > 0, got 0"),
    ("num_epochs", 0, "--num_epochs must be >= 1 (or --num_iterations > 0), got 0"),
    ("output_tag", "a/b", "--output_tag must be a plain folder name, got 'a/b'"),
    ("source", "chat", "--source must be one of base, mid, sft, rl"),
    ("val_split", 1.5, "--val_split must be a fraction"),
    ("device", "tpu", "--device must be auto, cpu"),
    ("device_batch_size", 0, "--device_batch_size must be between 1 and 1000000, got 0"),
])
def test_bad_settings_name_the_flag(flag, value, expected):
    with pytest.raises(TrainError, match=re.escape(expected)):
        check_settings(TrainSettings(**{flag: value}))


# --- the loss

def test_unsupervised_targets_do_not_change_the_loss(tiny_base_dir, tiny_tokenizer):
    # A trailing user turn comes after every supervised token: its tokens are targets of
    # unsupervised positions only. Changing them must not change the training loss.
    model, _, _ = load_model(tiny_base_dir / "base_checkpoints" / "d2", device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # the zero-initialised output projections would make context irrelevant
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.3)
            block.mlp.c_proj.weight.normal_(0, 0.3)

    def loss_for(trailing):
        records = [{"messages": [{"role": "user", "content": "What is 2 + 3?"},
                                 {"role": "assistant", "content": "The correct answer is 5."},
                                 {"role": "user", "content": trailing}]}]
        ds = tokenize_conversations(tiny_tokenizer, records + arithmetic_conversations(10)[:3], max_seq_len=64)
        plan = arrange_step(ds, range(len(ds)), device_batch_size=1)
        model.zero_grad(set_to_none=True)
        return accumulate_gradients(model, step_batches(ds, plan, 0), plan.num_supervised).item(), plan.num_supervised

    loss_a, supervised_a = loss_for("Thanks!")
    loss_b, supervised_b = loss_for("Which of these states is farthest north? Maine, Texas, Ohio.")
    assert supervised_a == supervised_b
    # equal up to float summation order (the rows differ in width); one wrongly counted
    # target would add about ln(512) = 6 to this sum
    assert loss_a == pytest.approx(loss_b, rel=1e-6)


def _one_step(model, dataset, device_batch_size, packed):
    optimizers = model.setup_optimizers(unembedding_lr=0.2, embedding_lr=5.0, matrix_lr=0.5)
    plan = arrange_step(dataset, range(len(dataset)), device_batch_size, packed=packed)
    batches = step_batches(dataset, plan, 0)
    loss = accumulate_gradients(model, batches, plan.num_supervised)
    grads = [p.grad.clone() for p in model.parameters()]
    set_learning_rates(optimizers, 1.0)
    for opt in optimizers:
        opt.step()
    return len(batches), loss.item(), grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [False, True])
def test_accumulation_4x2_equals_1x8(tiny_tokenizer, packed):
    records = arithmetic_conversations(40)[::5]  # 8 conversations
    dataset = tokenize_conversations(tiny_tokenizer, records, max_seq_len=32)
    results = []
    for device_batch_size in (2, 8) if not packed else (1, 8):
        torch.manual_seed(0)
        model = GPT(GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1, n_head=2,
                              n_kv_head=2, n_embd=32))
        model.init_weights()
        with torch.no_grad():  # zero output projections would leave attention without gradient
            model.transformer.h[0].attn.c_proj.weight.normal_(0, 0.2)
            model.transformer.h[0].mlp.c_proj.weight.normal_(0, 0.2)
        initial = [p.detach().clone() for p in model.parameters()]  # the same for both (same seed)
        results.append(_one_step(model, dataset, device_batch_size, packed))
    (micro_a, loss_a, grads_a, weights_a), (micro_b, loss_b, grads_b, weights_b) = results
    assert micro_a > 1 and micro_b == 1  # 4 micro-batches of 2 (or several packed) vs one of 8
    assert loss_a == pytest.approx(loss_b, rel=1e-6)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)
    # After the optimizer step: Muon orthogonalises in bf16 and AdamW's first step is about
    # lr * sign(g), so float-level gradient differences show up as small update differences;
    # compare the updates by norm (a wrong accumulation changes them by ~100%).
    for wa, wb, w0 in zip(weights_a, weights_b, initial, strict=True):
        update_a, update_b = wa - w0, wb - w0
        assert (update_a - update_b).norm() <= 0.02 * update_a.norm()


# --- whole runs

def test_training_run_outputs(tmp_path, tiny_base_dir, data_file, tiny_tokenizer):
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path, num_epochs=3)
    summary = train(settings)
    run_dir = tmp_path / "run"
    assert summary["status"] == "completed" and summary["num_steps"] == 3 * (36 // 8) == 12
    # the loss falls
    records = read_metrics(run_dir)
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert len(train_losses) == 12 and train_losses[-1] < 0.5 * train_losses[0]
    assert [s for s, _ in val] == [0, 2, 4, 6, 8, 10, 12] and val[-1][1] < 0.5 * val[0][1]
    assert {"lr_multiplier", "positions_per_s", "supervised_tokens_per_s", "mfu", "peak_memory_gb",
            "elapsed_s"} <= set(records[1])
    assert records[1]["mfu"] is None  # no peak FLOP/s figure for a CPU
    # exactly one best checkpoint, loadable by nanochat's loader, with the run's meta
    best_step, best_loss = min(val, key=lambda v: v[1])
    assert sorted(p.name for p in run_dir.glob("model_*.pt")) == [f"model_{best_step:06d}.pt"]
    model, tokenizer, meta = load_model(run_dir, device="cpu")
    assert meta["step"] == best_step and meta["val_loss"] == pytest.approx(best_loss)
    assert meta["best_val_loss"] == pytest.approx(best_loss)
    assert meta["source_model"].endswith("base_checkpoints/d2/model_000000.pt")
    assert meta["training_settings"]["matrix_lr"] == 0.5
    assert meta["answer_format"] == "letter_first"  # chat data without ScienceQA answers: the default
    assert tokenizer.get_vocab_size() == tiny_tokenizer.get_vocab_size() and (run_dir / "tokenizer").is_dir()
    assert (run_dir / "loss_curve.png").stat().st_size > 0
    on_disk = json.loads((run_dir / "run_summary.json").read_text())
    assert on_disk["best_step"] == best_step and on_disk["best_val_loss"] == pytest.approx(best_loss)
    assert 0 < on_disk["token_efficiency"] <= 1


@pytest.mark.parametrize("defaults", [{}, {"dtype": "bfloat16", "device_batch_size": "auto"}],
                         ids=["fp32", "bf16-autocast-auto-batch"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_base_dir, data_file, capsys, defaults):
    """fp32, and what auto gives a CPU with native bf16 (bf16 autocast, the CPU's micro-batch)."""
    full = tiny_settings(tiny_base_dir, data_file, tmp_path / "full", num_epochs=2, save_every=3, **defaults)
    train(full)

    def stop_at_5(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    cut = dataclasses.replace(full, out_dir=str(tmp_path / "cut"))
    summary = train(cut, on_step=stop_at_5)
    assert summary["status"] == "interrupted" and summary["steps_done"] == 5
    out = capsys.readouterr().out
    assert "interrupted at step 5/8" in out and "--resume" in out
    resumed = train(dataclasses.replace(cut, resume=True))
    assert resumed["status"] == "completed" and resumed["steps_done"] == 8

    weights_full, weights_cut = resume_weights(tmp_path / "full" / "run"), resume_weights(tmp_path / "cut" / "run")
    assert all(torch.equal(weights_full[k], weights_cut[k]) for k in weights_full)
    # the same records (times aside): nothing lost or repeated around the interruption
    losses = [[(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(tmp_path / d / "run")]
              for d in ("full", "cut")]
    assert losses[0] == losses[1]
    # a resume point made with other flags is refused
    with pytest.raises(TrainError, match="--matrix_lr 0.5 there, 0.1 now"):
        train(dataclasses.replace(cut, resume=True, matrix_lr=0.1))


def test_nan_loss_stops_the_run_and_keeps_the_best_checkpoint(tmp_path, tiny_base_dir, data_file, monkeypatch):
    real = step_module.accumulate_gradients
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(step_module, "accumulate_gradients", poisoned)
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path)
    with pytest.raises(TrainError, match="training loss is nan at step 3.*best checkpoint so far is kept"):
        train(settings)
    run_dir = tmp_path / "run"
    assert len(list(run_dir.glob("model_*.pt"))) == 1
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "diverged" and summary["steps_done"] == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one(tmp_path, live_base_dir, data_file):
    settings = tiny_settings(live_base_dir, data_file, tmp_path / "one", num_iterations=2, eval_every=0)
    train(settings)
    flags = []
    for f in dataclasses.fields(TrainSettings):
        value = getattr(settings, f.name)
        if value is not None:
            flags += [f"--{f.name}", str(value)]
    flags[flags.index("--out_dir") + 1] = str(tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", str(REPO_ROOT / "sciassist_train.py"), *flags],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = resume_weights(tmp_path / "one" / "run"), resume_weights(tmp_path / "two" / "run")
    start, _, _ = load_model(live_base_dir / "base_checkpoints" / "d2", device="cpu")
    for key, w0 in start.state_dict().items():
        # The same gradients up to float summation order. Muon orthogonalises them in bf16,
        # which turns that into a few % of its update (as the compat notes measured); the
        # AdamW-updated tensors must agree much more closely.
        update_one, update_two = one[key] - w0, two[key] - w0
        tolerance = 1e-3 if key in ("transformer.wte.weight", "lm_head.weight") else 0.05
        assert (update_one - update_two).norm() <= tolerance * update_one.norm(), key
    summary = json.loads((tmp_path / "two" / "run" / "run_summary.json").read_text())
    assert summary["world_size"] == 2
    assert [r["train_loss"] for r in read_metrics(tmp_path / "two" / "run") if "train_loss" in r] == pytest.approx(
        [r["train_loss"] for r in read_metrics(tmp_path / "one" / "run") if "train_loss" in r], rel=1e-5)


def test_resume_refuses_changed_data(tmp_path, tiny_base_dir):
    data = tmp_path / "data.jsonl"
    write_conversations(data, arithmetic_conversations(40))
    settings = tiny_settings(tiny_base_dir, data, tmp_path / "out", num_iterations=3, eval_every=0)

    def stop(record):
        raise KeyboardInterrupt

    assert train(settings, on_step=stop)["status"] == "interrupted"
    write_conversations(data, arithmetic_conversations(40)[::-1])
    with pytest.raises(TrainError, match="different training/validation data"):
        train(dataclasses.replace(settings, resume=True))


def test_skip_bad_lines_is_an_explicit_opt_in(tmp_path, capsys):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    path = tmp_path / "data.jsonl"
    no_answer = '{"messages": [{"role": "user", "content": "no answer"}]}'
    path.write_text("\n".join([good, good, no_answer, good, "{bad"]) + "\n")
    with pytest.raises(TrainError, match=r"data.jsonl:3"):
        load_conversation_sets(TrainSettings(data_path=str(path), val_split=0))
    kept, val, _ = load_conversation_sets(TrainSettings(data_path=str(path), val_split=0, skip_bad_lines=True))
    assert len(kept) == 3 and val == []
    err = capsys.readouterr().err
    assert "data.jsonl:3" in err and "data.jsonl:5" in err


def test_renamed_flags_still_work_with_a_note(capsys):
    parsed = settings_from_args(["--output_dir", "runs", "--checkpoint_dir=sft:d20"])
    assert parsed.out_dir == "runs" and parsed.checkpoint == "sft:d20"
    err = capsys.readouterr().err
    assert "--output_dir is now --out_dir" in err and "--checkpoint_dir is now --checkpoint" in err


def test_training_starts_from_a_named_checkpoint(tmp_path, tiny_base_dir, data_file):
    model_file = tiny_base_dir / "base_checkpoints" / "d2" / "model_000000.pt"
    for checkpoint in ("base:d2", str(model_file)):
        settings = tiny_settings(tiny_base_dir, data_file, tmp_path, checkpoint=checkpoint, num_iterations=1,
                                 eval_every=0)
        summary = train(settings)
        assert summary["status"] == "completed" and summary["source_model"]["model_file"] == str(model_file)


@pytest.mark.parametrize("extra", [{}, {"lora_rank": 4, "lora_dropout": 0.2}], ids=["full", "lora-dropout"])
def test_ctrl_c_during_forward_backward_resumes_from_the_last_completed_step(tmp_path, tiny_base_dir, data_file,
                                                                              monkeypatch, extra):
    """With LoRA dropout the forward draws random numbers: the resume point keeps the generators as the
    interrupted step found them, so the resumed step draws what the uninterrupted one drew."""
    full = tiny_settings(tiny_base_dir, data_file, tmp_path / "full", **extra)
    train(full)
    real = step_module.accumulate_gradients
    calls, seen = [], []

    def interrupted_in_step_3(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        if len(calls) == 3:  # after step 3's forward and backward (and its dropout draws), before its update
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(step_module, "accumulate_gradients", interrupted_in_step_3)
    cut = dataclasses.replace(full, out_dir=str(tmp_path / "cut"))
    summary = train(cut, on_step=seen.append)
    assert summary["status"] == "interrupted" and summary["steps_done"] == 2
    # each record is complete when on_step sees it: step 2 was evaluated within its iteration
    assert [r["step"] for r in seen] == [1, 2] and "val_loss" in seen[1] and seen == read_metrics(cut.run_dir())[1:]
    assert torch.load(cut.run_dir() / "resume" / "state.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(step_module, "accumulate_gradients", real)
    assert train(dataclasses.replace(cut, resume=True))["steps_done"] == 4
    weights_full, weights_cut = resume_weights(full.run_dir()), resume_weights(cut.run_dir())
    assert all(torch.equal(weights_full[k], weights_cut[k]) for k in weights_full)
    losses = [[(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(s.run_dir())]
              for s in (full, cut)]
    assert losses[0] == losses[1]


def test_a_resume_file_without_every_part_is_refused(tmp_path, tiny_base_dir, data_file):
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=2, eval_every=0)

    def stop(record):
        raise KeyboardInterrupt

    assert train(settings, on_step=stop)["status"] == "interrupted"
    path = settings.run_dir() / "resume" / "state.pt"
    state = torch.load(path, weights_only=True)
    del state["rng"]
    torch.save(state, path)
    with pytest.raises(TrainError, match=r"state.pt is not a resume point .*missing: rng"):
        train(dataclasses.replace(settings, resume=True))


def test_training_imports_neither_evaluation_nor_pipelines():
    code = ("import sys, sciassist.train.loop; "
            "print([m for m in sys.modules if m.startswith(('sciassist.eval', 'sciassist.pipelines', "
            "'sciassist.serve'))])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_attention_kernel_is_printed_once(tmp_path, tiny_base_dir, data_file, capsys):
    train(tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=1, eval_every=0))
    out = capsys.readouterr().out
    assert out.count("attention for packed rows: loop (nanochat.attention; checked against the reference on cpu "
                     "in float32)") == 1  # CPU: the per-document loop
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["attention_kernel"] == "loop"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["attention_kernel"] for r in records if "train_loss" in r] == ["loop"]


def test_threads_and_muon_dtype_are_stated_once_and_recorded(tmp_path, tiny_base_dir, data_file, capsys):
    from nanochat import optim
    from sciassist import common
    before = torch.get_num_threads()
    common._ANNOUNCED.clear()
    try:
        summary = train(tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=1, eval_every=0, threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    assert out.count(f"CPU threads: 1 ({common.cpu_name()}, ") == 1
    expected = "bfloat16" if optim._cpu_has_native_bf16() else "float32"
    assert out.count(f"Muon: Newton-Schulz in {expected} (--muon_dtype auto)") == 1
    assert summary["muon_dtype"] == expected
    summary = train(tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=1, eval_every=0,
                                  muon_dtype="bfloat16", output_tag="bf16"))
    assert summary["muon_dtype"] == "bfloat16"


def test_a_named_kernel_that_fails_its_check_is_an_error(tmp_path, tiny_base_dir, data_file):
    with pytest.raises(TrainError, match="--attention_kernel flex: the 'flex' attention kernel failed its check on "
                                         "cpu, float32.*backward"):
        train(tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=1, attention_kernel="flex"))
    summary = train(tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=1, eval_every=0,
                                  attention_kernel="dense", output_tag="dense"))
    assert summary["attention_kernel"] == "dense" and summary["status"] == "completed"


def test_mix_brings_its_share_and_the_summary_counts_what_was_seen(tmp_path, tiny_base_dir, data_file):
    extra = tmp_path / "general.jsonl"
    write_conversations(extra, [{"messages": [{"role": "user", "content": f"Say hello {i}"},
                                              {"role": "assistant", "content": f"Hello {i}!"}]} for i in range(5)])
    summary = train(tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=3, eval_every=0,
                                  mix=f"{extra}:0.25"))
    mix = summary["data_mix"]
    # 36 train conversations (40 less the 10% held out); 0.25 of the mix = 12 from a file of 5
    assert [(m["name"], m["conversations"], m["available"]) for m in mix] == [("main", 36, 36), (str(extra), 12, 5)]
    assert mix[0]["share"] == pytest.approx(0.75) and summary["train_conversations"] == 48
    assert sum(m["seen"] for m in mix) == 3 * 8 and all(m["seen"] > 0 for m in mix)
    assert summary["val_conversations"] == 4  # validation stays the main data's
    with pytest.raises(TrainError, match="--mix nope.jsonl: 'nope.jsonl' is not FILE:SHARE"):
        train(tiny_settings(tiny_base_dir, data_file, tmp_path, mix="nope.jsonl"))
    with pytest.raises(TrainError, match="--mix: .*missing.jsonl not found"):
        train(tiny_settings(tiny_base_dir, data_file, tmp_path, mix=f"{tmp_path / 'missing.jsonl'}:0.1"))
    plain = train(tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=1, eval_every=0, output_tag="p"))
    assert plain["data_mix"] is None

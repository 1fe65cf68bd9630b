"""LoRA fine-tuning (--lora_rank > 0, sciassist.train.lora on peft): only the adapters train, the run
writes the merged model in nanochat's layout plus the adapter in peft's format, and resumes bit for bit."""

# ruff: noqa: F811 (the shared fixtures data_file and live_base_dir are parameters of the tests)
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanochat.checkpoint import load_model
from nanochat.gpt import GPT
from sciassist.pipelines.finetune import settings_from_args
from sciassist.train.loop import train
from sciassist.train.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_optimizers,
    add_adapters,
    merged_state_dict,
)
from sciassist.train.settings import LORA_TARGETS, TrainError, TrainSettings, check_settings
from tests.train.test_train import data_file, live_base_dir  # noqa: F401 (pytest fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

RANK = 4


def lora_settings(base_dir, data_file, out_dir, **overrides):
    values = dict(data_path=str(data_file), base_dir=str(base_dir), source="base", out_dir=str(out_dir),
                  output_tag="run", max_seq_len=64, target_examples_per_step=8, device_batch_size=2,
                  num_epochs=1, eval_every=2, eval_steps=2, save_every=0, lora_rank=RANK, lora_lr=2.0,
                  device="cpu")
    values.update(overrides)
    return TrainSettings(**values)


def base_model(base_dir):
    model, _, _ = load_model(Path(base_dir) / "base_checkpoints" / "d2", device="cpu")
    return model.float()


def one_batch(vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (2, 24), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def test_lora_flags_and_their_checks():
    s = settings_from_args(["--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0.1",
                            "--lora_targets", "c_q,c_v"])
    assert (s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_targets) == (8, 32.0, 0.1, "c_q,c_v")
    defaults = TrainSettings()
    assert defaults.lora_rank == 0 and defaults.lora_alpha is None  # full fine-tuning; alpha 2 x rank
    assert defaults.lora_targets.split(",") == list(LORA_TARGETS)
    with pytest.raises(SystemExit):
        settings_from_args(["--lora_rank", "-1"])
    with pytest.raises(SystemExit):
        settings_from_args(["--lora_dropout", "1.5"])


def test_a_bad_target_name_is_named_with_the_valid_ones(tiny_base_dir):
    with pytest.raises(TrainError) as info:
        check_settings(TrainSettings(lora_rank=4, lora_targets="c_q,q_proj"))
    message = str(info.value)
    assert "--lora_targets" in message and "q_proj" in message
    assert "c_q, c_k, c_v, c_proj, c_fc" in message
    # adding adapters to a model checks the same rule (settings built in code may skip check_settings)
    with pytest.raises(TrainError, match=r"--lora_targets names unknown module name\(s\) wte; the valid names are "
                                         r"c_q, c_k, c_v, c_proj, c_fc"):
        add_adapters(base_model(tiny_base_dir), TrainSettings(lora_rank=4, lora_targets="c_q,wte"))
    # the names are those of the Linear layers of nanochat's blocks
    model = base_model(tiny_base_dir)
    linear = {name.rsplit(".", 1)[-1] for name, module in model.transformer.h.named_modules()
              if isinstance(module, torch.nn.Linear)}
    assert linear == set(LORA_TARGETS)


def test_step_0_logits_equal_the_base_and_only_adapters_change(live_base_dir):
    base = base_model(live_base_dir)
    model = base_model(live_base_dir)
    settings = TrainSettings(lora_rank=RANK, lora_lr=1.0, init_lr_frac=1.0)
    torch.manual_seed(0)
    add_adapters(model, settings)
    idx, targets = one_batch(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))  # B starts at zero: the same function
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x (c_q, c_k, c_v, attn c_proj, c_fc, mlp c_proj) x (A, B)
    assert len(trainable) == 2 * 6 * 2
    start = {k: v.clone() for k, v in model.state_dict().items()}
    (opt,) = adapter_optimizers(model, settings)
    for _ in range(2):  # two steps: A gets a gradient once B is non-zero
        model(idx, targets).backward()
        opt.step()
        model.zero_grad(set_to_none=True)
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    assert changed == trainable  # every adapter matrix moved, nothing else did
    base_keys = [k for k in after if ".base_layer." in k or "lora_" not in k]
    assert base_keys and all(torch.equal(after[k], start[k]) for k in base_keys)


def test_merged_weights_are_a_plain_gpt_with_the_lora_models_logits(live_base_dir):
    model = base_model(live_base_dir)
    plain_keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    config = add_adapters(model, TrainSettings(lora_rank=RANK, lora_alpha=8.0))
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    cpu_copy = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in cpu_copy.items()}
    merged = merged_state_dict(cpu_copy, model.config, config)
    assert {k: tuple(v.shape) for k, v in merged.items()} == plain_keys
    assert all(torch.equal(cpu_copy[k], before[k]) for k in before)  # the copy given is not changed
    plain = GPT(model.config)
    plain.load_state_dict(merged)
    idx, _ = one_batch(model.config.vocab_size, seed=1)
    model.eval()
    with torch.no_grad():
        assert (plain(idx) - model(idx)).abs().max().item() < 1e-5


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_lora_run_writes_the_merged_model_and_the_adapter(tmp_path, live_base_dir, data_file):
    # eval_every=1 and a falling loss: the best checkpoint is the last step, the live model's weights
    settings = lora_settings(live_base_dir, data_file, tmp_path, num_epochs=2, eval_every=1)
    summary = train(settings)
    run_dir = tmp_path / "run"
    assert summary["status"] == "completed" and summary["best_step"] == summary["num_steps"] == 8
    val = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    assert all(b < a for a, b in zip(val, val[1:], strict=False)) and val[-1] < val[0] - 0.03  # it learned
    # the merged model: nanochat's loader, exactly a full fine-tune's keys and shapes
    model, _, meta = load_model(run_dir, device="cpu")
    base = base_model(live_base_dir)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert meta["lora"] == {"rank": RANK, "alpha": 2.0 * RANK, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    assert meta["training_settings"]["lora_rank"] == RANK
    merged, original = model.state_dict(), base.state_dict()
    assert not torch.equal(merged["transformer.h.0.attn.c_q.weight"], original["transformer.h.0.attn.c_q.weight"])
    assert torch.equal(merged["lm_head.weight"], original["lm_head.weight"])  # not adapted, frozen
    assert torch.equal(merged["transformer.wte.weight"], original["transformer.wte.weight"])
    # ... whose logits are the LoRA model's at that step (rebuilt from the resume point of the end)
    live = base_model(live_base_dir)
    add_adapters(live, settings)
    live.load_state_dict(torch.load(run_dir / "resume" / "state.pt", weights_only=True)["model"])
    live.eval()
    idx, _ = one_batch(model.config.vocab_size, seed=2)
    with torch.no_grad():
        assert (model(idx) - live(idx)).abs().max().item() < 1e-5
    # the adapter in peft's format
    adapter_dir = run_dir / "adapter"
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["r"] == RANK and config["lora_alpha"] == 2.0 * RANK and config["peft_type"] == "LORA"
    assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
    tensors = load_file(adapter_dir / ADAPTER_WEIGHTS)
    assert len(tensors) == 2 * 6 * 2
    key = "base_model.model.transformer.h.0.attn.c_q.lora_A.weight"
    assert key in tensors and tuple(tensors[key].shape) == (RANK, model.config.n_embd)
    assert torch.equal(tensors[key], live.transformer.h[0].attn.c_q.lora_A["default"].weight)


def test_the_adapter_loads_into_peft(tmp_path, live_base_dir, data_file):
    """peft's own loader reads the adapter folder and gives the merged checkpoint's logits."""
    from peft import PeftModel
    settings = lora_settings(live_base_dir, data_file, tmp_path, num_epochs=1, eval_every=1, lora_targets="c_q,c_fc")
    train(settings)
    run_dir = tmp_path / "run"
    merged, _, meta = load_model(run_dir, device="cpu")
    assert meta["lora"]["targets"] == ["c_q", "c_fc"]
    peft_model = PeftModel.from_pretrained(base_model(live_base_dir), str(run_dir / "adapter"))
    peft_model.eval()
    idx, _ = one_batch(merged.config.vocab_size, seed=3)
    with torch.no_grad():
        assert (peft_model(idx) - merged(idx)).abs().max().item() < 1e-5


def test_lora_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, live_base_dir, data_file):
    full = lora_settings(live_base_dir, data_file, tmp_path / "full", num_epochs=2, save_every=3, lora_dropout=0.1)
    train(full)

    def stop_at_5(record):
        if record["step"] == 5:
            raise KeyboardInterrupt

    cut = dataclasses.replace(full, out_dir=str(tmp_path / "cut"))
    assert train(cut, on_step=stop_at_5)["steps_done"] == 5
    state = torch.load(tmp_path / "cut" / "run" / "resume" / "state.pt", weights_only=True)
    assert any(".lora_B." in k for k in state["model"])  # the adapters ...
    assert len(state["optimizers"]) == 1 and state["optimizers"][0]["state"]  # ... and their optimizer's state
    assert train(dataclasses.replace(cut, resume=True))["steps_done"] == 8

    weights = [torch.load(tmp_path / d / "run" / "resume" / "state.pt", weights_only=True)["model"]
               for d in ("full", "cut")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    losses = [[(r["step"], r.get("train_loss"), r.get("val_loss")) for r in read_metrics(tmp_path / d / "run")]
              for d in ("full", "cut")]
    assert losses[0] == losses[1]
    merged = [load_model(tmp_path / d / "run", device="cpu")[0].state_dict() for d in ("full", "cut")]
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in merged[0])
    with pytest.raises(TrainError, match="--lora_rank 4 there, 8 now"):
        train(dataclasses.replace(cut, resume=True, lora_rank=8))

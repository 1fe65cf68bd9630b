"""RL with LoRA adapters (--lora_rank > 0, sciassist.train.lora as fine-tuning uses it): only the
adapters move, the saved model is the merged one the checkpoint resolver loads plus the adapter in
peft's format, and a resumed run (dropout on) ends bit for bit where an uninterrupted one does."""

# ruff: noqa: F811 (the shared fixtures question_file and rl_base_dir are parameters of the tests)
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from nanochat.checkpoint import load_model
from sciassist.checkpoints import choose_checkpoint, load_choice
from sciassist.common import settings_from_namespace
from sciassist.train import rl_step
from sciassist.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, add_adapters, is_adapter_key
from sciassist.train.rl import build_parser, rl
from sciassist.train.rl_questions import dropout_seed
from sciassist.train.rl_settings import RL_TRAJECTORY_FIELDS, RLError, RLSettings
from sciassist.train.settings import LORA_FLAGS, TrainSettings
from tests.train.test_rl import (  # noqa: F401 (pytest fixtures)
    assert_same_state,
    comparable,
    question_file,
    read_metrics,
    rl_base_dir,
    tiny_rl,
)

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "tests.train.test_rl:reply_length_reward"  # a reward with a spread on a random model
RANK = 4


def base_weights(base_dir):
    return torch.load(base_dir / "base_checkpoints" / "d2" / "model_000000.pt", weights_only=True)


def test_the_lora_flags_are_fine_tunings():
    args = ["--lora_rank", "8", "--lora_alpha", "32", "--lora_dropout", "0.1", "--lora_targets", "c_q,c_v",
            "--lora_lr", "0.5"]
    s = settings_from_namespace(RLSettings, build_parser().parse_args(args))
    assert (s.lora_rank, s.lora_alpha, s.lora_dropout, s.lora_targets, s.lora_lr) == (8, 32.0, 0.1, "c_q,c_v", 0.5)
    fields = {name: (RLSettings.__dataclass_fields__[name], TrainSettings.__dataclass_fields__[name])
              for name in LORA_FLAGS}
    for name, (rl_field, train_field) in fields.items():  # one declaration: default, help and rules
        assert rl_field.default == train_field.default and rl_field.metadata == train_field.metadata, name
        assert name in RL_TRAJECTORY_FIELDS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lora_dropout", "1.5"])


def test_a_lora_run_moves_only_the_adapters_and_saves_the_merged_model(tmp_path, rl_base_dir, question_file):
    settings = tiny_rl(rl_base_dir, question_file, tmp_path, reward_fn=HOOK, lora_rank=RANK, lora_lr=0.5)
    summary = rl(settings)
    assert summary["status"] == "completed" and summary["lora"]["rank"] == RANK
    run_dir = settings.run_dir()
    assert any(r["updated"] for r in read_metrics(run_dir))
    start = base_weights(rl_base_dir)
    state = torch.load(run_dir / "resume" / "state.pt", weights_only=True)
    adapters = {k: v for k, v in state["model"].items() if is_adapter_key(k)}
    assert len(adapters) == 2 * 6 * 2  # A and B of 6 projections in 2 blocks
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in adapters.items())  # B starts at zero: it moved
    for key, tensor in state["model"].items():  # the base, frozen: exactly as it was
        if not is_adapter_key(key):
            assert torch.equal(tensor, start[key.replace(".base_layer.", ".")].float()), key

    # the merged model: a plain GPT that nanochat's loader (and the project's resolver) reads
    model, _, meta = load_model(run_dir, device="cpu")
    assert model.state_dict().keys() == start.keys() and meta["step"] == 3
    targets = settings.lora_targets.split(",")
    assert meta["lora"] == {"rank": RANK, "alpha": 2.0 * RANK, "dropout": 0.0, "targets": targets}
    assert meta["rl_settings"]["lora_rank"] == RANK
    resolved = load_choice(choose_checkpoint(str(run_dir)), device="cpu")
    assert resolved.choice.step == 3 and resolved.model.state_dict().keys() == start.keys()
    live, _, _ = load_model(rl_base_dir / "base_checkpoints" / "d2", device="cpu")
    live = live.float()
    add_adapters(live, settings)
    live.load_state_dict(state["model"])
    live.eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # the merge is the adapted model: W + s B A against W x + s B (A x), fp32 rounding apart
        torch.testing.assert_close(model(idx), live(idx), atol=1e-5, rtol=1e-5)
    # the adapter in peft's format
    config = json.loads((run_dir / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["r"] == RANK and config["peft_type"] == "LORA"
    tensors = load_file(run_dir / "adapter" / ADAPTER_WEIGHTS)
    key = "base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"
    assert torch.equal(tensors[key], state["model"]["transformer.h.1.mlp.c_fc.lora_B.default.weight"])


def test_lora_with_dropout_resumes_bit_for_bit(tmp_path, rl_base_dir, question_file, monkeypatch):
    """Replies are sampled in eval mode (no dropout), the policy gradient runs in train mode."""
    modes = []

    def recording(real, model_of):
        def wrapper(*args, **kwargs):
            modes.append((real.__name__, model_of(args).training))
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(rl_step, "sample_rows", recording(rl_step.sample_rows, lambda args: args[0].model))
    monkeypatch.setattr(rl_step, "accumulate_policy_gradient",
                        recording(rl_step.accumulate_policy_gradient, lambda args: args[0]))
    lora = dict(reward_fn=HOOK, lora_rank=RANK, lora_lr=0.5, lora_dropout=0.3)
    whole = tiny_rl(rl_base_dir, question_file, tmp_path / "whole", **lora)
    assert rl(whole)["status"] == "completed"
    assert set(modes) == {("sample_rows", False), ("accumulate_policy_gradient", True)}

    def terminate_after_step_1(record):
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = tiny_rl(rl_base_dir, question_file, tmp_path / "cut", **lora)
    assert rl(cut, on_step=terminate_after_step_1)["steps_done"] == 1
    assert rl(tiny_rl(rl_base_dir, question_file, tmp_path / "cut", resume=True, **lora))["steps_done"] == 3
    a = torch.load(whole.run_dir() / "resume" / "state.pt", weights_only=True)
    b = torch.load(cut.run_dir() / "resume" / "state.pt", weights_only=True)
    assert any(is_adapter_key(k) for k in a["model"]) and len(a["optimizers"]) == 1
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizers"], b["optimizers"])
    assert comparable(a["metrics"]) == comparable(b["metrics"])
    assert_same_state(torch.load(whole.run_dir() / "model_000003.pt", weights_only=True),
                      torch.load(cut.run_dir() / "model_000003.pt", weights_only=True))
    # dropout draws from (seed, step, rank): other steps and ranks drop other units
    assert len({dropout_seed(42, step, rank) for step in range(3) for rank in range(2)}) == 6
    with pytest.raises(RLError, match=r"--lora_dropout 0.3 there, 0.0 now"):
        rl(tiny_rl(rl_base_dir, question_file, tmp_path / "cut", resume=True, reward_fn=HOOK, lora_rank=RANK,
                   lora_lr=0.5))

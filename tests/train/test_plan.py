"""The memory planner (sciassist.train.plan): its counts, its arithmetic, its table, and its
activation model against what autograd really keeps for a tiny model; for full fine-tuning and LoRA."""

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, config_for_depth
from sciassist.pipelines.finetune import main as finetune_main
from sciassist.train import plan
from sciassist.train.lora import add_adapters
from sciassist.train.settings import LORA_TARGETS, TrainSettings

TINY = GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
TINY_GQA = GPTConfig(sequence_len=256, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
ALL = ",".join(LORA_TARGETS)


def test_counts_match_a_real_model_and_the_optimizer_groups():
    counts = plan.count_params(TINY)
    model = GPT(TINY)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.matrices == sum(p.numel() for p in model.transformer.h.parameters())
    assert counts.adamw == model.transformer.wte.weight.numel() + model.lm_head.weight.numel()
    d20 = plan.count_params(config_for_depth(20))
    assert d20.total == 20 * 12 * 1280**2 + 2 * 65536 * 1280


def test_plan_adds_up_and_the_chunked_loss_bounds_the_logits():
    config = config_for_depth(20)
    p = plan.memory_plan(config, 8, 2048, bf16=True, free=80 * plan.GB)
    n = p["params_count"]
    assert p["params"] == p["grads"] == 4 * n
    counts = plan.count_params(config)
    assert p["optimizer"] == 4 * counts.matrices + 8 * counts.adamw
    assert p["total"] == p["params"] + p["grads"] + p["optimizer"] + p["activations"]
    # 8 x 2048 x 65,536 logits without chunks; one 2^27-logit chunk with them
    assert p["logits"] < p["activations_unchunked"] - p["activations_blocks"] - p["weight_copies"]
    assert p["total_unchunked"] - p["total"] > 8 * 2048 * 65536 * 16 * 0.9
    assert p["fits"] is True and p["max_batch"] >= 8 and p["max_batch_unchunked"] <= p["max_batch"]
    big = plan.memory_plan(config, p["max_batch"] + 1, 2048, free=80 * plan.GB)
    assert big["fits"] is False
    assert plan.max_batch(config, 2048, 4 * plan.GB) == 0  # the fixed 7.4 GB alone do not fit
    assert plan.memory_plan(config, 1, 2048)["fits"] is None  # no free memory given: no verdict


def test_table_and_formatted_plan():
    table = plan.readme_table()
    assert "| d20 (561M) |" in table and "| d32 (" in table and "80 GB card" in table
    text = plan.format_plan(plan.memory_plan(TINY, 2, 128, bf16=False))
    assert "optimizer states" in text and "total" in text and "no GPU visible" in text


def autograd_saved_bytes(model, forward):
    """Bytes of the unique storages autograd saves while forward() runs (a saved-tensors hook),
    the model's parameters excluded; forward() returns the scalar to run backward from."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(seen.values())


def saved_bytes(model, B, T):
    """Bytes autograd saves in one forward + backward of `model` on packed rows (4 documents each)."""
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    doc_ids = (torch.arange(T) * 4 // T).expand(B, T).contiguous()
    return autograd_saved_bytes(model, lambda: model(idx, idx, loss_reduction="sum", doc_ids=doc_ids))


SAVED_CONFIG = GPTConfig(sequence_len=512, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=128)


def test_activation_model_against_what_autograd_saves():
    """The forward's saved tensors (unique storages, counted by a saved-tensors hook) of a tiny
    fp32 model: the planner's activation estimate, which also holds the backward's transients,
    must cover them and stay under twice them (1.0x - 2.0x: the logits' backward needs about as much
    again as their saved tensors; bench/plan_check.py checks peaks within 20%)."""
    torch.manual_seed(0)
    model = GPT(SAVED_CONFIG)
    model.init_weights()
    saved = saved_bytes(model, 2, 512)
    estimate = plan.activation_bytes(SAVED_CONFIG, 2, 512, bf16=False)["total"]
    assert saved <= estimate <= 2.0 * saved, (estimate, saved)


@pytest.mark.parametrize("targets", [ALL, "c_q,c_v", "c_proj"])
def test_adapter_count_is_peft_s(targets, one_thread):
    """The planner's adapter count (r x in + out x r per adapted Linear, from the config) equals the
    trainable parameters of the real LoRA path (sciassist.train.lora.add_adapters, peft), and its
    parameter bytes are those of every tensor the LoRA model holds, the frozen base included."""
    model = GPT(TINY_GQA)
    add_adapters(model, TrainSettings(lora_rank=4, lora_targets=targets))
    shape = plan.LoraShape(4, tuple(targets.split(",")))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.count_adapter_params(TINY_GQA, shape) == trainable > 0
    fixed = plan.fixed_bytes(TINY_GQA, shape)
    assert fixed["trainable"] == trainable and fixed["grads"] == 4 * trainable
    assert fixed["params"] == 4 * sum(p.numel() for p in model.parameters())
    assert plan.LoraShape.of(TrainSettings(lora_rank=4, lora_targets=targets)) == shape
    assert plan.LoraShape.of(TrainSettings()) is None


def test_lora_plan_holds_gradients_and_states_of_the_adapters_only():
    config = config_for_depth(20)
    lora = plan.LoraShape(16)
    full = plan.memory_plan(config, 8, 2048, free=80 * plan.GB)
    low = plan.memory_plan(config, 8, 2048, free=80 * plan.GB, lora=lora)
    adapters = plan.count_adapter_params(config, lora)
    assert adapters == low["trainable"] == 20 * 16 * (4 * 2 * 1280 + 2 * (1280 + 5120)) == 7_372_800
    assert low["params"] == 4 * (full["params_count"] + adapters)  # the frozen base stays fp32
    assert low["grads"] == 4 * adapters and low["optimizer"] == 4 * adapters  # Muon: one momentum buffer
    assert plan.fixed_bytes(config, plan.LoraShape(16, optimizer="adamw"))["optimizer"] == 8 * adapters
    assert low["total"] == low["params"] + low["grads"] + low["optimizer"] + low["activations"]
    # every projection adapted, no dropout: the full fine-tune's activations, plus the r-wide
    # intermediate of 6 Linears per block and layer (bf16) and the adapters' bf16 copies
    assert low["activations"] - full["activations"] == 8 * 2048 * 20 * 6 * 16 * 2 + 2 * adapters
    assert low["total"] < full["total"] - 4.9 * plan.GB  # 4 P of gradients, 4 + 1.3 P of states gone
    assert low["max_batch"] >= full["max_batch"]
    assert plan.max_batch(config, 2048, 16 * plan.GB, lora=lora) > plan.max_batch(config, 2048, 16 * plan.GB) > 0


def test_lora_activations_follow_targets_and_dropout():
    """Fewer targets: the inputs only frozen weights would keep are gone; dropout: each adapter keeps
    its dropped-out input and the mask."""
    config, n = config_for_depth(4), 2 * 1024
    c, a = config.n_embd, 4

    def blocks(targets, dropout=0.0):
        return plan.activation_bytes(config, 2, 1024, bf16=False, lora=plan.LoraShape(16, targets, dropout))["blocks"]

    full = plan.activation_bytes(config, 2, 1024, bf16=False)["blocks"]
    # c_q, c_v: attention output, the MLP's input and its 4C hidden are no longer kept
    assert blocks(("c_q", "c_v")) == full + n * 4 * a * (2 * 16 - 6 * c)
    # dropout: q, k, v, attention c_proj, c_fc read C-wide inputs, the MLP's c_proj a 4C one; each
    # keeps its copy and a float mask (CPU), while the 7C of shared inputs are not kept
    assert blocks(LORA_TARGETS, 0.1) == full + n * 4 * a * (6 * 16 + 2 * 9 * c - 7 * c)


@pytest.mark.parametrize("targets,dropout", [(ALL, 0.0), ("c_q,c_v", 0.0), (ALL, 0.1)])
def test_lora_activation_model_against_what_autograd_saves(targets, dropout, one_thread):
    """As for full fine-tuning: the LoRA estimate covers what autograd saves with peft's adapters
    (frozen base) and stays under twice it."""
    torch.manual_seed(0)
    model = GPT(SAVED_CONFIG)
    model.init_weights()
    add_adapters(model, TrainSettings(lora_rank=16, lora_targets=targets, lora_dropout=dropout))
    model.train()
    saved = saved_bytes(model, 2, 512)
    shape = plan.LoraShape(16, tuple(targets.split(",")), dropout)
    estimate = plan.activation_bytes(SAVED_CONFIG, 2, 512, bf16=False, lora=shape)["total"]
    assert saved <= estimate <= 2.0 * saved, (estimate, saved)


def test_table_and_plan_with_lora_rows(capsys):
    table = plan.readme_table(lora_rank=16)
    assert "| d20 (561M), LoRA r=16 |" in table and "| d32 (1879M), LoRA r=16 |" in table
    assert "| d20 (561M) |" in table and "LoRA rows: rank 16" in table
    assert "LoRA" not in plan.readme_table()
    assert plan.main(["--table"]) == 0 and "| d20 (561M), LoRA r=16 |" in capsys.readouterr().out
    assert plan.main(["--table", "--lora_rank", "0"]) == 0 and "LoRA" not in capsys.readouterr().out
    text = plan.format_plan(plan.memory_plan(TINY, 2, 128, bf16=False, lora=plan.LoraShape(4, ("c_q",))))
    assert "LoRA plan: rank 4 on c_q; 1,024 trainable parameters" in text
    assert "gradients (fp32, adapters only)" in text and "optimizer states (Muon momentum, adapters only)" in text


def test_dry_run_prints_the_lora_plan(tmp_path, tiny_base_dir, capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("--dry_run must not load weights")

    monkeypatch.setattr(torch, "load", no_loading)
    code = finetune_main(["--dry_run", "--base_dir", str(tiny_base_dir), "--source", "base", "--device", "cpu",
                          "--device_batch_size", "2", "--max_seq_len", "128", "--lora_rank", "8",
                          "--lora_targets", "c_q,c_v", "--out_dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0
    assert "LoRA plan: rank 8 on c_q, c_v;" in out and "trainable parameters" in out
    assert "gradients (fp32, adapters only)" in out and "plan is for full fine-tuning" not in out

"""The memory planner (sciassist.train.plan): its counts, its arithmetic, its table, and its
activation model against what autograd really keeps for a tiny model."""

import torch

from nanochat.gpt import GPT, GPTConfig, config_for_depth
from sciassist.train import plan

TINY = GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


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


def test_activation_model_against_what_autograd_saves():
    """The forward's saved tensors (unique storages, counted by a saved-tensors hook) of a tiny
    fp32 model: the planner's activation estimate, which also holds the backward's transients,
    must cover them and stay under twice them (1.0x - 2.0x: the logits' backward needs about as much
    again as their saved tensors; bench/plan_check.py checks peaks within 20%)."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=512, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=128)
    model = GPT(config)
    model.init_weights()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    B, T = 2, 512
    idx = torch.randint(0, 4096, (B, T))
    doc_ids = (torch.arange(T) * 4 // T).expand(B, T).contiguous()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, idx, loss_reduction="sum", doc_ids=doc_ids)
    loss.backward()
    saved = sum(seen.values())
    estimate = plan.activation_bytes(config, B, T, bf16=False)["total"]
    assert saved <= estimate <= 2.0 * saved, (estimate, saved)

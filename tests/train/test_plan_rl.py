"""The RL stage's memory plan (sciassist.train.plan.rl_plan): the KV cache is exactly the engine's
allocation, the two peaks add up and never overlap, the largest batches are the edges of what
fits, and the update's activation estimate covers what autograd keeps for the policy gradient."""

import pytest
import torch

from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig, config_for_depth
from sciassist.train import plan
from tests.train.test_plan import autograd_saved_bytes

TINY_GQA = GPTConfig(sequence_len=256, vocab_size=512, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)


class StubTokenizer:
    def encode_special(self, name):
        return 3

    def get_bos_token_id(self):
        return 1  # also what left-pads the shorter prompts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kv_cache_is_the_engines_allocation(dtype, one_thread, monkeypatch):
    torch.manual_seed(0)
    model = GPT(TINY_GQA)
    model.init_weights()
    engine = Engine(model.eval(), StubTokenizer(), dtype)
    monkeypatch.setattr(engine, "_stop_ids", lambda: {10_001})  # never sampled: every row decodes 5 tokens
    allocated = []
    new_cache = engine._new_cache
    monkeypatch.setattr(engine, "_new_cache", lambda rows, positions: allocated.append(new_cache(rows, positions))
                        or allocated[-1])
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    replies = engine.generate_multi(prompts, max_tokens=5, temperature=1.0, top_k=20)
    assert [len(r) for r in replies] == [5, 5, 5]
    (cache,) = allocated  # one cache of rows x (the longest prompt + max_new_tokens)
    assert tuple(cache.kv.shape) == (3, 2, 3, 2, 7 + 5, 16)
    bf16 = dtype == torch.bfloat16
    assert cache.kv.numel() * cache.kv.element_size() == plan.kv_cache_bytes(TINY_GQA, 3, 7 + 5, bf16)
    assert plan.rollout_bytes(TINY_GQA, 3, 7, 5, bf16)["kv_cache"] == plan.kv_cache_bytes(TINY_GQA, 3, 12, bf16)


def test_d20s_kv_cache_by_hand():
    # 20 layers x (keys, values) x 10 kv heads x 128 channels x (512 + 256) positions x 2 bytes
    assert plan.kv_cache_bytes(config_for_depth(20), 1, 768) == 20 * 2 * 10 * 128 * 768 * 2 == 78_643_200
    assert plan.kv_cache_bytes(config_for_depth(20), 32, 768, bf16=False) == 32 * 2 * 78_643_200


def test_rl_plan_adds_up_its_two_peaks():
    config = config_for_depth(20)
    p = plan.rl_plan(config, 32, 8, 512, 256, free=80 * plan.GB)
    fixed = plan.fixed_bytes(config)
    assert (p["params"], p["grads"], p["optimizer"]) == (fixed["params"], fixed["grads"], fixed["optimizer"])
    # the rollout: no gradients (freed by the previous step), the cache and the prefill of the call's
    # 2 distinct prompts (16 rows each): their logits, block tensors, mask, and their own cache
    assert p["kv_cache"] == plan.kv_cache_bytes(config, 32, 768)
    assert p["prompts_per_call"] == 2
    assert p["prefill"] == 2 * 512 * (65536 * 12 + 8 * 1280 * 2 + 512) + plan.kv_cache_bytes(config, 2, 512)
    assert p["decode_logits"] == 32 * 65536 * 12
    assert p["rollout_total"] == p["params"] + p["optimizer"] + p["kv_cache"] + p["prefill"]
    # the update: fine-tuning's plan of 8 rows of prompt + reply, every position given logits
    assert p["activations"] == plan.activation_bytes(config, 8, 768)["total"]
    assert p["update_total"] == p["params"] + p["grads"] + p["optimizer"] + p["activations"]
    assert p["total"] == max(p["rollout_total"], p["update_total"]) == p["update_total"]
    assert p["fits"] is True and p["max_device_batch"] == plan.max_batch(config, 768, 80 * plan.GB)
    edge = p["max_generation_batch"]
    assert plan.rl_plan(config, edge, 1, 512, 256, free=80 * plan.GB)["fits"]
    assert not any(plan.rl_plan(config, edge + extra, 1, 512, 256, free=80 * plan.GB)["fits"] for extra in (1, 2, 16))
    # all prompts different (k = 1, as greedy validation): every row has its own prefill
    alone = plan.rl_plan(config, 32, 8, 512, 256, samples_per_question=1)
    assert alone["prefill"] == 32 * 512 * (65536 * 12 + 8 * 1280 * 2 + 512) > 10 * p["prefill"]
    assert plan.rl_plan(config, 1, 1, 512, 256)["fits"] is None  # no free memory given: no verdict


@pytest.mark.parametrize("rows, k, expected", [(32, 16, 2), (16, 16, 1), (8, 16, 1), (24, 16, 2), (40, 16, 3),
                                               (17, 16, 2), (5, 1, 5), (6, 4, 2), (10, 4, 3), (3, 2, 2)])
def test_prompts_per_call_counts_the_questions_a_call_can_straddle(rows, k, expected):
    assert plan.prompts_per_call(rows, k) == expected
    # by brute force: a step of many questions, k rows each, cut into calls of `rows`
    questions = [i // k for i in range(rows * k * 4)]
    calls = [questions[start:start + rows] for start in range(0, len(questions), rows)]
    assert max(len(set(call)) for call in calls) == expected


def test_lora_rl_plan_keeps_the_rollout_and_shrinks_the_fixed_memory():
    config = config_for_depth(20)
    full = plan.rl_plan(config, 16, 4, 512, 256, free=24 * plan.GB)
    lora = plan.rl_plan(config, 16, 4, 512, 256, free=24 * plan.GB, lora=plan.LoraShape(16))
    assert lora["kv_cache"] == full["kv_cache"] and lora["prefill"] == full["prefill"]
    assert lora["grads"] == 4 * plan.count_adapter_params(config, plan.LoraShape(16)) < full["grads"] / 50
    assert lora["max_generation_batch"] > full["max_generation_batch"]
    assert lora["max_device_batch"] > full["max_device_batch"]


def test_rl_table_and_command(capsys):
    table = plan.rl_table(lora_rank=16)
    full = plan.rl_plan(config_for_depth(20), 1, 1, 512, 256, free=80 * plan.GB)
    assert f"| d20 (561M) | 7.40 GB | 0.08 GB | {full['prefill'] / plan.GB:.2f} GB |" in table
    assert f"{full['max_generation_batch']} / {full['max_device_batch']} |" in table
    assert "| d20 (561M), LoRA r=16 |" in table and "| d32 (1879M) |" in table
    assert "| does not fit |" in table  # d32's 23.6 GB of fixed memory on a 16 GB card
    assert plan.main(["--rl", "--table", "--prompt_len", "256", "--max_new_tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "prompts of 256 tokens and `--max_new_tokens 64`" in out and "RL, d20" not in out
    assert plan.main(["--rl", "--generation_batch_size", "16", "--device_batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert "| rollout: KV cache of 16 rows | 1.26 GB |" in out and "update: activations of 2 rows" in out


def saved_policy_gradient_bytes(model, rows, prompt, reply):
    """Bytes autograd saves in one forward + backward of the RL objective (targets -1 on the
    prompt, loss_reduction none x an advantage per row)."""
    ids = torch.randint(0, model.config.vocab_size, (rows, prompt + reply))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[:, :prompt - 1] = -1
    advantages = torch.linspace(-1, 1, rows).unsqueeze(1)
    return autograd_saved_bytes(model, lambda: (model(inputs, targets, loss_reduction="none") * advantages).sum())


def test_the_updates_activation_estimate_covers_what_autograd_saves(one_thread):
    """As fine-tuning's test: the estimate holds the backward's transients too, so it must cover the
    saved tensors and stay under twice them (bench/plan_check.py --only rl checks measured peaks)."""
    config = GPTConfig(sequence_len=512, vocab_size=4096, n_layer=4, n_head=2, n_kv_head=2, n_embd=128)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    model.train()
    saved = saved_policy_gradient_bytes(model, 4, 96, 32)
    estimate = plan.activation_bytes(config, 4, 96 + 32 - 1, bf16=False)["total"]
    assert 1.0 <= estimate / saved <= 2.0

"""The RL stage's auto batch sizes (sciassist.train.rl_batch): numbers as set, the measured CPU
sizes, the planner's on a (simulated) card, capped by the step and the group, and one error line
when not one row fits."""

import dataclasses

import pytest
import torch

from nanochat.gpt import GPTConfig
from sciassist.common import AUTO
from sciassist.memory import Card
from sciassist.train import plan
from sciassist.train.rl_batch import CPU_GENERATION_ROWS, CPU_UPDATE_REPLIES, rl_batches
from sciassist.train.rl_settings import RLError, RLSettings
from tests.train.test_rl import question_file, rl_base_dir, tiny_rl  # noqa: F401 - fixtures

GB = 10**9
D20 = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280)


def test_the_defaults_are_auto_and_numbers_stay_numbers():
    s = RLSettings()
    assert (s.generation_batch_size, s.device_batch_size) == (AUTO, AUTO)
    cpu = rl_batches(s, D20, torch.device("cpu"), 300, bf16=False)
    assert (cpu.generation, cpu.update) == (CPU_GENERATION_ROWS, CPU_UPDATE_REPLIES) == (32, 8)
    assert "auto on cpu" in cpu.describe()
    card = Card("Sim A100", 40 * GB, 39 * GB)
    both = rl_batches(dataclasses.replace(s, generation_batch_size=12, device_batch_size=3), D20,
                      torch.device("cuda"), 300, bf16=True, card=card)
    assert (both.generation, both.update, both.reason) == (12, 3, "as set")


def test_on_a_card_auto_is_the_planners_largest_capped_by_the_step_and_the_group():
    card = Card("Sim 24GB", 24 * GB, 23 * GB)
    s = RLSettings(questions_per_step=64, samples_per_question=16, max_new_tokens=256)
    chosen = rl_batches(s, D20, torch.device("cuda"), 512, bf16=True, card=card)
    planned = plan.rl_plan(D20, 1, 1, 512, 256, samples_per_question=16, bf16=True, free=card.free)
    assert chosen.generation == min(planned["max_generation_batch"], 64 * 16) > 16
    assert chosen.update == min(planned["max_device_batch"], 16) >= 1
    assert "Sim 24GB" in chosen.reason
    small_step = rl_batches(dataclasses.replace(s, questions_per_step=2), D20, torch.device("cuda"), 512, bf16=True,
                            card=card)
    assert small_step.generation == 32  # a step's 2 questions x 16 replies
    one_set = rl_batches(dataclasses.replace(s, device_batch_size=2), D20, torch.device("cuda"), 512, bf16=True,
                         card=card)
    assert (one_set.generation, one_set.update) == (chosen.generation, 2)


def test_a_card_too_small_is_one_error_line_naming_it():
    d32 = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=32, n_head=16, n_kv_head=16, n_embd=2048)
    with pytest.raises(RLError, match=r"RL \(full\) does not fit Sim T4 \(16\.0 GB, 15\.5 GB free\).*--lora_rank 16"):
        rl_batches(RLSettings(), d32, torch.device("cuda"), 512, bf16=True,
                   card=Card("Sim T4", 16 * GB, 15_500_000_000))


def test_a_run_says_and_records_its_batches(tmp_path, rl_base_dir, question_file, capsys):  # noqa: F811
    from sciassist.train.rl import rl
    summary = rl(tiny_rl(rl_base_dir, question_file, tmp_path, generation_batch_size=AUTO, device_batch_size=AUTO,
                         num_steps=1))
    assert summary["batches"]["generation"] == 32 and summary["batches"]["update"] == 8
    assert "batches: 32 row(s) decoded together, 8 repl(ies) per micro-batch" in capsys.readouterr().out

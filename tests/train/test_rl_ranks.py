"""RL under torchrun (sciassist.train.rl_ranks): each rank samples and trains on its share of every
step's questions, and two gloo processes end where one process does, with the same metrics and
validation replies."""

# ruff: noqa: F811 (the shared fixtures question_file and rl_base_dir are parameters of the tests)
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sciassist.train.rl import rl
from sciassist.train.rl_ranks import gathered, share, summed
from sciassist.train.rl_settings import RLError, RLSettings, check_rl_settings
from tests.train.test_rl import question_file, read_jsonl, read_metrics, rl_base_dir, tiny_rl  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

REPO_ROOT = Path(__file__).resolve().parents[2]
HOOK = "tests.train.test_rl:reply_length_reward"  # a reward with a spread on a random model
# the figures of a step that are float sums, whose order of addition depends on the split
SUMMED = ("loss", "neg_logp_per_token")
TIMING = ("sample_time_s", "step_time_s", "elapsed_s")


def test_shares_cover_the_items_in_order_and_one_process_keeps_everything():
    ranks = [SimpleNamespace(rank=r, world_size=3) for r in range(3)]
    assert [list(share(7, r)) for r in ranks] == [[0, 1], [2, 3], [4, 5, 6]]
    assert [list(share(2, r)) for r in ranks] == [[], [0], [1]]
    alone = SimpleNamespace(rank=0, world_size=1, distributed=False)
    assert list(share(5, alone)) == [0, 1, 2, 3, 4]
    assert gathered(alone, (1, 2)) == [1, 2] and summed(alone, [0.5, 2.0]) == [0.5, 2.0]


def test_questions_per_step_must_divide_among_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    check_rl_settings(RLSettings(questions_per_step=8, device="cpu"))
    with pytest.raises(RLError, match=r"--questions_per_step 6 cannot be shared equally by 4 processes; make it a "
                                      r"multiple of 4$"):
        check_rl_settings(RLSettings(questions_per_step=6, device="cpu"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(settings: RLSettings, processes: int, cwd) -> subprocess.CompletedProcess:
    flags = []
    for f in dataclasses.fields(RLSettings):
        value = getattr(settings, f.name)
        if value is not None:
            flags += [f"--{f.name}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "sciassist.train.rl", *flags],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_same_records(two, one):
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one, strict=True):
        exact = [k for k in b if k not in SUMMED + TIMING]
        assert {k: a[k] for k in exact} == {k: b[k] for k in exact}
        for key in SUMMED:
            if b.get(key) is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("extra", [{}, {"lora_rank": 4, "lora_lr": 0.5}], ids=["full", "lora"])
def test_two_gloo_processes_match_one(tmp_path, rl_base_dir, question_file, extra):
    """4 questions per step, 2 per rank; 6 rows per rank decoded 4 + 2 where one process decodes
    4 + 4 + 4: the same replies all the same (one seed per row). 3 validation questions: 1 + 2."""
    one = tiny_rl(rl_base_dir, question_file, tmp_path / "one", reward_fn=HOOK, num_steps=2, questions_per_step=4,
                  val_path=str(question_file), eval_every=1, eval_questions=3, val_questions=3, val_samples=2,
                  muon_dtype="float32", **extra)
    assert rl(one)["status"] == "completed"
    two = dataclasses.replace(one, out_dir=str(tmp_path / "two"))
    result = torchrun(two, 2, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((two.run_dir() / "run_summary.json").read_text())
    assert (summary["status"], summary["world_size"], summary["steps_done"]) == ("completed", 2, 2)

    records_one, records_two = read_metrics(one.run_dir()), read_metrics(two.run_dir())
    assert any(r.get("updated") for r in records_one)  # the steps learned
    assert_same_records(records_two, records_one)
    assert read_jsonl(two.run_dir() / "samples.jsonl") == read_jsonl(one.run_dir() / "samples.jsonl")
    a = torch.load(one.run_dir() / "resume" / "state.pt", weights_only=True)
    b = torch.load(two.run_dir() / "resume" / "state.pt", weights_only=True)
    start = torch.load(rl_base_dir / "base_checkpoints" / "d2" / "model_000000.pt", weights_only=True)
    for name, tensor in a["model"].items():
        # the same gradients up to the order of float additions: the updates agree to a few parts
        # in a million (AdamW's largest single difference, 5e-5, is on an update of 2.6 at lr 0.5)
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-4, atol=1e-4, msg=name)
        if name in start:
            update = tensor - start[name].float()
            assert (b["model"][name] - tensor).norm() <= 2e-5 * update.norm(), name
            assert (update.norm() > 0) == (not extra), name  # LoRA: the base stays as it was
    assert sorted(p.name for p in two.run_dir().iterdir()) == sorted(p.name for p in one.run_dir().iterdir())

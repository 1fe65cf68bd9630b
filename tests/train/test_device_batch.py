"""--device_batch_size auto and out-of-memory in training, on a GPU simulated on the CPU
(tests/simulated_card.py): the pick, the halving, the stop with advice, the messages, and a run
stopped by out-of-memory resuming with its recorded batch bit for bit."""

import json
import re
from pathlib import Path

import pytest
import torch

import sciassist.train.setup as train_setup
from nanochat.gpt import config_for_depth
from sciassist.common import precision_for
from sciassist.data.batching import arrange_step, tokenize_conversations
from sciassist.memory import GB, Card, OutOfMemory, card_of, halving, is_out_of_memory
from sciassist.pipelines import finetune
from sciassist.train import batch as device_batch
from sciassist.train import plan
from sciassist.train.loop import TrainOutOfMemory, train
from sciassist.train.settings import TrainError
from sciassist.train.setup import Runtime
from tests.simulated_card import simulated_card
from tests.train.test_train import arithmetic_conversations, data_file, live_base_dir, tiny_settings  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def test_auto_is_the_default_and_a_number_still_means_that_number(tiny_tokenizer):
    settings = finetune.settings_from_args([])
    assert settings.device_batch_size == "auto"
    assert finetune.settings_from_args(["--device_batch_size", "3"]).device_batch_size == 3
    dataset = tokenize_conversations(tiny_tokenizer, arithmetic_conversations(40), 64)
    given = device_batch.given(tiny_settings("b", "d", "o", device_batch_size=3), dataset.max_seq_len)
    assert (given.rows, given.positions, given.chosen) == (3, 3 * 64, "given")
    examples = list(range(16))
    # the given batch arranges a step exactly as the flag always did
    before = arrange_step(dataset, examples, 3, pack_len=32)
    now = arrange_step(dataset, examples, given.rows, pack_len=32, micro_positions=given.positions)
    assert before.micro_batches == now.micro_batches


@pytest.mark.parametrize("argv, message", [
    (["--device_batch_size", "0"], "argument --device_batch_size: must be between 1 and 1000000, got 0"),
    (["--device_batch_size", "many"], "argument --device_batch_size: expected auto or a whole number, got 'many'"),
])
def test_bad_device_batch_is_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        finetune.settings_from_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_widest_row_is_the_datas_not_the_worst_case(tiny_tokenizer):
    dataset = tokenize_conversations(tiny_tokenizer, arithmetic_conversations(40), 256)
    longest = max(dataset.lengths)
    assert longest < 64
    packed = tiny_settings("b", "d", "o", max_seq_len=256, pack_len=32)
    assert device_batch.widest_row(dataset, packed) == 64  # the longest, rounded up to a multiple of 64
    wide = tiny_settings("b", "d", "o", max_seq_len=256, pack_len=200)
    assert device_batch.widest_row(dataset, wide) == 256  # 200 rounded up to 256, at most max_seq_len
    padded = tiny_settings("b", "d", "o", max_seq_len=256, packing=False)
    assert device_batch.widest_row(dataset, padded) == longest


def test_cpu_auto_takes_the_measured_fastest_micro_batch(tiny_tokenizer):
    dataset = tokenize_conversations(tiny_tokenizer, arithmetic_conversations(40), 64)
    settings = tiny_settings("b", "d", "o", device_batch_size="auto")
    chosen = device_batch.choose(settings, Runtime(torch.device("cpu")), None, dataset,
                                 precision_for("cpu", "float32"), card=None)
    assert chosen.chosen == "cpu"
    assert chosen.positions == device_batch.CPU_POSITIONS == 2048
    assert chosen.rows == 2048 // 64
    assert device_batch.val_conversations(settings) == settings.eval_steps * 8


def test_the_planner_on_colabs_cards_for_the_published_models():
    """What auto plans for d20 and d32 (bf16, 1,024-position rows) on 16 / 24 / 40 / 80 GB cards."""
    rows = {}
    for depth in (20, 32):
        for gb in (16, 24, 40, 80):
            card = Card(f"{gb} GB card", gb * GB, gb * GB)
            rows[depth, gb] = device_batch.planned_positions(config_for_depth(depth), card, True) // 1024
    assert [rows[20, gb] for gb in (16, 24, 40)] == [3, 9, 21]
    assert [rows[32, gb] for gb in (16, 24, 40, 80)] == [0, 0, 2, 14]
    # sized in positions, the pick is never below the planner's whole rows of 1,024
    assert rows[20, 80] >= plan.max_batch(config_for_depth(20), 1024, 80 * GB)


def test_no_fit_names_the_card_the_plan_and_what_fits():
    settings = tiny_settings("b", "d", "o", max_seq_len=2048, pack_len=1024, device_batch_size="auto")
    d32 = config_for_depth(32)
    t4 = Card("Tesla T4", 16 * GB, 15 * GB)
    with pytest.raises(device_batch.NoBatchFits) as failed:
        device_batch.fixed_memory_check(settings, d32, t4, True)
    message = str(failed.value)
    assert message.startswith("d32 full fine-tuning does not fit Tesla T4 (16.0 GB, 15.0 GB free): the plan needs "
                              "23.6 GB of weights, gradients and optimizer states plus 7.78 GB to train one row of "
                              "1024 positions")
    assert "what fits: a card of 40 GB or more" in message
    l4 = Card("NVIDIA L4", 24 * GB, 23 * GB)
    with pytest.raises(device_batch.NoBatchFits) as failed:
        device_batch.fixed_memory_check(settings, d32, l4, True)
    assert "what fits: --lora_rank 16 (2 row(s) of 1024 fit); or a card of 40 GB or more" in str(failed.value)
    # d20 fits every card
    for gb in (16, 24, 40, 80):
        device_batch.fixed_memory_check(settings, config_for_depth(20), Card("c", gb * GB, gb * GB), True)


def test_halving_says_one_line_each_time_and_gives_up_at_one():
    said = []

    def work(batch):
        if batch > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch * 10

    assert halving(work, 16, "cpu", what="batch", say=said.append) == (20, 2)
    assert said == ["out of memory at batch 16; trying 8", "out of memory at batch 8; trying 4",
                    "out of memory at batch 4; trying 2"]
    with pytest.raises(OutOfMemory, match="batch 1 does not fit"):
        halving(lambda b: (_ for _ in ()).throw(RuntimeError("MPS backend out of memory")), 2, "cpu", say=said.append)
    with pytest.raises(ValueError, match="not memory"):  # anything else is not caught
        halving(lambda b: (_ for _ in ()).throw(ValueError("not memory")), 4, "cpu")
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def _proof_peak(model, rows, widest, settings):
    """Bytes the proof of `rows` rows holds at most (the simulated card's count)."""
    from tests.simulated_card import AllocationHook
    with AllocationHook(None) as hook:
        device_batch.prove(model, rows * widest, widest, precision_for("cpu", "float32"), True,
                           device_batch.optimizer_state_bytes(model.config, settings), torch.device("cpu"))
    return hook.peak


def _card_free_for(config, rows, widest, settings):
    """Free bytes for which the planner picks exactly `rows` rows of `widest`."""
    lora = plan.LoraShape.of(settings)
    fixed = plan.fixed_bytes(config, lora)
    need = fixed["params"] + fixed["grads"] + fixed["optimizer"]
    need += plan.activation_bytes(config, rows, widest, bf16=False, lora=lora)["total"]
    return int(need / plan.USABLE_FRACTION) + 1


def test_the_pick_is_proven_and_halved_on_out_of_memory(monkeypatch, tiny_base_dir, tiny_tokenizer):
    from nanochat.checkpoint import load_model
    model, _, _ = load_model(tiny_base_dir / "base_checkpoints" / "d2", device="cpu")
    model = model.float().train()
    settings = tiny_settings("b", "d", "o", max_seq_len=64, device_batch_size="auto", dtype="float32")
    dataset = tokenize_conversations(tiny_tokenizer, arithmetic_conversations(40), 64)
    widest = device_batch.widest_row(dataset, settings)
    free = _card_free_for(model.config, 8, widest, settings)
    assert device_batch.planned_positions(model.config, Card("c", free, free), False) // widest == 8
    peak4, peak8 = (_proof_peak(model, r, widest, settings) for r in (4, 8))
    assert peak4 < peak8
    rng = torch.get_rng_state()
    said = []
    with simulated_card(monkeypatch, total=free, free=free, budget=(peak4 + peak8) // 2, name="Sim T4") as card:
        chosen = device_batch.choose(settings, Runtime(torch.device("cpu")), model, dataset,
                                     precision_for("cpu", "float32"), card_of("cpu"), say=said.append)
    assert card.failures == 1
    assert said == [f"device batch: out of memory at rows of {widest} positions 8; trying 4"]
    assert (chosen.rows, chosen.positions, chosen.chosen, chosen.planned_positions) == (4, 4 * widest, "proven",
                                                                                          8 * widest)
    assert "Sim T4" in chosen.reason and "halved from the plan's 8" in chosen.reason
    assert torch.equal(torch.get_rng_state(), rng)  # the proof leaves the random generators as they were
    assert all(p.grad is None for p in model.parameters())


def test_a_card_too_small_stops_before_the_weights_load(monkeypatch, tmp_path, live_base_dir, data_file):  # noqa: F811
    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(train_setup, "load_source_model", no_load)
    settings = tiny_settings(live_base_dir, data_file, tmp_path, device_batch_size="auto")
    with simulated_card(monkeypatch, total=2_000_000, free=1_000_000, name="Tiny GPU"):
        with pytest.raises(device_batch.NoBatchFits) as failed:
            train(settings)
    message = str(failed.value)
    assert message.startswith("d2 full fine-tuning does not fit Tiny GPU (0.0 GB, 0.0 GB free): the plan needs")
    assert isinstance(failed.value, TrainError)
    assert not (tmp_path / "run").exists()


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_out_of_memory_mid_run_saves_and_the_resume_is_bit_identical(monkeypatch, tmp_path, live_base_dir,  # noqa: F811
                                                                      data_file):  # noqa: F811
    """A run on a simulated card whose memory shrinks after step 2 (as a later, longer row would
    need more): the resume point of step 2, one error line naming the card, the batch and the
    flag, exit code 3; resuming (auto: the recorded batch) ends with the weights of the same run
    uninterrupted."""
    common = dict(num_iterations=5, eval_every=0, dtype="float32", device_batch_size="auto")
    config = plan.config_from_meta(live_base_dir / "base_checkpoints" / "d2", 0)
    free = _card_free_for(config, 4, 64, tiny_settings(live_base_dir, data_file, tmp_path))  # 4 rows of 64
    with simulated_card(monkeypatch, total=free, free=free, name="Sim 16GB"):
        reference = train(tiny_settings(live_base_dir, data_file, tmp_path / "ref", **common))
    assert reference["status"] == "completed"
    batch = reference["device_batch"]
    assert batch["chosen"] == "proven" and batch["rows"] >= 1

    def shrink_after_two(record):
        if record["step"] == 2:
            card.budget = 1  # every new allocation now fails
    settings = tiny_settings(live_base_dir, data_file, tmp_path / "oom", **common)
    with simulated_card(monkeypatch, total=free, free=free, name="Sim 16GB") as card:
        with pytest.raises(TrainOutOfMemory) as failed:
            train(settings, on_step=shrink_after_two)
    message = str(failed.value)
    assert re.search(r"out of memory in step 3 on Sim 16GB \(0\.0 GB, 0\.0 GB free\) \(CUDA out of memory\. .*\) with "
                     rf"a micro-batch of {batch['rows']} row\(s\) of {batch['widest']} positions", message), message
    run_dir = tmp_path / "oom" / "run"
    assert f"resume point of step 2 saved in {run_dir / 'resume' / 'state.pt'}" in message
    assert "Run again with the same flags --resume and" in message
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["status"] == "out_of_memory" and summary["steps_done"] == 2
    assert summary["device_batch"] == batch
    # resumed off the card: auto takes the recorded batch
    resumed = train(tiny_settings(live_base_dir, data_file, tmp_path / "oom", resume=True, **common))
    assert resumed["status"] == "completed"
    assert resumed["device_batch"]["chosen"] == "recorded"
    assert resumed["device_batch"]["positions"] == batch["positions"]
    for name, tensor in _weights(tmp_path / "ref" / "run" / "resume" / "state.pt").items():
        assert torch.equal(tensor, _weights(run_dir / "resume" / "state.pt")[name]), name


def test_out_of_memory_is_exit_code_3_with_one_error_line(monkeypatch, tmp_path, live_base_dir,  # noqa: F811
                                                           data_file, capsys):  # noqa: F811
    def out_of_memory(run, step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr("sciassist.train.loop.forward_backward", out_of_memory)
    code = finetune.main(["--data_path", str(data_file), "--base_dir", str(live_base_dir), "--source", "base",
                          "--out_dir", str(tmp_path), "--output_tag", "run", "--max_seq_len", "64",
                          "--target_examples_per_step", "8", "--device", "cpu", "--eval_every", "0",
                          "--num_iterations", "3"])
    assert code == 3
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: out of memory in step 1 on cpu (CUDA out of memory. Tried to allocate "
                               "20.00 MiB)")
    assert "resume point of step 0 saved" in lines[0]
    assert Path(tmp_path / "run" / "resume" / "state.pt").is_file()

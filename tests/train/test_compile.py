"""torch.compile for training: packed rows that change shape every step compile a fixed handful
of graphs (counted with a counting backend), the numbers are the eager model's, and a failure
of the compiler stack falls back (default) or stops the run (asked for)."""

import random

import pytest
import torch

from nanochat.attention import PackedLayout
from sciassist.common import precision_for
from sciassist.train import setup
from sciassist.train.settings import TrainError, TrainSettings
from sciassist.train.step import accumulate_gradients
from tests.nanochat.test_gpt import tiny_model


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the graphs."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph_module, example_inputs):
        self.graphs += 1
        return graph_module.forward


def packed_steps(count, vocab, seed=0):
    """`count` steps of 1-3 micro-batches of 1-3 packed rows each, row lengths 24-64, documents
    of 1-30 tokens, some padding: a different layout and shape every step, as training sees."""
    rng = random.Random(seed)
    steps = []
    for _ in range(count):
        batches = []
        for _ in range(rng.randint(1, 3)):
            B, T = rng.randint(1, 3), rng.choice([24, 40, 64])
            rows = []
            for _ in range(B):
                left, row = T - rng.randint(0, 6), []
                while left > 0:
                    row.append(min(left, rng.randint(1, 30)))
                    left -= row[-1]
                rows.append(row)
            inputs = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(rng.randint(0, 9999)))
            targets = inputs.roll(-1, 1)
            supervised = torch.tensor(sorted(rng.sample(range(B * T), B * T // 2)))
            batches.append({"inputs": inputs, "targets": targets, "supervised_index": supervised,
                            "num_supervised": len(supervised), "layout": PackedLayout.from_row_lengths(rows, T)})
        steps.append((batches, sum(len(b["supervised_index"]) for b in batches)))
    return steps


def run_steps(model, steps):
    losses, grads = [], []
    for batches, supervised in steps:
        losses.append(accumulate_gradients(model, batches, supervised).item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    return losses, grads


def test_twenty_steps_of_changing_rows_compile_a_fixed_handful_of_graphs():
    eager, compiled = tiny_model(seed=3), tiny_model(seed=3)
    for model in (eager, compiled):
        model.attention_kernel = "loop"
    backend = CountingBackend()
    compiled.compile_for_training(backend=backend)
    steps = packed_steps(20, compiled.config.vocab_size)
    run_steps(compiled, steps[:5])
    after_five = backend.graphs
    losses, grads = run_steps(compiled, steps)
    # the block's 4 pieces around the eager attention, for one row and for several (torch
    # specialises a size of 1), and the loss: 9, whatever the layouts
    assert 0 < after_five <= 10
    assert backend.graphs == after_five  # the other 15 layouts reuse them
    eager_losses, eager_grads = run_steps(eager, steps)
    assert losses == pytest.approx(eager_losses, rel=1e-6)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_after_the_warm_up_training_and_validation_compile_nothing_more(monkeypatch):
    from sciassist.train.step import evaluate_loss
    backend = CountingBackend()
    original = type(tiny_model()).compile_for_training
    monkeypatch.setattr(type(tiny_model()), "compile_for_training", lambda self: original(self, backend=backend))
    model = tiny_model(seed=4)
    model.attention_kernel = "loop"
    assert setup.compile_model(model, TrainSettings(compile=True), torch.device("cpu"), precision_for("cpu", "float32"))
    warmed = backend.graphs
    assert warmed > 0 and model.training and all(p.grad is None for p in model.parameters())
    steps = packed_steps(20, model.config.vocab_size, seed=2)
    run_steps(model, steps)
    evaluate_loss(model, [b for batches, _ in steps[:3] for b in batches])
    assert backend.graphs == warmed


def test_compiling_keeps_the_state_dict_and_uncompile_restores_eager():
    model = tiny_model()
    keys = list(model.state_dict())
    model.compile_for_training(backend=CountingBackend())
    assert list(model.state_dict()) == keys  # nothing wrapped: checkpoints unchanged
    model.uncompile()
    assert all(block._compiled_call_impl is None and block.attn.eager_attention is None
               for block in model.transformer.h)


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("no C++ compiler here\nsecond line")


def test_a_failed_compile_falls_back_by_default_and_is_an_error_when_asked(monkeypatch, capsys):
    original = type(tiny_model()).compile_for_training
    monkeypatch.setattr(type(tiny_model()), "compile_for_training",
                        lambda self: original(self, backend=failing_backend))
    precision = precision_for("cpu", "float32")
    model = tiny_model()
    model.attention_kernel = "loop"
    with pytest.raises(TrainError, match=r"--compile: torch.compile failed on cpu \(torch .*\): "
                                         r"RuntimeError: no C\+\+ compiler here$"):
        setup.compile_model(model, TrainSettings(compile=True), torch.device("cpu"), precision)
    assert all(block._compiled_call_impl is None for block in model.transformer.h)
    assert setup.compile_by_default(torch.device("cpu")) is False and setup.compile_by_default(torch.device("cuda"))
    monkeypatch.setattr(setup, "compile_by_default", lambda device: True)  # as on CUDA
    assert setup.compile_model(model, TrainSettings(), torch.device("cpu"), precision) is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "note: torch.compile failed on cpu" in err and "training without it" in err
    assert all(p.grad is None for p in model.parameters())
    assert setup.compile_model(model, TrainSettings(compile=False), torch.device("cpu"), precision) is False


def test_inductor_on_cpu_trains_the_same_numbers():
    """The real compiler (inductor, C++ on CPU): one warm-up, then the same losses as eager."""
    eager, compiled = tiny_model(seed=5), tiny_model(seed=5)
    for model in (eager, compiled):
        model.attention_kernel = "loop"
    assert setup.compile_model(compiled, TrainSettings(compile=True), torch.device("cpu"),
                               precision_for("cpu", "float32"))
    steps = packed_steps(3, compiled.config.vocab_size, seed=1)
    losses, _ = run_steps(compiled, steps)
    assert losses == pytest.approx(run_steps(eager, steps)[0], rel=1e-4)

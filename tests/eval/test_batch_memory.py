"""The evaluator's batches on a card that runs out of memory (tests/simulated_card.py): --batch_size
auto halves once and keeps the size that fitted, the answers are those of an unconstrained run, and
an evaluation where even a batch of 1 does not fit stops with one error line and exit code 2."""

import pytest

from sciassist.common import AUTO, precision_for
from sciassist.eval import models
from sciassist.eval import run as ev
from sciassist.eval.models import run_model
from sciassist.eval.run import RunOptions
from sciassist.eval.scoring import AUTO_BATCH_SIZE, BatchSize, batches_of, generate_answers
from tests.conftest import nontrivial_gpt
from tests.eval.stubs import record
from tests.simulated_card import GB, simulated_card

QUESTIONS = 40  # more than AUTO_BATCH_SIZE: the first batch is a full one


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return nontrivial_gpt(tiny_tokenizer.get_vocab_size(), seed=3, projection_std=0.2).eval()


@pytest.fixture(scope="module")
def records():
    return [record(str(i), i % 3, k=2 + i % 4) for i in range(QUESTIONS)]


def options(batch_size):
    return RunOptions(batch_size=batch_size, max_new_tokens=6, constrain_answers=True)


def peak(monkeypatch, work):
    """The most bytes `work` holds at once on an unlimited simulated card."""
    with simulated_card(monkeypatch, total=16 * GB) as card:
        work()
    return card.peak


def test_auto_halves_once_keeps_the_size_that_fitted_and_answers_as_an_unconstrained_run(
        model, tiny_tokenizer, records, monkeypatch, one_thread):
    unconstrained = run_model(model, tiny_tokenizer, records, options(32))
    at_16 = peak(monkeypatch, lambda: run_model(model, tiny_tokenizer, records, options(16)))
    at_32 = peak(monkeypatch, lambda: run_model(model, tiny_tokenizer, records, options(32)))
    assert at_16 < at_32
    lines = []
    batches = BatchSize(AUTO, say=lines.append)
    with simulated_card(monkeypatch, total=16 * GB, budget=(at_16 + at_32) // 2) as card:
        halved = run_model(model, tiny_tokenizer, records, options(batches))
    # one failed batch, one line: every later batch (scoring, generation, the constrained
    # pass) starts at the size that fitted instead of finding it again
    assert lines == [f"out of memory at a batch of {AUTO_BATCH_SIZE}; trying 16"]
    assert batches.size == 16 and card.failures == 1 and card.peak <= (at_16 + at_32) // 2
    # the same batches as a run asked for 16: the same numbers, bit for bit
    at_16_run = run_model(model, tiny_tokenizer, records, options(16))
    assert halved["probabilities"] == at_16_run["probabilities"]
    # against batches of 32: the same answers and replies; the probabilities within the
    # rounding of the forward passes' precision (a batch's shape changes the kernels' order of sums)
    for key in ("prediction", "generated", "generated_prediction", "constrained_prediction"):
        assert halved[key] == unconstrained[key], key
    tolerance = 1e-5 if precision_for(model.get_device()).dtype is None else 1e-2
    for got, expected in zip(halved["probabilities"], unconstrained["probabilities"], strict=True):
        assert got == pytest.approx(expected, abs=tolerance)


def test_a_number_given_halves_the_same_way_and_auto_starts_at_the_default():
    assert batches_of(AUTO).size == AUTO_BATCH_SIZE == 32
    assert batches_of(8).size == 8
    given = BatchSize(4)
    assert batches_of(given) is given  # one object carries the size from pass to pass
    parser = ev.build_arg_parser()
    assert parser.parse_args([]).batch_size == AUTO == ev.EvalSettings().batch_size
    assert parser.parse_args(["--batch_size", "8"]).batch_size == 8
    assert parser.parse_args(["--batch_size", "auto"]).batch_size == AUTO
    assert "halved when a batch runs out of memory" in " ".join(parser.format_help().split())


def test_a_batch_size_given_that_does_not_fit_halves_with_a_line(model, tiny_tokenizer, records, monkeypatch,
                                                                 one_thread):
    prompts = [r["messages"] for r in records[:8]]

    def replies(batch_size):
        return generate_answers(model, tiny_tokenizer, prompts, max_tokens=24, batch_size=batch_size)

    at_4, at_8 = (peak(monkeypatch, lambda n=n: replies(n)) for n in (4, 8))
    lines = []
    with simulated_card(monkeypatch, total=16 * GB, budget=(at_4 + at_8) // 2):
        halved = replies(BatchSize(8, say=lines.append))
    assert lines == ["out of memory at a batch of 8; trying 4"]
    assert halved == replies(8) == replies(1)  # greedy replies do not depend on the batch


def test_nothing_fits_one_error_line_with_the_card_and_what_to_try(tiny_base_dir, tmp_path, monkeypatch, capsys):
    real_run_model = models.run_model

    def on_a_full_card(*args, **kwargs):  # the model loads beside the card; its batches run on it
        with simulated_card(monkeypatch, total=16 * GB, free=15 * GB, budget=1000):
            return real_run_model(*args, **kwargs)

    monkeypatch.setattr(models, "run_model", on_a_full_card)
    code = ev.main(["--base", str(tiny_base_dir / "base_checkpoints" / "d2"), "--scienceqa", "sample", "--limit", "2",
                    "--device", "cpu", "--out_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "out of memory at a batch of 2; trying 1" in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0]
    assert errors[0].startswith("error: out of memory on Simulated GPU (16.0 GB, 15.0 GB free): a batch of 1 does "
                                "not fit (CUDA out of memory.")
    assert errors[0].endswith("try a shorter --max_new_tokens, another card, or --device cpu")
    assert not (tmp_path / "out" / "results.json").exists()

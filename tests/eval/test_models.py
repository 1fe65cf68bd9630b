import pytest

from sciassist.eval.models import run_model
from sciassist.eval.questions import EvaluationError
from sciassist.eval.run import RunOptions
from tests.eval.stubs import choice_record, make_stub


def test_choice_scoring_in_run_model_and_its_errors():
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0, "C": 4.0}, merged_letters=())
    records = [choice_record(["B", "C"], answer=1), choice_record(["C", "B"], answer=0)]
    run = run_model(model, tok, records, RunOptions(generate=False, scoring="choice"))
    assert run["prediction"] == [1, 0]  # the option whose text is C, wherever it stands
    assert all(sum(p) == pytest.approx(1.0) for p in run["probabilities"])
    assert set(run["timing"]) == {"scoring_s", "scoring_questions_per_s"}
    assert run_model(model, tok, records, RunOptions(generate=False))["prediction"] == [0, 0]  # letter: A both times
    with pytest.raises(EvaluationError, match="scoring must be one of"):
        run_model(model, tok, records, RunOptions(generate=False, scoring="words"))


@pytest.mark.parametrize("options, message", [
    (RunOptions(batch_size=0), "batch_size must be a whole number >= 1, got 0"),
    (RunOptions(batch_size=-1), "batch_size must be a whole number >= 1, got -1"),
    (RunOptions(max_new_tokens=-5), "max_new_tokens must be a whole number >= 1, got -5"),
    (RunOptions(sample_indices=(0,), sample_max_tokens=0, generate=False), "sample_max_tokens must be a whole"),
])
def test_run_model_refuses_counts_out_of_range_before_any_work(options, message):
    # batch_size -1 used to give every generated answer as None; 0 a traceback
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0}, merged_letters=())
    with pytest.raises(EvaluationError, match=message):
        run_model(model, tok, [choice_record(["B", "C"])], options)
    assert model.calls == 0


def test_scoring_and_generation_refuse_bad_counts():
    from sciassist.eval.scoring import generate_answers, letter_probabilities
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0}, merged_letters=())
    prompt = choice_record(["B", "C"])["messages"]
    with pytest.raises(EvaluationError, match="batch_size must be a whole number >= 1, got -1"):
        letter_probabilities(model, tok, [prompt], [2], batch_size=-1)
    with pytest.raises(EvaluationError, match="max_tokens must be a whole number >= 1, got 0"):
        generate_answers(model, tok, [prompt], max_tokens=0)
    with pytest.raises(EvaluationError, match="batch_size must be a whole number >= 1, got 0"):
        generate_answers(model, tok, [prompt], batch_size=0)


def test_constrained_answers_beside_choice_scoring_in_run_model():
    # after " ", A (2.0) beats B (1.0): the constrained line starts " A." and stays there,
    # while choice scoring prefers the line whose option text is C
    tok, model = make_stub({}, {"A": 2.0, "B": 1.0, "C": 4.0}, merged_letters=())
    records = [choice_record(["B", "C"], answer=1), choice_record(["C", "B"], answer=0)]
    run = run_model(model, tok, records, RunOptions(generate=False, scoring="choice", constrain_answers=True))
    assert run["prediction"] == [1, 0]
    assert run["constrained_prediction"] == [0, 0]
    assert run["timing"]["constrained_s"] < 1.0
    calls = model.calls
    letter = run_model(model, tok, records, RunOptions(generate=False, scoring="letter", constrain_answers=True))
    assert letter["constrained_prediction"] == [0, 0] and model.calls > calls
    assert run_model(model, tok, records, RunOptions(generate=False))["constrained_prediction"] is None

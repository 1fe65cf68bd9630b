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

import pytest

from sciassist.common import write_json
from sciassist.eval import report
from sciassist.eval.questions import EvaluationError
from tests.eval.stubs import record


def test_results_format_round_trip(tmp_path):
    records = [record("p1", 0), record("p2", 1), record("p3", 2), record("p4", 1)]
    data = report.results_data(records, [0, 2, 2, None], outputs=["a", "b", "c", "d"])
    assert data["results"] == {"p1": 0, "p2": 2, "p3": 2, "p4": -1}
    assert (data["correct"], data["count"]) == (2, 4)
    assert data["acc"] == 100 * data["correct"] / data["count"] == 50.0
    path = write_json(tmp_path / "r.json", data)
    assert report.read_results_file(path) == data
    data["acc"] = 60.0
    write_json(path, data)
    with pytest.raises(EvaluationError, match="acc"):
        report.read_results_file(path)


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object"),
    ('"acc correct count results"', "expected a JSON object"),
    ('{"acc": "50", "correct": 1, "count": 2, "results": {"a": 0, "b": 1}}', "'acc' must be a number, got '50'"),
    ('{"acc": 50, "correct": null, "count": 2, "results": {"a": 0, "b": 1}}', "'correct' must be a number"),
])
def test_read_results_file_refuses_the_wrong_types(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(EvaluationError, match=message):
        report.read_results_file(path)

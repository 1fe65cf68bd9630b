import pytest

from sciassist.eval import table as tb
from tests.eval.stubs import record


def test_wilson_interval_matches_hand_computation():
    lo, hi = tb.wilson_interval(8, 10)
    # p=0.8, z^2=3.8415: center=(0.8+0.19207)/1.38415, half=1.95996*sqrt(0.016+0.0096037)/1.38415
    assert (lo, hi) == (pytest.approx(0.49016, abs=1e-4), pytest.approx(0.94332, abs=1e-4))
    lo, hi = tb.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    assert tb.wilson_interval(0, 0) is None


def test_chance_accuracy_is_mean_of_one_over_k():
    assert tb.chance_accuracy([2, 3, 4]) == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert tb.chance_accuracy([2, 2]) == 0.5
    assert tb.chance_accuracy([]) is None


def test_question_columns_follow_the_official_definitions():
    meta = record("1", 0, subject="natural science", grade="grade7", has_hint=True, has_image=True)["meta"]
    assert tb.question_columns(meta) == ["NAT", "TXT", "IMG", "G7-12", "Avg"]
    meta = record("2", 0, subject="language science", grade="grade2", has_hint=False, has_image=False)["meta"]
    assert tb.question_columns(meta) == ["LAN", "NO", "G1-6", "Avg"]
    # unknown image: TXT can be known, NO cannot
    assert tb.question_columns(record("3", 0, has_hint=False)["meta"]) == ["Avg"]


def test_table_cell_counts_and_na():
    records = [record("1", 0, k=2, subject="natural science", has_hint=True, has_image=False),
               record("2", 1, k=4, subject="natural science", has_hint=False, has_image=False),
               record("3", 2, k=3)]  # no metadata at all
    table = tb.build_table(records, {"model": [0, 0, 2]})
    model = table["rows"][0]["cells"]
    assert table["counts"]["NAT"] == 2 and model["NAT"]["correct"] == 1 and model["NAT"]["accuracy"] == 50.0
    assert model["SOC"] == {"correct": 0, "count": 0, "accuracy": None, "ci95": None}
    assert model["Avg"]["count"] == 3 and model["Avg"]["accuracy"] == pytest.approx(200 / 3)
    assert model["Avg"]["ci95"] == pytest.approx([100 * x for x in tb.wilson_interval(2, 3)])
    chance = table["rows"][1]
    assert chance["name"] == "chance"
    assert chance["cells"]["NAT"]["accuracy"] == pytest.approx(100 * (1 / 2 + 1 / 4) / 2)
    assert chance["cells"]["G1-6"]["accuracy"] is None
    assert table["known"]["subject"] == 2 and table["known"]["total"] == 3
    text = tb.format_table_text(table)
    assert "n/a" in text.splitlines()[2]
    markdown = tb.format_table_markdown(table)
    assert "| questions | 2 | n/a |" in markdown


def test_none_prediction_counts_wrong_and_majority_respects_choices():
    records = [record("1", 0, k=2), record("2", 2, k=3), record("3", 2, k=4)]
    assert tb.majority_predictions(records, {"A": 1, "C": 9, "B": 3}) == [1, 2, 2]
    table = tb.build_table(records, {"m": [None, 2, 1]}, chance=False)
    assert table["rows"][0]["cells"]["Avg"]["correct"] == 1
    topics = tb.topic_breakdown(records, {"m": [None, 2, 1]})
    assert topics == [{"topic": "(unknown)", "count": 3, "accuracy": {"m": pytest.approx(100 / 3)}}]


def test_generation_summary_valid_rate_and_agreement():
    records = [record("1", 0), record("2", 1), record("3", 2), record("4", 0)]
    run = {"prediction": [0, 1, 1, 2], "generated_prediction": [0, None, 1, 0]}
    summary = tb.generation_summary(records, run)
    assert (summary["valid"], summary["invalid"], summary["count"]) == (3, 1, 4)
    assert summary["accuracy"] == 0.5          # questions 1 and 4; the invalid one counts wrong
    assert summary["agreement"] == 0.5         # questions 1 and 3 agree with letter scoring
    assert summary["agreement_among_valid"] == pytest.approx(2 / 3)
    assert tb.generation_summary(records, {"prediction": [0] * 4, "generated_prediction": None}) is None

"""Benchmarks beyond ScienceQA (sciassist.eval.benchmarks) and their scoring and report
(sciassist.eval.transfer): small local copies the tests write in the hub's columns, a hub
stand-in with the installed `datasets.load_dataset` signature, the shared real copies when
they are there, and an end-to-end evaluation."""

import inspect
import json
from pathlib import Path

import datasets
import pytest

from sciassist.eval import benchmarks as bm
from sciassist.eval import run as ev
from sciassist.eval import transfer
from sciassist.eval.questions import EvaluationError
from tests.eval.stubs import finetuned_dir_from

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"


def arc_rows():
    return {"id": ["q1", "q2", "q3", "q4"],
            "question": ["Which is a gas?", "What do plants need?", "Which planet is largest?", "Pick the metal."],
            "choices": [{"text": ["water", "steam", "ice"], "label": ["A", "B", "C"]},
                        {"text": ["light", "sand", "plastic", "glass"], "label": ["1", "2", "3", "4"]},
                        {"text": ["Mars", "Earth", "Jupiter", "Venus", "Mercury"], "label": ["A", "B", "C", "D", "E"]},
                        {"text": ["wood", "iron", "wool", "paper"], "label": ["A", "B", "C", "D"]}],
            "answerKey": ["B", "1", "C", "B"]}


def write_root(root):
    """A local root with the shared folders' layout: ARC-Easy and SciQ as `datasets` folders,
    OpenBookQA as JSONL, two MMLU subjects."""
    datasets.Dataset.from_dict(arc_rows()).save_to_disk(str(root / "ai2_arc" / "ARC-Easy" / "validation"))
    obqa = root / "openbookqa" / "main" / "validation.jsonl"
    obqa.parent.mkdir(parents=True)
    obqa.write_text("\n".join(json.dumps({"id": f"o{i}", "question_stem": f"Stem {i}?",
                                          "choices": {"text": ["yes", "no", "maybe", "never"],
                                                      "label": ["A", "B", "C", "D"]},
                                          "answerKey": "ABCD"[i % 4]}) for i in range(5)) + "\n")
    datasets.Dataset.from_dict({
        "question": ["What pulls things down?", "What do we breathe?", "Which is west?"],
        "distractor1": ["magnetism", "helium", "west"], "distractor2": ["friction", "neon", "north"],
        "distractor3": ["light", "argon", "south"], "correct_answer": ["gravity", "oxygen", "west"],
        "support": ["", "", ""]}).save_to_disk(str(root / "sciq" / "validation"))
    sizes = {"anatomy": [0, 3], "astronomy": [1, 2, 2]}
    for subject in bm.MMLU_SCIENCE:
        answers = sizes.get(subject, [1])
        datasets.Dataset.from_dict({
            "question": [f"{subject} question {i}?" for i in range(len(answers))],
            "subject": [subject] * len(answers),
            "choices": [[f"{subject} option {k} of {i}" for k in range(4)] for i in range(len(answers))],
            "answer": answers}).save_to_disk(str(root / "mmlu" / subject / "validation"))
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_root(tmp_path_factory.mktemp("benchmarks"))


def one(name):
    return bm.parse_benchmarks(name)[0]


def test_parse_benchmarks():
    assert [b.name for b in bm.parse_benchmarks("arc_easy, sciq,mmlu:anatomy,mmlu_science")] == \
        ["arc_easy", "sciq", "mmlu:anatomy", "mmlu_science"]
    assert one("mmlu:anatomy").subjects == ("anatomy",) and one("mmlu").subjects == bm.MMLU_SUBJECTS
    assert len(bm.MMLU_SUBJECTS) == 57 and sum(len(g) for g in bm.MMLU_GROUPS.values()) == 57
    assert set(bm.MMLU_SCIENCE) <= set(bm.MMLU_SUBJECTS) and bm.parse_benchmarks("") == []
    with pytest.raises(EvaluationError, match="unknown benchmark 'arc'.*arc_easy"):
        bm.parse_benchmarks("arc")
    with pytest.raises(EvaluationError, match="no MMLU subject 'astrology'"):
        bm.parse_benchmarks("mmlu:astrology")
    with pytest.raises(EvaluationError, match="names sciq more than once"):
        bm.parse_benchmarks("sciq,sciq")


def test_local_folders_and_jsonl_become_scienceqa_style_questions(root):
    records, info = bm.load_benchmark(one("arc_easy"), "val", root)
    assert info["count"] == 4 and info["split"] == "validation" and info["kind"] == "transfer"
    assert [r["meta"]["answer"] for r in records] == [1, 0, 2, 1]  # letters and ARC's digit keys
    assert [len(r["meta"]["choices"]) for r in records] == [3, 4, 5, 4]
    assert records[1]["meta"]["pid"] == "arc_easy:q2" and records[1]["meta"]["answer_letter"] == "A"
    user = records[0]["messages"][1]["content"]
    assert user == "Which is a gas?\n\nA. water\nB. steam\nC. ice"
    assert records[0]["messages"][0]["role"] == "system"
    assert records[0]["messages"][-1] == {"role": "assistant", "content": "The correct answer is B. steam"}
    obqa, info = bm.load_benchmark(one("openbookqa"), "val", root)
    assert info["source"].endswith("validation.jsonl") and [r["meta"]["answer"] for r in obqa] == [0, 1, 2, 3, 0]
    mmlu, info = bm.load_benchmark(one("mmlu_science"), "val", root)
    assert info["count"] == 14 and info["source"].startswith("11 subjects from")
    assert [r["meta"]["topic"] for r in mmlu[:6]] == ["other", "other", "STEM", "STEM", "STEM", "STEM"]
    assert [r["meta"]["answer"] for r in mmlu[:5]] == [0, 3, 1, 2, 2]
    assert bm.load_benchmark(one("mmlu:astronomy"), "val", root, limit=2)[1]["selection"] == "seeded subset (seed 42)"


def test_sciq_order_is_fixed_by_the_seed_and_repeated_options_are_counted(root):
    records, info = bm.load_benchmark(one("sciq"), "val", root)
    assert info["count"] == 2 and info["available"] == 3 and info["skipped"] == {"an option repeated": 1}
    for r in records:
        assert r["meta"]["choices"][r["meta"]["answer"]] in ("gravity", "oxygen")
    again, _ = bm.load_benchmark(one("sciq"), "val", root)
    assert [r["meta"]["choices"] for r in again] == [r["meta"]["choices"] for r in records]
    orders = {tuple(bm.load_benchmark(one("sciq"), "val", root, seed=s)[0][0]["meta"]["choices"]) for s in range(6)}
    assert len(orders) > 1  # another seed, another order


def test_a_bad_record_is_named_by_benchmark_split_id_and_field(tmp_path):
    rows = arc_rows()
    rows["answerKey"][2] = "F"
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ai2_arc" / "ARC-Challenge" / "validation"))
    with pytest.raises(EvaluationError, match=r"arc_challenge validation: record q3: field 'answerKey' 'F' is not one "
                                              r"of the labels \['A', 'B', 'C', 'D', 'E'\]"):
        bm.load_benchmark(one("arc_challenge"), "val", tmp_path)
    with pytest.raises(EvaluationError, match="neither .*ai2_arc/ARC-Easy/test .*nor .*test.jsonl exists"):
        bm.load_benchmark(one("arc_easy"), "test", tmp_path)
    bad = tmp_path / "openbookqa" / "main" / "validation.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"id": "o1"}\n')
    with pytest.raises(EvaluationError, match="record o1: field 'question_stem' must be a non-empty string"):
        bm.load_benchmark(one("openbookqa"), "val", tmp_path)
    bad.write_text('{"id": "o1"}\n[1]\n')
    with pytest.raises(EvaluationError, match="validation.jsonl:2: expected a JSON object, got list"):
        bm.load_benchmark(one("openbookqa"), "val", tmp_path)
    bad.write_text('{"id": "o1", \n')
    with pytest.raises(EvaluationError, match="validation.jsonl:1: invalid JSON"):
        bm.load_benchmark(one("openbookqa"), "val", tmp_path)


def test_the_hub_path_asks_for_the_pinned_revision(monkeypatch, root):
    """A stand-in for datasets.load_dataset that binds its arguments to the installed
    signature (datasets 4.0 on Colab, 5.x here) and serves the local rows."""
    real_signature = inspect.signature(datasets.load_dataset)
    calls = []

    def stand_in(*args, **kwargs):
        bound = real_signature.bind(*args, **kwargs)
        calls.append(dict(bound.arguments))
        path, name, split = bound.arguments["path"], bound.arguments.get("name"), bound.arguments["split"]
        local = {("allenai/ai2_arc", "ARC-Easy"): root / "ai2_arc" / "ARC-Easy" / split,
                 ("cais/mmlu", "anatomy"): root / "mmlu" / "anatomy" / split}[(path, name)]
        return datasets.load_from_disk(str(local))

    monkeypatch.setattr(datasets, "load_dataset", stand_in)
    records, info = bm.load_benchmark(one("arc_easy"), "val")
    assert len(records) == 4 and info["source"] == "hf:allenai/ai2_arc@210d026faf99"
    assert calls[-1] == {"path": "allenai/ai2_arc", "name": "ARC-Easy", "split": "validation",
                         "revision": bm.REVISIONS["allenai/ai2_arc"]}
    records, _ = bm.load_benchmark(one("mmlu:anatomy"), "val", revision="main")
    assert calls[-1]["revision"] == "main" and [r["meta"]["answer"] for r in records] == [0, 3]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/sciq' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EvaluationError, match="sciq: cannot read allenai/sciq .* ConnectionError.*--benchmark_dir"):
        bm.load_benchmark(one("sciq"), "val")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared benchmark copies are not at {SHARED}")
def test_the_shared_copies_load_with_their_known_sizes_and_answers():
    expected = {"arc_easy": (570, 570), "arc_challenge": (299, 299), "openbookqa": (500, 500), "sciq": (1000, 998)}
    loaded = {}
    for name, (available, count) in expected.items():
        records, info = bm.load_benchmark(one(name), "val", SHARED)
        assert (info["available"], info["count"]) == (available, count), name
        loaded[name] = {r["meta"]["pid"]: r["meta"] for r in records}
    assert loaded["arc_easy"]["arc_easy:MCAS_2000_4_6"]["answer_letter"] == "A"
    digit = loaded["arc_easy"]["arc_easy:NYSEDREGENTS_2014_8_10"]  # answerKey "1"
    assert digit["answer"] == 0 and digit["choices"][0] == "obtain energy"
    assert loaded["arc_easy"]["arc_easy:TIMSS_1995_8_J5"]["choices"][4] == "Radio waves"  # 5 options
    assert loaded["arc_challenge"]["arc_challenge:Mercury_SC_407695"]["answer_letter"] == "D"
    assert len(loaded["arc_challenge"]["arc_challenge:NYSEDREGENTS_2014_4_4"]["choices"]) == 3
    assert loaded["openbookqa"]["openbookqa:8-376"]["choices"][0] == "Deep sea animals"
    records, info = bm.load_benchmark(one("mmlu"), "test", SHARED)
    assert info["available"] == 14042 and info["count"] == 14033  # 9 with a repeated option
    first = next(r["meta"] for r in records if r["meta"]["pid"] == "mmlu:anatomy-0")
    assert first["answer"] == 0 and first["choices"][0] == "paralysis of the facial muscles."


# ----------------------------------------------------------------------------- scoring rules and statistics

def test_paired_change():
    change = transfer.paired_change([0, 0, 1, 1] * 25, [1, 1, 1, 1] * 25)
    assert change["difference"] == pytest.approx(50.0) and change["improved"] == 50 and change["worsened"] == 0
    assert change["beyond_noise"] and change["ci95"][0] > 35
    same = transfer.paired_change([0, 1] * 10, [1, 0] * 10)
    assert same["difference"] == 0 and not same["beyond_noise"] and same["ci95"][0] < 0 < same["ci95"][1]
    assert transfer.paired_change([], []) is None


def test_length_normalised_choice_scoring_undoes_the_short_option_bias(monkeypatch, tiny_base_dir):
    """Option A is short (each token -2); option B is long (-3 in all): summed scores favour
    the short line, per token and per character pick B."""
    from nanochat.checkpoint import load_model_from
    model, tokenizer, _ = load_model_from(tiny_base_dir, "base", device="cpu")
    records, _ = bm.load_benchmark(one("arc_easy"), "val", write_root(tiny_base_dir.parent / "bias"))
    records = records[3:4]
    records[0]["meta"]["choices"] = ["x", "a very much longer option", "yyyyyyyy", "zzzzzzzz"]
    short, long = tokenizer.encode(" A. x"), tokenizer.encode(" B. a very much longer option")
    lines = [short, long, short, short]
    assert 3 * len(short) < 2 * len(long)  # so that B's mean per token beats A's
    monkeypatch.setattr(transfer, "choice_token_scores", lambda *a, **k: (
        [lines], [[[-2.0 / len(short)] * len(short), [-3.0 / len(long)] * len(long), [-9.0], [-9.0]]]))
    run = transfer.benchmark_run(model, tokenizer, records, generate=False)
    # summed: -2 vs -3; per token: -2/len(short) vs -3/len(long); per character: -2/1 vs -3/25
    assert run["choice"] == [0] and run["choice_per_token"] == [1] and run["choice_per_char"] == [1]
    assert len(run["letter"]) == 1 and "generated" not in run and run["timing_s"] >= 0


def test_benchmark_summary_values():
    records = [{"meta": {"answer": a, "choices": c}} for a, c in
               (([0, ["a", "bbb", "cc"]]), (1, ["aaa", "b"]), (2, ["aa", "bb", "c", "dddd"]), (0, ["x", "yy"]))]
    runs = {"base": {"letter": [0, 0, 0, 1], "generated": [0, None, None, 1], "timing_s": 1.0, "headline": "letter"},
            "finetuned": {"letter": [0, 1, 2, 0], "generated": [0, 1, 2, None], "timing_s": 2.0,
                          "headline": "letter"}}
    s = transfer.benchmark_summary({"benchmark": "x", "title": "X", "kind": "transfer", "split": "validation"},
                                   records, runs)
    assert s["chance"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 4 + 1 / 2) / 4)
    assert s["models"]["base"]["letter"]["accuracy"] == 25 and s["models"]["finetuned"]["letter"]["accuracy"] == 100
    assert s["models"]["base"]["generated"]["invalid"] == 50 and s["models"]["finetuned"]["generated"]["invalid"] == 25
    assert s["models"]["base"]["letter"]["picks_shortest"] == 25  # question 1 ("a")
    assert s["models"]["finetuned"]["letter"]["picks_shortest"] == 100 and s["gold_is_shortest"] == 100
    assert s["change"]["letter"]["difference"] == 75 and s["change"]["letter"]["improved"] == 3
    lines = transfer.benchmarks_markdown([s])
    assert any(line.startswith("| transfer | X | validation | 4 | letter | 39.6 | 25.0 [") and "| better |" in line
               and line.endswith("| 50.0 / 25.0 |") for line in lines)


@pytest.mark.slow
def test_evaluate_with_benchmarks_end_to_end(tiny_base_dir, tmp_path, root):
    run = finetuned_dir_from(tiny_base_dir, tmp_path)
    out = tmp_path / "out"
    summary = ev.evaluate(ev.EvalSettings(
        base=str(tiny_base_dir / "base_checkpoints" / "d2"), finetuned=str(run), scienceqa="sample", limit=4,
        device="cpu", max_new_tokens=4, num_samples=0, benchmarks="mmlu_science,arc_easy,sciq",
        benchmark_dir=str(root), out_dir=str(out)))
    rows = summary["benchmarks"]
    assert [r["benchmark"] for r in rows] == ["scienceqa", "mmlu_science", "arc_easy", "sciq"]
    assert [r["count"] for r in rows] == [4, 4, 4, 2]  # --limit 4 is a seeded subset of each
    for r in rows[1:]:
        for name in ("base", "finetuned"):
            assert set(transfer.RULES) <= set(r["models"][name])
            assert 0 <= r["models"][name]["letter"]["accuracy"] <= 100
        # the same weights on both sides: no change on any rule, within noise
        assert all(c["difference"] == 0 and not c["beyond_noise"] for c in r["change"].values())
    assert rows[1]["groups"] and not rows[2]["groups"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["benchmark"] for r in saved["benchmarks"]] == ["scienceqa", "mmlu_science", "arc_easy", "sciq"]
    report = (out / "report.md").read_text()
    section = report[report.index("## Beyond ScienceQA"):]
    order = [section.index(f"| {kind} | {title} |") for kind, title in
             (("ScienceQA", "ScienceQA (letter scoring)"), ("transfer", "ARC-Easy"), ("transfer", "SciQ"),
              ("forgetting", "MMLU science"))]
    assert order == sorted(order)
    assert "within noise" in section and "choice per character (acc_norm)" in section and "by subject group" in section
    assert (out / "benchmarks.png").stat().st_size > 1000


def test_a_text_first_fine_tune_is_asked_and_scored_in_its_own_format(tiny_base_dir, root):
    """The benchmarks are written as the evaluated ScienceQA questions are (system prompt or
    none, the answer format); text_first answers name the option before the letter, so letter
    scoring does not apply and choice per character is the headline."""
    from nanochat.checkpoint import load_model_from
    from sciassist.data import scienceqa as sqa
    sqa_record = sqa.format_record({"pid": "1", "question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1,
                                    "hint": "", "image": None, "lecture": "", "solution": ""},
                                   sqa.FormatOptions(system_prompt="", answer_format="text_first"))
    asked = ev.benchmark_format([sqa_record], "text_first")
    assert asked.system_prompt == "" and asked.answer_format == "text_first" and asked.options_layout == "letter_first"
    records, _ = bm.load_benchmark(one("arc_easy"), "val", root, options=asked)
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"]
    assert records[0]["messages"][-1]["content"] == "The correct answer is steam (B)."
    model, tokenizer, _ = load_model_from(tiny_base_dir, "base", device="cpu")
    run = transfer.benchmark_run(model, tokenizer, records, max_new_tokens=4, answer_format="text_first")
    assert "letter" not in run and run["headline"] == "choice_per_char"
    assert {"choice", "choice_per_token", "choice_per_char", "generated"} <= set(run)
    summary = transfer.benchmark_summary({"benchmark": "arc_easy", "title": "ARC-Easy", "kind": "transfer",
                                          "split": "validation"}, records, {"base": run})
    assert summary["headline"] == "choice_per_char" and "letter" not in summary["models"]["base"]
    assert any("| choice per character (acc_norm) |" in line for line in transfer.benchmarks_markdown([summary]))


def test_the_seconds_spent_leave_out_loading_and_rates():
    from sciassist.eval.transfer import seconds_spent
    timing = {"scoring_s": 18.8, "scoring_questions_per_s": 53.1, "generate_s": 31.5, "generate_questions_per_s": 31.7,
              "load_s": 0.4}
    assert seconds_spent(timing) == pytest.approx(50.3)

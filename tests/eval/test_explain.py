"""--explain: the ScienceQA paper's explanation metrics, the texts they compare, and the whole
pass through sciassist_evaluate.py."""

import json
import math
import sys
from types import SimpleNamespace

import pytest

from sciassist.data.scienceqa import FormatOptions, format_record
from sciassist.eval import explain as ex
from sciassist.eval import run as ev
from tests.eval.stubs import StubTokenizer, finetuned_dir_from

LECTURE = "Roots take in water. Leaves make food."
SOLUTION = "The roots grow into the soil."


def raw_question(**overrides):
    """A raw ScienceQA record (the fields sciassist.data.scienceqa.format_record reads)."""
    record = {"pid": "q1", "split": "val", "question": "Which part takes in water?",
              "choices": ["the roots", "the leaves"], "answer": 0, "hint": "", "has_image": False,
              "caption": None, "lecture": LECTURE, "solution": SOLUTION}
    record.update(overrides)
    return record


# ----------------------------------------------------------------------------- the texts compared

def test_reference_text_from_meta_or_from_the_reference_reply():
    formatted = format_record(raw_question())
    assert ex.reference_text(formatted) == LECTURE + " " + SOLUTION
    without_meta = {"messages": formatted["messages"], "meta": {"choices": ["a", "b"], "answer": 0}}
    assert ex.reference_text(without_meta) == LECTURE + " " + SOLUTION  # read from Explanation/Background
    answer_only = format_record(raw_question(), FormatOptions(include_explanation=False, include_background=False))
    assert answer_only["messages"][-1]["content"] == "The correct answer is A. the roots"
    assert ex.reference_text(answer_only) == LECTURE + " " + SOLUTION  # the meta still carries them
    assert ex.reference_text(format_record(raw_question(lecture=""))) == SOLUTION
    assert ex.reference_text(format_record(raw_question(solution=""))) == ""  # no solution: nothing to judge
    assert ex.reference_text({"messages": answer_only["messages"], "meta": {}}) == ""


def test_explanation_text_of_tutor_replies():
    for answer_format in ("letter_first", "text_first"):
        reply = format_record(raw_question(), FormatOptions(answer_format=answer_format))["messages"][-1]["content"]
        assert ex.explanation_text(reply) == LECTURE + " " + SOLUTION  # Background first, as the reference
    assert ex.explanation_text("The correct answer is A. the roots") == ""
    assert ex.explanation_text("The correct answer is A. the roots\n") == ""
    assert ex.explanation_text("The correct answer is A.\n\nExplanation: Roots drink.") == "Roots drink."
    assert ex.explanation_text("The correct answer is A.\nBackground: Plants.\nExplanation: Roots.") == \
        "Plants. Roots."
    assert ex.explanation_text("The correct answer is A.\nRoots drink\nwater.") == "Roots drink\nwater."


def test_explain_indices_are_the_first_questions_with_a_solution():
    records = [format_record(raw_question(pid=str(i), solution="" if i in (0, 2) else SOLUTION)) for i in range(6)]
    assert ex.explain_indices(records, 3) == (1, 3, 4)
    assert ex.explain_indices(records, 10) == (1, 3, 4, 5)
    assert ex.explain_indices(records, 0) == ()


# ----------------------------------------------------------------------------- the metrics, by hand

def test_tokenize_splits_at_whitespace_and_periods():
    assert ex.tokenize("a.b  c.") == ["a", "b", "c"]
    assert ex.bleu("a b c", "a.b  c.", 1) == pytest.approx(1.0)


def test_bleu1_with_brevity_penalty_and_clipping():
    # 3 hypothesis tokens, all in the 4-token reference: precision 1, brevity penalty exp(1 - 4/3)
    assert ex.bleu("the cat sat down", "the cat sat", 1) == pytest.approx(math.exp(1 - 4 / 3))
    # "the" counts once (clipped): precision 1/3; the hypothesis is longer, so no penalty
    assert ex.bleu("the cat", "the the the", 1) == pytest.approx(1 / 3)
    assert ex.bleu("the cat", "", 1) == 0.0


def test_bleu4_all_matches_and_no_4gram_match():
    assert ex.bleu("a b c d e", "a b c d e", 4) == pytest.approx(1.0)
    # 1-grams 4/5, 2-grams 2/4, 3-grams 1/3, 4-grams 0/2; without smoothing nltk puts the
    # smallest float for the missing order (what the paper's script gets)
    by_hand = math.exp(0.25 * (math.log(4 / 5) + math.log(2 / 4) + math.log(1 / 3) + math.log(sys.float_info.min)))
    assert ex.bleu("a b c d e", "a b c x e", 4) == pytest.approx(by_hand, rel=1e-9)
    assert ex.bleu("a b c d e", "a b c x e", 4) < 1e-70


def test_rouge_l_f_from_the_lcs_in_the_papers_argument_order():
    # one sentence each: LCS "the cat on mat" = 4; the package counts distinct words:
    # 5 in the target ("the" twice), 6 in the prediction; F = 2PR / (P + R + 1e-8)
    p, r = 4 / 5, 4 / 6
    assert ex.rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 * p * r / (p + r + 1e-8))
    # summary-level ROUGE-L is not symmetric: the prediction's sentence "a c" against the
    # target's sentences "c a" and "c" keeps "c" both times (the package's LCS takes the later
    # match on ties): union LCS 1 of 2 words, F 0.5. Swapped, "c a" keeps "a" and "c" keeps
    # "c" against "a c": union LCS 2 of 2, F 1.
    assert ex.rouge_l("c a. c", "a c") == pytest.approx(0.5, abs=1e-7)
    assert ex.rouge_l("a c", "c a. c") == pytest.approx(1.0, abs=1e-7)
    from rouge import Rouge
    paper = Rouge(metrics=["rouge-l"]).get_scores("c a. c", "a c", avg=True)["rouge-l"]["f"]
    assert ex.rouge_l("c a. c", "a c") == paper
    assert ex.rouge_l("a b", ".") == 0.0  # no sentence at all for the package


def test_score_explanations_follows_the_papers_skipping_rules():
    result = ex.score_explanations(["a b c", "", "x y"], ["a b", "q", "  "])
    assert (result["questions"], result["count"], result["empty"], result["rouge_count"]) == (3, 2, 1, 1)
    first, skipped, empty = result["per_question"]
    assert first["bleu1"] == pytest.approx(math.exp(1 - 3 / 2))
    # target "a b c" (3 words), prediction "a b" (2 words), LCS 2: P 2/3, R 1
    assert first["rouge_l"] == pytest.approx(2 * (2 / 3) / (2 / 3 + 1 + 1e-8))
    assert skipped == {"bleu1": None, "bleu4": None, "rouge_l": None, "similarity": None}  # no target
    assert (empty["bleu1"], empty["bleu4"], empty["rouge_l"]) == (0.0, 0.0, None)  # BLEU 0, ROUGE-L skipped
    assert result["bleu1"] == pytest.approx(math.exp(1 - 3 / 2) / 2)
    assert result["rouge_l"] == pytest.approx(first["rouge_l"])
    assert result["similarity"] is None and result["similarity_count"] == 0
    nothing = ex.score_explanations([], [])
    assert (nothing["bleu1"], nothing["rouge_l"], nothing["count"]) == (None, None, 0)


# ----------------------------------------------------------------------------- sentence similarity

class StandInEncoder:
    """Fixed vectors per text; records what it was asked to encode."""

    VECTORS = {"r1": [1.0, 0.0, 0.0], "h1": [1.0, 1.0, 0.0], "r2": [0.0, 2.0, 0.0], "h2": [0.0, 0.0, 3.0],
               "": [0.0, 0.0, 0.0]}

    def __init__(self):
        self.calls = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return [self.VECTORS[t] for t in texts]


def test_similarity_with_a_stand_in_encoder():
    encoder = StandInEncoder()
    assert ex.similarity("r1", "h1", encoder) == pytest.approx(1 / math.sqrt(2))
    assert ex.similarity("r2", "h2", encoder) == pytest.approx(0.0)
    result = ex.score_explanations(["r1", "r2", "r1"], ["h1", "h2", ""], encoder)
    # every pair counts (the paper skips none); an all-zero vector has cosine 0
    assert [row["similarity"] for row in result["per_question"]] == pytest.approx([1 / math.sqrt(2), 0.0, 0.0])
    assert result["similarity"] == pytest.approx(1 / math.sqrt(2) / 3) and result["similarity_count"] == 3
    assert encoder.calls[-1] == ["r1", "r2", "r1", "h1", "h2", ""]  # one batch


def test_similarity_of_a_tiny_sentence_transformer_is_its_mean_pooled_cosine(tmp_path):
    pytest.importorskip("sentence_transformers")
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the a plants need water roots soil take in from".split()]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64)).eval()
    folder = tmp_path / "tiny_bert"
    bert.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    model, note = ex.load_similarity_model(str(folder))
    assert note is None and model is not None

    def mean_pooled(text):
        with torch.no_grad():
            return bert(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(dim=0)

    a, b = "plants need water", "the roots take in water from the soil"
    by_hand = torch.nn.functional.cosine_similarity(mean_pooled(a), mean_pooled(b), dim=0).item()
    assert ex.similarity(a, b, model) == pytest.approx(by_hand, abs=1e-5)


def test_a_similarity_model_that_cannot_be_loaded_gives_a_note(tmp_path, monkeypatch):
    model, note = ex.load_similarity_model(str(tmp_path / "missing"))
    assert model is None
    assert note.startswith("sentence similarity skipped: ") and "\n" not in note
    assert "pip install sentence-transformers and give --similarity_model DIR" in note
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # not installed
    model, note = ex.load_similarity_model("sentence-transformers/all-MiniLM-L6-v2")
    assert model is None and "sentence-transformers is not installed" in note


# ----------------------------------------------------------------------------- generation

def test_tutor_replies_fit_the_sequence_len(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompts, max_tokens, batch_size):
        calls.append((len(prompts), max_tokens))
        return [f"reply {max_tokens}"] * len(prompts)

    monkeypatch.setattr(ex, "generate_answers", fake_generate)
    tok = StubTokenizer()
    records = [{"messages": [{"role": "user", "content": "Q" * n}, {"role": "assistant", "content": "A"}]}
               for n in (2, 3, 40, 60)]
    lengths = [len(tok.render_for_completion(r["messages"])) for r in records]
    assert lengths == [6, 7, 44, 64]  # bos, user_start, the text, user_end, assistant_start
    model = SimpleNamespace(config=SimpleNamespace(sequence_len=60))
    replies = ex.tutor_replies(model, tok, records, max_tokens=20, batch_size=8)
    # the two short prompts get all 20 tokens, the third 16 (44 + 16 = 60), the fourth no room
    assert replies == ["reply 20", "reply 20", "reply 16", ""]
    assert calls == [(1, 16), (2, 20)]
    calls.clear()
    assert ex.tutor_replies(model, tok, records, max_tokens=10, batch_size=8) == \
        ["reply 10", "reply 10", "reply 10", ""]
    assert calls == [(3, 10)]
    calls.clear()
    assert ex.tutor_replies(model, tok, records[2:3], max_tokens=20, batch_size=8) == ["reply 16"]
    assert calls == [(1, 16)]


# ----------------------------------------------------------------------------- the whole pass

def test_explain_flags_come_from_eval_settings():
    parser = ev.build_arg_parser()
    args = parser.parse_args(["--explain", "3", "--explain_max_tokens", "64", "--similarity_model", "dir"])
    assert (args.explain, args.explain_max_tokens, args.similarity_model) == (3, 64, "dir")
    defaults = ev.EvalSettings()
    assert (defaults.explain, defaults.explain_max_tokens) == (0, 256)
    assert defaults.similarity_model == "sentence-transformers/all-MiniLM-L6-v2"
    with pytest.raises(SystemExit):
        parser.parse_args(["--explain", "-1"])


@pytest.mark.slow
def test_evaluate_with_explain_on_tiny_checkpoints(tiny_base_dir, tmp_path, capsys, one_thread):
    run = finetuned_dir_from(tiny_base_dir, tmp_path)
    out = tmp_path / "out"
    settings = ev.EvalSettings(base=str(tiny_base_dir / "base_checkpoints" / "d2"), finetuned=str(run),
                               scienceqa="sample", limit=4, generate=False, num_samples=0, explain=3,
                               explain_max_tokens=6, similarity_model=str(tmp_path / "no_such_model"),
                               out_dir=str(out), device="cpu")
    summary = ev.evaluate(settings)
    assert capsys.readouterr().err.count("sentence similarity skipped") == 1  # printed once

    results = json.loads((out / "results.json").read_text())
    assert set(results["explanations"]) == {"base", "finetuned"}
    for metrics in results["explanations"].values():
        assert (metrics["count"], metrics["questions"], metrics["similarity"]) == (3, 3, None)
        assert 0 <= metrics["empty"] <= 3 and metrics["rouge_count"] == 3 - metrics["empty"]
        assert 0.0 <= metrics["bleu1"] <= 1.0 and "per_question" not in metrics
    info = results["explanations_info"]
    assert (info["requested"], info["questions"], info["evaluated"], info["with_solution"]) == (3, 3, 4, 4)
    assert info["similarity_note"].startswith("sentence similarity skipped") and info["similarity_model"] is None
    # the same weights: the same replies and scores
    assert summary["explanations"]["base"] == summary["explanations"]["finetuned"]

    lines = [json.loads(line) for line in (out / "explanations_finetuned.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and [line["pid"] for line in lines] == info["pids"]
    assert set(lines[0]) == {"pid", "reference", "reply", "explanation", "bleu1", "bleu4", "rouge_l", "similarity"}
    assert all(line["reference"] and line["similarity"] is None for line in lines)
    assert all(line["explanation"] == ex.explanation_text(line["reply"]) for line in lines)
    report = (out / "report.md").read_text()
    assert "## Explanations (the ScienceQA paper's metrics)" in report
    assert "| UnifiedQA-base CoT (paper) | 0.397 | 0.370 | 0.714 | 0.811 |" in report
    assert "The first 3 of the 4 evaluated questions" in report and info["similarity_note"] in report
    assert "explanations_base.jsonl" in report

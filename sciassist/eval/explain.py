"""The tutor's explanations, judged the way the ScienceQA paper judges generated explanations
(Lu et al. 2022, Table 4): BLEU-1, BLEU-4, ROUGE-L and sentence similarity against the gold
reference lecture + " " + solution.

The metrics follow the paper's official script, lupantech/ScienceQA tools/evaluations.py:
  tokenize     re.split(r'\\s|\\.', text), empty tokens dropped (its `tokenize`)
  BLEU-n       nltk sentence_bleu([reference tokens], hypothesis tokens, weights (1/n,)*n),
               no smoothing (its `bleu_score`); questions with an empty target are skipped
               (its `caculate_bleu`)
  ROUGE-L      Rouge(metrics=["rouge-l"]).get_scores(target, prediction, avg=True)["rouge-l"]["f"]
               of the PyPI package `rouge` (pltrdy) with the target FIRST, as its `score_rouge`
               is called; skipped when the prediction or the target is empty (its
               `caculate_rouge`), which flatters a model that writes nothing: the number of
               empty explanations is reported beside it
  similarity   cosine (sentence_transformers.util.cos_sim) of SentenceTransformer
               ("all-MiniLM-L6-v2") embeddings of target and prediction, every question
               counted (its `caculate_similariry`)

A generated reply is a whole tutor reply (the answer line, "Explanation: ...", "Background:
..."); its explanation is Background + " " + Explanation, in the reference's order
(explanation_text). nltk, rouge and sentence-transformers are imported only when used.
"""

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from sciassist.eval.questions import prompts_for, question_pid
from sciassist.eval.scoring import generate_answers
from sciassist.eval.table import paired_changes

DEFAULT_SIMILARITY_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
METRICS = ("bleu1", "bleu4", "rouge_l", "similarity")
# The paper's Table 4 (test split), for reference beside this model's numbers.
PAPER_ROWS = (
    ("UnifiedQA-base CoT (paper)", {"bleu1": 0.397, "bleu4": 0.370, "rouge_l": 0.714, "similarity": 0.811}),
    ("GPT-3 CoT, QCM->ALE (paper)", {"bleu1": 0.192, "bleu4": 0.052, "rouge_l": 0.323, "similarity": 0.595}),
)
_LABEL_RE = re.compile(r"^[ \t]*(Explanation|Background):[ \t]*", re.MULTILINE)


# ----------------------------------------------------------------------------- the texts compared

def _sections(reply):
    """{"Explanation": text, "Background": text} of a reply laid out as
    sciassist.data.scienceqa.format_record writes it (each label at a line start; a section
    runs to the next label); the first occurrence of each label counts."""
    found = list(_LABEL_RE.finditer(reply))
    sections = {}
    ends = [match.start() for match in found[1:]] + [len(reply)]
    for match, end in zip(found, ends, strict=False):
        sections.setdefault(match.group(1), reply[match.end():end].strip())
    return sections


def _joined(lecture, solution):
    """The paper's target: lecture + " " + solution, stripped; "" without a solution."""
    return (lecture + " " + solution).strip() if solution and solution.strip() else ""


def reference_text(record):
    """The gold reference of a question, lecture + " " + solution (stripped): from meta
    "lecture" / "solution" when the record has them, else read from its reference reply's
    "Background:" / "Explanation:" sections. "" when the question has no solution."""
    meta = record.get("meta") or {}
    if "solution" in meta:
        return _joined(meta.get("lecture") or "", meta.get("solution") or "")
    message = record["messages"][-1]
    if message.get("role") != "assistant":
        return ""
    sections = _sections(message.get("content") or "")
    return _joined(sections.get("Background", ""), sections.get("Explanation", ""))


def explanation_text(reply):
    """The explanation part of a generated tutor reply, in the reference's order: the
    Background section, a space, the Explanation section (labels removed). A reply with
    neither label: everything after its first line (the answer line). "" for the answer
    line alone."""
    sections = _sections(reply)
    if sections:
        return (sections.get("Background", "") + " " + sections.get("Explanation", "")).strip()
    _, _, rest = reply.strip().partition("\n")
    return rest.strip()


# ----------------------------------------------------------------------------- the metrics

def tokenize(text):
    """The paper's BLEU tokens: split at every whitespace character and every period."""
    return [t for t in re.split(r"\s|\.", text) if t]


def bleu(reference, hypothesis, n):
    """BLEU-n of one hypothesis against one reference: nltk's sentence_bleu, weights
    (1/n,)*n, no smoothing (nltk then puts the smallest float for an n-gram order without
    a match, and warns; the warning is silenced)."""
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sentence_bleu([tokenize(reference)], tokenize(hypothesis), weights=(1.0 / n,) * n))


def rouge_l(reference, hypothesis):
    """ROUGE-L F of the `rouge` package, called as the paper calls it: get_scores(target,
    prediction). A text of periods only holds no sentence for the package (it raises): 0.0."""
    from rouge import Rouge

    words = len(reference.split()) + len(hypothesis.split())
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, words + 1000))  # the package rebuilds each LCS recursively
    try:
        return float(Rouge(metrics=["rouge-l"]).get_scores(reference, hypothesis, avg=True)["rouge-l"]["f"])
    except ValueError:
        return 0.0
    finally:
        sys.setrecursionlimit(limit)


def similarities(model, references, hypotheses):
    """Cosine similarity of each reference's and hypothesis's embedding, model.encode(texts)
    -> one vector per text (a SentenceTransformer or any such object); the cosine of
    sentence_transformers.util.cos_sim (L2-normalised vectors, eps 1e-12). All texts go in one
    encode call; the paper encodes them one at a time, equal up to float rounding."""
    if not references:
        return []
    vectors = torch.as_tensor(np.asarray(model.encode(list(references) + list(hypotheses))), dtype=torch.float32)
    vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
    n = len(references)
    return (vectors[:n] * vectors[n:]).sum(dim=-1).tolist()


def similarity(reference, hypothesis, model):
    """The sentence similarity of one pair (see similarities)."""
    return similarities(model, [reference], [hypothesis])[0]


def _mean(values):
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def score_explanations(references, hypotheses, similarity_model=None):
    """The paper's four metrics over question pairs (texts stripped), with its skipping
    rules: BLEU needs a target, ROUGE-L a target and a prediction, similarity counts every
    pair (None without a model). Returns the averages, how many questions each covers
    (count: with a target; rouge_count; similarity_count), empty (empty predictions) and
    per_question: one dict of the four values per pair (None where skipped)."""
    pairs = [(r.strip(), h.strip()) for r, h in zip(references, hypotheses, strict=True)]
    rows = [{"bleu1": bleu(r, h, 1) if r else None, "bleu4": bleu(r, h, 4) if r else None,
             "rouge_l": rouge_l(r, h) if r and h else None, "similarity": None} for r, h in pairs]
    if similarity_model is not None and pairs:
        references, hypotheses = zip(*pairs, strict=True)
        for row, value in zip(rows, similarities(similarity_model, references, hypotheses), strict=True):
            row["similarity"] = value
    result = {name: _mean(row[name] for row in rows) for name in METRICS}
    result.update(questions=len(pairs), count=sum(1 for r, _ in pairs if r), empty=sum(1 for _, h in pairs if not h),
                  rouge_count=sum(row["rouge_l"] is not None for row in rows),
                  similarity_count=sum(row["similarity"] is not None for row in rows), per_question=rows)
    return result


# ----------------------------------------------------------------------------- the similarity model

def load_similarity_model(name_or_path=DEFAULT_SIMILARITY_MODEL):
    """(SentenceTransformer, None) from a local folder or the hub (the local cache first), or
    (None, a one-line note saying why sentence similarity is skipped and how to get it):
    sentence-transformers not installed, or the model not loadable (offline)."""
    how = "pip install sentence-transformers and give --similarity_model DIR"
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None, f"sentence similarity skipped: sentence-transformers is not installed; {how}"
    try:
        if Path(name_or_path).expanduser().is_dir():
            return SentenceTransformer(str(Path(name_or_path).expanduser())), None
        try:
            return SentenceTransformer(name_or_path, local_files_only=True), None
        except Exception:  # not in the local cache: ask the hub
            return SentenceTransformer(name_or_path), None
    except Exception as e:  # offline, a bad folder, a bad name: the other metrics still count
        return None, (f"sentence similarity skipped: {name_or_path} could not be loaded (offline?) "
                      f"[{type(e).__name__}]; {how}")


# ----------------------------------------------------------------------------- generation and the whole pass

def explain_indices(records, n):
    """The first n questions (indices) that have a gold solution."""
    return tuple([i for i, record in enumerate(records) if reference_text(record)][:n]) if n > 0 else ()


def tutor_replies(model, tokenizer, records, max_tokens, batch_size=32):
    """Greedy full tutor replies to the records' prompts, rendered exactly as in training
    (the record's messages, the reference reply dropped). Each reply gets at most
    max_tokens, fewer where prompt + reply would pass model.config.sequence_len; a prompt
    with no room left gets "" (an empty explanation)."""
    prompts, _ = prompts_for(records, "sciassist")
    room = model.config.sequence_len
    caps = [min(max_tokens, room - len(tokenizer.render_for_completion(p))) for p in prompts]
    replies = [""] * len(prompts)
    for cap in sorted({c for c in caps if c >= 1}):
        chosen = [i for i, c in enumerate(caps) if c == cap]
        texts = generate_answers(model, tokenizer, [prompts[i] for i in chosen], cap, batch_size)
        for i, text in zip(chosen, texts, strict=True):
            replies[i] = text
    return replies


def _write_rows(path, records, indices, replies, explanations, result):
    rows = [{"pid": question_pid(records[i], i), "reference": reference_text(records[i]), "reply": reply,
             "explanation": explanation, **values}
            for i, reply, explanation, values in zip(indices, replies, explanations, result["per_question"],
                                                     strict=True)]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def judge_explanations(out_dir, files, records, runs, indices, similarity_model_name, requested):
    """Score each run's explanation replies (run["explanation_replies"], for the questions
    `indices`) and write explanations_<name>.jsonl (added to `files`). The similarity model is
    loaded once; its note, when it cannot be, is printed once. Returns ({name: averages and
    counts}, info: which questions, how many, the similarity model and its note, {name: the
    per-question values}) (the last for paired_explanations)."""
    model, note = load_similarity_model(similarity_model_name) if indices else (None, None)
    if note:
        print(note, file=sys.stderr)
    references = [reference_text(records[i]) for i in indices]
    summaries, per_question = {}, {}
    for name, run in runs.items():
        replies = run.get("explanation_replies") or [""] * len(indices)
        explanations = [explanation_text(reply) for reply in replies]
        result = score_explanations(references, explanations, model)
        path = Path(out_dir) / f"explanations_{name}.jsonl"
        _write_rows(path, records, indices, replies, explanations, result)
        files[f"explanations_{name}"] = path.name
        summaries[name] = {k: v for k, v in result.items() if k != "per_question"}
        per_question[name] = result["per_question"]
    info = {"requested": requested, "questions": len(indices), "evaluated": len(records),
            "with_solution": sum(1 for record in records if reference_text(record)),
            "pids": [question_pid(records[i], i) for i in indices],
            "similarity_model": similarity_model_name if model is not None else None, "similarity_note": note}
    return summaries, info, per_question


def paired_explanations(per_question):
    """The models' paired differences per explanation metric, x100, on the questions where
    every model has a value (judge_explanations' per-question values {name: [row]}):
    {"explanation_<metric>": {"values": {name: mean x100}, "changes": {comparison key:
    paired_change}, "count": questions}}; a metric no question has is left out."""
    names = list(per_question)
    out = {}
    for metric in METRICS:
        rows = list(zip(*(per_question[name] for name in names), strict=True))
        kept = [row for row in rows if all(r[metric] is not None for r in row)]
        if not kept:
            continue
        values = {name: [row[k][metric] for row in kept] for k, name in enumerate(names)}
        out[f"explanation_{metric}"] = {"values": {name: 100 * sum(v) / len(v) for name, v in values.items()},
                                        "changes": paired_changes(values), "count": len(kept)}
    return out

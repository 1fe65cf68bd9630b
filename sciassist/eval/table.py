"""What the answers add up to: the ScienceQA table with 95% Wilson intervals, the chance and
majority baselines, accuracy by topic, the generated answers' validity and agreement, and the
paired differences between the models (base -> fine-tuned -> RL) on the same questions.

The table follows the benchmark's definitions: NAT/SOC/LAN by subject, TXT = has a non-empty
hint, IMG = has an image, NO = neither, G1-6/G7-12 by grade, Avg = all. A column is computed
only on questions whose metadata is known (the local copy of ScienceQA lacks subject/grade
for most questions); the report says on how many.
"""

import math
import re

from sciassist.data.answers import LETTERS

COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
SUBJECT_COLUMNS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
WILSON_Z = 1.959963984540054  # two-sided 95%

# The models an evaluation can compare, in the pipeline's order, and the comparisons made
# between them: a later stage minus an earlier one, on the same questions.
MODEL_NAMES = ("base", "finetuned", "rl")
MODEL_TITLES = {"base": "base", "finetuned": "fine-tuned", "rl": "RL"}
COMPARISONS = (("finetuned", "base"), ("rl", "finetuned"), ("rl", "base"))


# ----------------------------------------------------------------------------- statistics

def wilson_interval(correct, count, z=WILSON_Z):
    """95% Wilson score interval of a proportion, as fractions (lo, hi); None for count 0.
    Unlike the normal approximation it stays inside [0, 1] and is sensible near 0% / 100%."""
    if count == 0:
        return None
    p = correct / count
    denominator = 1 + z * z / count
    center = (p + z * z / (2 * count)) / denominator
    half = z * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def paired_change(base_correct, finetuned_correct, z=WILSON_Z):
    """Fine-tuned minus base accuracy (any later model minus an earlier one) on the same
    questions, in percentage points, with a 95% interval from the per-question differences
    (each -1, 0 or +1; normal approximation); beyond_noise when the interval excludes 0.
    Per-question scores in [0, 1] (an explanation's BLEU) work the same way, x100."""
    n = len(base_correct)
    if n == 0 or n != len(finetuned_correct):
        return None
    diffs = [float(f) - float(b) for b, f in zip(base_correct, finetuned_correct, strict=True)]
    mean = sum(diffs) / n
    variance = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(variance / n)
    low, high = 100 * (mean - half), 100 * (mean + half)
    return {"difference": 100 * mean, "ci95": [low, high], "beyond_noise": low > 0 or high < 0,
            "improved": sum(d > 0 for d in diffs), "worsened": sum(d < 0 for d in diffs)}


def comparison_key(later, earlier):
    """The name of a comparison in the results: "rl_vs_finetuned"."""
    return f"{later}_vs_{earlier}"


def paired_changes(flags):
    """{comparison_key: paired_change} for each of COMPARISONS whose two models are both in
    `flags` ({model name: per-question 0/1 (or True/False) on the same questions})."""
    return {comparison_key(later, earlier): paired_change(flags[earlier], flags[later])
            for later, earlier in COMPARISONS if later in flags and earlier in flags}


def chance_accuracy(num_choices):
    """Expected accuracy (fraction) of guessing uniformly: the mean of 1/k."""
    if not num_choices:
        return None
    return sum(1 / k for k in num_choices) / len(num_choices)


def accuracy_cell(correct_flags):
    """{"correct", "count", "accuracy" (percent or None = n/a), "ci95" ([lo, hi] percent)}."""
    count, correct = len(correct_flags), sum(correct_flags)
    interval = wilson_interval(correct, count)
    return {
        "correct": correct,
        "count": count,
        "accuracy": 100 * correct / count if count else None,
        "ci95": [100 * interval[0], 100 * interval[1]] if interval else None,
    }


# ----------------------------------------------------------------------------- columns

def grade_number(grade):
    match = re.fullmatch(r"grade(\d+)", str(grade or "").strip().lower())
    return int(match.group(1)) if match else None


def question_columns(meta):
    """The table columns a question counts in (Avg always; others only when known)."""
    columns = []
    subject = SUBJECT_COLUMNS.get(meta.get("subject"))
    if subject:
        columns.append(subject)
    if meta.get("has_hint") is True:
        columns.append("TXT")
    if meta.get("has_image") is True:
        columns.append("IMG")
    if meta.get("has_hint") is False and meta.get("has_image") is False:
        columns.append("NO")
    grade = grade_number(meta.get("grade"))
    if grade is not None and 1 <= grade <= 6:
        columns.append("G1-6")
    elif grade is not None and 7 <= grade <= 12:
        columns.append("G7-12")
    columns.append("Avg")
    return columns


def metadata_known(records):
    """On how many questions each kind of metadata is known."""
    metas = [r["meta"] for r in records]
    return {
        "total": len(metas),
        "subject": sum(m.get("subject") in SUBJECT_COLUMNS for m in metas),
        "grade": sum(grade_number(m.get("grade")) is not None for m in metas),
        "hint": sum(m.get("has_hint") is not None for m in metas),
        "image": sum(m.get("has_image") is not None for m in metas),
        "context": sum(m.get("has_hint") is not None and m.get("has_image") is not None for m in metas),
        "topic": sum(bool(m.get("topic")) for m in metas),
    }


# ----------------------------------------------------------------------------- rows

def majority_predictions(records, letter_counts):
    """Always answer the most common gold letter (letter_counts: letter -> count), among the
    letters a question has: a 2-option question cannot be answered "C". Ties: earlier letter."""
    predictions = []
    for record in records:
        k = len(record["meta"]["choices"])
        predictions.append(max(range(k), key=lambda i: (letter_counts.get(LETTERS[i], 0), -i)))
    return predictions


def _chance_cells(records, column_members):
    num_choices = [len(r["meta"]["choices"]) for r in records]
    cells = {}
    for c, members in column_members.items():
        expected = chance_accuracy([num_choices[i] for i in members])
        cells[c] = {"correct": None, "count": len(members),
                    "accuracy": 100 * expected if expected is not None else None, "ci95": None}
    return cells


def build_table(records, predictions, chance=True):
    """The ScienceQA table. predictions: {row name: [option index or None per question]}
    (None = no valid answer, counted wrong). Adds a chance row on the same questions.
    Returns {"columns", "counts", "rows": [{"name", "kind", "cells": {column: cell}}], "known"}."""
    column_members = {c: [] for c in COLUMNS}
    for i, record in enumerate(records):
        for column in question_columns(record["meta"]):
            column_members[column].append(i)
    golds = [r["meta"]["answer"] for r in records]
    rows = []
    for name, preds in predictions.items():
        if len(preds) != len(records):
            raise ValueError(f"row {name!r}: {len(preds)} predictions for {len(records)} questions")
        correct = [p is not None and p == g for p, g in zip(preds, golds, strict=True)]
        cells = {c: accuracy_cell([correct[i] for i in members]) for c, members in column_members.items()}
        rows.append({"name": name, "kind": "predictions", "cells": cells})
    if chance:
        rows.append({"name": "chance", "kind": "expected", "cells": _chance_cells(records, column_members)})
    return {
        "columns": list(COLUMNS),
        "counts": {c: len(m) for c, m in column_members.items()},
        "rows": rows,
        "known": metadata_known(records),
    }


def topic_breakdown(records, predictions):
    """Accuracy per topic: [{"topic", "count", "accuracy": {row name: percent}}], largest
    topics first; questions without a topic are grouped as "(unknown)"."""
    groups = {}
    for i, record in enumerate(records):
        groups.setdefault(record["meta"].get("topic") or "(unknown)", []).append(i)
    golds = [r["meta"]["answer"] for r in records]
    out = []
    for topic, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        accuracy = {}
        for name, preds in predictions.items():
            accuracy[name] = 100 * sum(preds[i] is not None and preds[i] == golds[i] for i in members) / len(members)
        out.append({"topic": topic, "count": len(members), "accuracy": accuracy})
    return out


def generation_summary(records, run):
    """Valid-answer rate, accuracy of generated answers and agreement with the scored answer."""
    if run["generated_prediction"] is None:
        return None
    golds = [r["meta"]["answer"] for r in records]
    generated, scored = run["generated_prediction"], run["prediction"]
    n = len(records)
    valid = [p is not None for p in generated]
    agree = [g is not None and g == s for g, s in zip(generated, scored, strict=True)]
    n_valid = sum(valid)
    return {
        "count": n,
        "valid": n_valid,
        "invalid": n - n_valid,
        "valid_rate": n_valid / n,
        "accuracy": sum(g is not None and g == t for g, t in zip(generated, golds, strict=True)) / n,
        "agreement": sum(agree) / n,
        "agreement_among_valid": sum(agree) / n_valid if n_valid else None,
    }


def paired_summary(records, runs):
    """The models' paired differences on these questions (COMPARISONS), per metric: "scored"
    (the scored answer is right), "generated" (the strictly parsed reply is right; invalid
    counts wrong), "invalid" (the reply does not parse: lower is better) and "constrained"
    (--constrain_answers), each {"values": {model: percent}, "changes": {comparison key:
    paired_change}}; a metric only where every model has it."""
    golds = [r["meta"]["answer"] for r in records]

    def flags_of(key, test):
        if any(run.get(key) is None for run in runs.values()):
            return None
        return {name: [test(p, g) for p, g in zip(run[key], golds, strict=True)] for name, run in runs.items()}

    metrics = {"scored": flags_of("prediction", lambda p, g: p == g),
               "generated": flags_of("generated_prediction", lambda p, g: p is not None and p == g),
               "invalid": flags_of("generated_prediction", lambda p, g: p is None),
               "constrained": flags_of("constrained_prediction", lambda p, g: p is not None and p == g)}
    return {metric: {"values": {name: 100 * sum(f) / len(f) if f else None for name, f in flags.items()},
                     "changes": paired_changes(flags)}
            for metric, flags in metrics.items() if flags is not None}


# ----------------------------------------------------------------------------- formatting

def _format_percent(value):
    return "n/a" if value is None else f"{value:.2f}"


def format_table_text(table):
    """A fixed-width table for the console: accuracy (%) per column and the question counts."""
    names = [row["name"] for row in table["rows"]]
    width = max([len("questions")] + [len(n) for n in names]) + 2
    lines = [" " * width + "".join(f"{c:>9}" for c in table["columns"])]
    lines.append(f"{'questions':<{width}}" + "".join(f"{table['counts'][c]:>9}" for c in table["columns"]))
    for row in table["rows"]:
        lines.append(f"{row['name']:<{width}}" + "".join(f"{_format_percent(row['cells'][c]['accuracy']):>9}"
                                                       for c in table["columns"]))
    return "\n".join(lines)


def _markdown_cell(cell):
    if cell["accuracy"] is None:
        return "n/a"
    if cell["ci95"] is None:
        return f"{cell['accuracy']:.2f}"
    lo, hi = cell["ci95"]
    return f"{cell['accuracy']:.2f} [{lo:.1f}, {hi:.1f}]"


def format_table_markdown(table):
    """Markdown: accuracy with its 95% Wilson interval per cell, and the question counts."""
    columns = table["columns"]
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines.append("| questions | " + " | ".join(str(table["counts"][c]) if table["counts"][c] else "n/a"
                                            for c in columns) + " |")
    for row in table["rows"]:
        lines.append(f"| {row['name']} | " + " | ".join(_markdown_cell(row["cells"][c]) for c in columns) + " |")
    return "\n".join(lines)


def format_topics_markdown(topics, names):
    lines = ["| topic | questions | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for t in topics:
        lines.append(f"| {t['topic']} | {t['count']} | " + " | ".join(f"{t['accuracy'][n]:.1f}" for n in names) + " |")
    return "\n".join(lines)

"""The files an evaluation writes: the benchmark's results format (predictions_*.json), one
line per question (per_question_*.jsonl), the plots, samples.md and report.md.
"""

import json
import re
import sys
from pathlib import Path

from sciassist.common import write_json
from sciassist.data.answers import ANSWER_PREFIX, LETTERS, parse_answer
from sciassist.eval.explain import METRICS, PAPER_ROWS
from sciassist.eval.questions import EvaluationError, prompts_for, question_pid
from sciassist.eval.table import (
    COMPARISONS,
    MODEL_TITLES,
    comparison_key,
    format_table_markdown,
    format_topics_markdown,
)
from sciassist.eval.transfer import benchmarks_markdown, change_cell
from sciassist.plots import plot_accuracy_by_category, plot_loss_curve

# ----------------------------------------------------------------------------- the benchmark's results format

def results_data(records, predictions, outputs=None):
    """ScienceQA's results format (lupantech/ScienceQA run_gpt3.py): {"acc" (percent),
    "correct", "count", "results": {pid: predicted option index}} (+ "outputs": {pid: text}).
    A missing answer (None) is written as -1, which the official scorer counts as wrong."""
    results, correct = {}, 0
    for i, (record, prediction) in enumerate(zip(records, predictions, strict=True)):
        index = -1 if prediction is None else int(prediction)
        results[question_pid(record, i)] = index
        correct += index == record["meta"]["answer"]
    count = len(results)
    data = {"acc": 100 * correct / count if count else 0.0, "correct": correct, "count": count, "results": results}
    if outputs is not None:
        data["outputs"] = {question_pid(r, i): text for i, (r, text) in enumerate(zip(records, outputs, strict=True))}
    return data


def read_results_file(path):
    """Read and check a results file: integer predictions, count = len(results) and acc =
    100 * correct / count."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a JSON object (the ScienceQA results format), got "
                              f"{type(data).__name__}")
    for key in ("acc", "correct", "count", "results"):
        if key not in data:
            raise EvaluationError(f"{path}: missing {key!r} (expected the ScienceQA results format)")
    for key in ("acc", "correct", "count"):
        if isinstance(data[key], bool) or not isinstance(data[key], (int, float)):
            raise EvaluationError(f"{path}: {key!r} must be a number, got {data[key]!r}")
    if not isinstance(data["results"], dict) or not all(isinstance(v, int) for v in data["results"].values()):
        raise EvaluationError(f"{path}: 'results' must map question ids to option indices")
    if data["count"] != len(data["results"]):
        raise EvaluationError(f"{path}: count {data['count']} but {len(data['results'])} results")
    expected = 100 * data["correct"] / data["count"] if data["count"] else 0.0
    if abs(data["acc"] - expected) > 1e-9:
        raise EvaluationError(f"{path}: acc {data['acc']} is not 100 * correct / count = {expected}")
    return data


# ----------------------------------------------------------------------------- per model and per question

def per_question_rows(records, run):
    """One dict per question: gold, scored prediction and probabilities, the generated reply
    and what it parsed to, and the question's metadata."""
    rows = []
    for i, record in enumerate(records):
        meta = record["meta"]
        gold, prediction = meta["answer"], run["prediction"][i]
        item = {
            "pid": question_pid(record, i),
            "gold": gold,
            "gold_letter": LETTERS[gold],
            "num_choices": len(meta["choices"]),
            "prediction": prediction,
            "prediction_letter": LETTERS[prediction],
            "correct": prediction == gold,
            "probabilities": [round(p, 6) for p in run["probabilities"][i]],
            "generated": None, "generated_prediction": None, "valid": None, "generated_correct": None,
            "subject": meta.get("subject"), "grade": meta.get("grade"), "topic": meta.get("topic"),
            "has_image": meta.get("has_image"), "has_hint": meta.get("has_hint"),
        }
        if run["generated"] is not None:
            generated = run["generated_prediction"][i]
            item.update(generated=run["generated"][i], generated_prediction=generated,
                        valid=generated is not None, generated_correct=generated == gold)
        if run.get("constrained_prediction") is not None:
            item.update(constrained_prediction=run["constrained_prediction"][i],
                        constrained_correct=run["constrained_prediction"][i] == gold)
        rows.append(item)
    return rows


def write_model_files(out_dir, files, records, runs):
    """predictions_<name>[_generated].json and per_question_<name>.jsonl of each run; their
    names are added to `files`."""
    out_dir = Path(out_dir)
    for name, run in runs.items():
        path = write_json(out_dir / f"predictions_{name}.json", results_data(records, run["prediction"]))
        files[f"predictions_{name}"] = path.name
        if run["generated"] is not None:
            path = write_json(out_dir / f"predictions_{name}_generated.json",
                              results_data(records, run["generated_prediction"], run["generated"]))
            files[f"predictions_{name}_generated"] = path.name
        path = out_dir / f"per_question_{name}.jsonl"
        lines = [json.dumps(item, ensure_ascii=False) for item in per_question_rows(records, run)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files[f"per_question_{name}"] = path.name


# ----------------------------------------------------------------------------- plots

def draw_accuracy_chart(out_dir, files, table, model_names, title):
    """accuracy_by_category.png: the models' rows of the table, with the chance level."""
    model_rows = [row for row in table["rows"] if row["name"] in model_names]
    chance_row = next(row for row in table["rows"] if row["name"] == "chance")
    plot_accuracy_by_category(
        table["columns"],
        {row["name"]: [row["cells"][c]["accuracy"] for c in table["columns"]] for row in model_rows},
        Path(out_dir) / "accuracy_by_category.png",
        chance=[chance_row["cells"][c]["accuracy"] for c in table["columns"]],
        counts=[table["counts"][c] for c in table["columns"]],
        title=title,
    )
    files["accuracy_chart"] = "accuracy_by_category.png"


def draw_loss_curve(out_dir, files, metrics_path=None, log_file=None, finetuned=None):
    """loss_curve.png from metrics_path (default: <finetuned>/metrics.jsonl when it exists)
    and/or log_file; returns plot_loss_curve's summary, None when there is nothing to draw.
    A failure is an EvaluationError when the user named the files, else a warning."""
    explicit = metrics_path is not None or log_file is not None
    if metrics_path is None and finetuned is not None:
        run_dir = Path(finetuned)
        # a model_<step>.pt (what --finetuned source names): its run's folder
        candidate = (run_dir.parent if run_dir.suffix == ".pt" else run_dir) / "metrics.jsonl"
        metrics_path = candidate if candidate.is_file() else None
    if metrics_path is None and log_file is None:
        return None
    try:
        summary = plot_loss_curve(metrics_path, Path(out_dir) / "loss_curve.png", log_file=log_file)
    except (OSError, ValueError) as e:
        if explicit:
            raise EvaluationError(f"loss curve: {e}") from None
        # a run's own metrics.jsonl that holds no losses yet must not cost the evaluation
        print(f"warning: no loss curve drawn: {e}", file=sys.stderr)
        return {"error": str(e)}
    files["loss_curve"] = "loss_curve.png"
    return summary


# ----------------------------------------------------------------------------- samples.md

def _quote(text):
    return "\n".join("> " + line if line else ">" for line in text.splitlines())


_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _fence(text):
    # an untrained model emits any bytes; control characters would garble the Markdown
    text = _CONTROL_RE.sub("\ufffd", text) if text else "(empty)"
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}text\n{text}\n{fence}"


def _shown_reply(run, i):
    """The reply samples.md shows for question i: its longer sample, else the main generation."""
    text = run["samples"].get(i)
    if text is None and run["generated"] is not None:
        text = run["generated"][i]
    return text


def _generated_cell(text, meta, prefix, options):
    if text is None:
        return "not generated"
    parsed = parse_answer(text, len(meta["choices"]), prefix, meta["choices"], options.answer_format)
    if parsed is None:
        return "invalid (no strict answer)"
    return f"{LETTERS[parsed]} ({'correct' if parsed == meta['answer'] else 'wrong'})"


def _sample(i, record, prompt, runs, prefix, options):
    meta, names = record["meta"], list(runs)
    gold = meta["answer"]
    lines = ["", f"## {question_pid(record, i)} ({meta.get('subject') or 'subject unknown'}, "
                 f"{meta.get('topic') or 'topic unknown'})", "", _quote(prompt[-1]["content"]), "",
             f"Gold answer: **{LETTERS[gold]}. {meta['choices'][gold]}**", ""]
    lines.append("| | " + " | ".join(names) + " |")
    lines.append("|---|" + "---|" * len(names))
    cells = []
    for name in names:
        p = runs[name]["prediction"][i]
        mark = "correct" if p == gold else "wrong"
        cells.append(f"{LETTERS[p]} (p={runs[name]['probabilities'][i][p]:.2f}, {mark})")
    lines.append(f"| {options.scoring} scoring | " + " | ".join(cells) + " |")
    cells = [_generated_cell(_shown_reply(runs[name], i), meta, prefix, options) for name in names]
    lines.append("| generated | " + " | ".join(cells) + " |")
    for name in names:
        text = _shown_reply(runs[name], i)
        if text is not None:
            lines += ["", f"**{name}**:", "", _fence(text.strip())]
    return lines


def samples_markdown(records, runs, sample_indices, split, options):
    """The questions sample_indices side by side: each model's scored answer and its reply.
    options: the run options (prompt_style, scoring, answer_format)."""
    prompts, prefix = prompts_for(records, options.prompt_style)
    lines = [f"# Sample answers ({split}, prompt style {options.prompt_style})", ""]
    if options.scoring == "choice":
        lines.append("Choice scoring: the option whose whole answer line is most likely (its probability among the "
                     "question's options). Generated: greedy reply; the answer is read by the strict parser.")
    else:
        lines.append("Letter scoring: the most likely letter after the answer prefix (its probability among the "
                     "question's letters). Generated: greedy reply; the answer is read by the strict parser.")
    for i in sample_indices:
        lines += _sample(i, records[i], prompts[i], runs, prefix, options)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- report.md

def _models_section(summary):
    s = summary["settings"]
    lines = ["## Models", ""]
    for name, info in summary["models"].items():
        config = info["model_config"]
        where = info.get("checkpoint_dir") or info.get("spec") or "(in memory)"
        extra = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info["meta"].items())
        lines.append(f"- **{name}**: `{where}` step {info.get('step')}; d{config['n_layer']} "
                     f"(width {config['n_embd']}, vocab {config['vocab_size']}), {info['params'] / 1e6:.1f}M params"
                     + (f"; {extra}" if extra else ""))
        if info.get("answer_prefix_checked"):
            what = ("the gold option's answer line" if s.get("scoring") == "choice"
                    else f"\"{ANSWER_PREFIX} <letter>\"")
            lines.append(f"  - reference answers that start with {what} and tokenize like "
                         f"the scored prompt: {info['answer_prefix_matches']}/{info['answer_prefix_checked']}")
    return lines


def _data_section(summary):
    data, known = summary["data"], summary["table"]["known"]
    lines = ["## Data", ""]
    lines.append(f"- {data['count']} questions of the {data['split']} split from `{data['source']}` "
                 f"({data['selection']}; {data['available']} available)")
    if data.get("skipped"):
        lines.append("- skipped: " + ", ".join(f"{n} {why}" for why, n in data["skipped"].items()))
    lines.append(f"- metadata known: subject on {known['subject']}/{known['total']}, grade on "
                 f"{known['grade']}/{known['total']}, hint on {known['hint']}/{known['total']}, image on "
                 f"{known['image']}/{known['total']}, topic on {known['topic']}/{known['total']}. NAT/SOC/LAN, "
                 f"G1-6/G7-12 and TXT/IMG/NO are computed only on the questions whose metadata is known; "
                 f"a column without any says n/a.")
    for name, over in summary.get("prompt_tokens_over_sequence_len", {}).items():
        if over:
            lines.append(f"- {name}: {over} prompts are longer than the model's sequence_len (scored anyway; "
                         f"rotary positions beyond training length)")
    return lines


def _generation_rule(s):
    if s["prompt_style"] != "sciassist":
        return "the reply begins with a capital letter among the question's letters, standing alone"
    if s.get("answer_format") == "text_first":
        return ("the reply's first \"The correct answer is\" is followed on its line by an option's text and "
                "that option's letter as \"(X)\"")
    return ("the reply states \"The correct answer is X\" strictly (capital letter among the question's letters, "
            "standing alone; first occurrence only)")


def _settings_section(summary):
    s = summary["settings"]
    after = f'"{ANSWER_PREFIX}"'
    if s["prompt_style"] != "sciassist":
        after = "<|assistant_start|> (the letter is the first token)"
    line = "\" <option> (<L>).\"" if s.get("answer_format") == "text_first" else "\" <L>. <option>\""
    how = ("letter scoring" if s.get("scoring", "letter") == "letter" else
           f"CHOICE scoring (each option's whole answer line {line})")
    how += f"; answer format {s.get('answer_format', 'letter_first')}"
    lines = ["## Settings", ""]
    lines.append(f"- prompt style `{s['prompt_style']}`; {how} after {after}; "
                 f"batch size {s['batch_size']}; device {summary['device']}")
    if s["generate"]:
        lines.append(f"- generation: greedy, at most {s['max_new_tokens']} tokens; an answer is valid only when "
                     f"{_generation_rule(s)}; invalid answers count as wrong")
    else:
        lines.append("- generation: off")
    return lines


def _accuracy_section(summary):
    table, scoring = summary["table"], summary["settings"].get("scoring", "letter")
    return ["## Accuracy (%), 95% Wilson intervals", "", format_table_markdown(table), "",
            f"Rows: {scoring} scoring per model; \"(generated)\" = the strictly parsed "
            f"greedy reply; majority = "
            f"always the most common gold letter ({table.get('majority_letter')}) of "
            f"{table.get('majority_source')}, among the letters a question has; chance = mean of 1/k on the "
            f"same questions."]


PAIRED_METRICS = {"scored": "{scoring} scoring accuracy", "generated": "greedy reply accuracy",
                  "invalid": "invalid replies", "constrained": "constrained answer line accuracy",
                  "explanation_bleu1": "explanation BLEU-1 (x100, {count} questions)",
                  "explanation_bleu4": "explanation BLEU-4 (x100, {count} questions)",
                  "explanation_rouge_l": "explanation ROUGE-L (x100, {count} questions)",
                  "explanation_similarity": "explanation similarity (x100, {count} questions)"}


def _paired_section(summary):
    """With an RL model: each metric per model and each comparison's paired change."""
    paired = summary.get("paired")
    if not paired:
        return []
    names = list(next(iter(paired.values()))["values"])
    pairs = [(later, earlier) for later, earlier in COMPARISONS if later in names and earlier in names]
    titles = [MODEL_TITLES.get(n, n) for n in names]
    pair_titles = [f"{MODEL_TITLES[later]} - {MODEL_TITLES[earlier]}" for later, earlier in pairs]
    lines = ["## Paired differences (%, the same questions)", "",
             "| metric | " + " | ".join(titles + pair_titles) + " |",
             "|---|" + "---:|" * (len(names) + len(pairs))]
    scoring = summary["settings"].get("scoring", "letter")
    for metric, m in paired.items():
        up, down = ("more", "fewer") if metric == "invalid" else ("better", "worse")
        cells = [f"{m['values'][n]:.2f}" for n in names]
        cells += [change_cell(m["changes"].get(comparison_key(*pair)), up, down) for pair in pairs]
        title = PAIRED_METRICS[metric].format(scoring=scoring, count=m.get("count"))
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    lines += ["", f"Each change is the later model minus the earlier on the same {summary['data']['count']} "
                  "questions, in points, with a 95% interval from the per-question differences (normal "
                  "approximation); \"within noise\" when the interval includes 0. Invalid replies count as wrong "
                  "in the greedy reply's accuracy. Explanation metrics (--explain): on the questions where every "
                  "model has a value (ROUGE-L leaves out empty explanations)."]
    return lines


def _generation_section(summary):
    generation = {k: v for k, v in summary["generation"].items() if v is not None}
    if not generation and not summary.get("constrained"):
        return []
    lines = ["## Generated answers", "",
             f"| model | valid | invalid | accuracy | agreement with {summary['settings'].get('scoring', 'letter')} "
             f"scoring |",
             "|---|---:|---:|---:|---:|"]
    for name, g in generation.items():
        among = ""
        if g["agreement_among_valid"] is not None:
            among = f" ({100 * g['agreement_among_valid']:.1f}% of valid)"
        lines.append(f"| {name} | {g['valid']} ({100 * g['valid_rate']:.1f}%) | {g['invalid']} | "
                     f"{100 * g['accuracy']:.2f} | {100 * g['agreement']:.1f}%{among} |")
    for name, g in summary.get("constrained", {}).items():
        lines.append(f"| {name}, constrained answer line | {g['valid']} ({100 * g['valid_rate']:.1f}%) | "
                     f"{g['invalid']} | {100 * g['accuracy']:.2f} | {100 * g['agreement']:.1f}% |")
    if summary.get("constrained"):
        lines.append("\nConstrained (--constrain_answers): greedy decoding with every token kept on one of the "
                     "question's answer lines, so it can never be invalid; reported beside the free reply, which it "
                     "does not replace.")
    for name, g in generation.items():
        if "names_an_option" in g:
            lines.append(f"\n{name}: {g['names_an_option']} of {g['count']} replies name an option's text; "
                         f"{g['letter_matches_text']} of those give that option's own letter.")
    return lines


def _metric_cell(value):
    return "-" if value is None else f"{value:.3f}"


def _explanations_section(summary):
    """--explain: each model's explanation scores beside the paper's Table 4 rows."""
    explanations, info = summary.get("explanations"), summary.get("explanations_info")
    if not explanations:
        return []
    lines = ["## Explanations (the ScienceQA paper's metrics)", "",
             f"The first {info['questions']} of the {info['with_solution']} evaluated questions (of "
             f"{info['evaluated']}) that have a gold solution (--explain {info['requested']}): each model's full "
             f"tutor reply, its Background + Explanation against the gold lecture + solution.", "",
             "| model | BLEU-1 | BLEU-4 | ROUGE-L | similarity | questions | empty explanations | ROUGE-L over |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in explanations.items():
        lines.append(f"| {name} | " + " | ".join(_metric_cell(m[k]) for k in METRICS)
                     + f" | {m['count']} | {m['empty']} | {m['rouge_count']} |")
    for name, m in PAPER_ROWS:
        lines.append(f"| {name} | " + " | ".join(_metric_cell(m[k]) for k in METRICS) + " | test split | | |")
    lines += ["", "As lupantech/ScienceQA tools/evaluations.py computes them: BLEU with nltk's sentence_bleu on "
                  "its whitespace-and-period tokens, ROUGE-L F of the `rouge` package, similarity the cosine of "
                  f"{info.get('similarity_model') or 'sentence-transformers'} embeddings. ROUGE-L leaves out empty "
                  "explanations as the paper does, which flatters a model that writes nothing: see their count."]
    if info.get("similarity_note"):
        lines += ["", info["similarity_note"]]
    return lines


def _topics_section(summary):
    if not summary["topics"]:
        return []
    names = [row["name"] for row in summary["table"]["rows"] if row["kind"] == "predictions"]
    return ["## By topic (accuracy %)", "", format_topics_markdown(summary["topics"], names)]


def _timing_section(summary):
    lines = ["## Timing", "", f"| model | load s | {summary['settings'].get('scoring', 'letter')} scoring s | "
             "questions/s | generation s | questions/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, t in summary["timing"].items():
        gen_s = f"{t['generate_s']:.1f}" if "generate_s" in t else "-"
        gen_q = f"{t['generate_questions_per_s']:.1f}" if t.get("generate_questions_per_s") else "-"
        lines.append(f"| {name} | {t['load_s']:.1f} | {t['scoring_s']:.1f} | {t['scoring_questions_per_s']:.1f} | "
                     f"{gen_s} | {gen_q} |")
    lines.append(f"\nTotal {summary['total_s']:.1f} s.")
    return lines


def _training_section(summary):
    lc = summary.get("loss_curve")
    if not lc or "error" in lc:
        return []
    best = (f"; best val loss {lc['best_val_loss']:.4f} at step {lc['best_val_step']}"
            if lc.get("best_val_loss") is not None else "")
    return ["## Training", "", "![loss curve](loss_curve.png)", "",
            f"From {', '.join(lc['sources'])}: {lc['train_points']} train points, "
            f"{lc['val_points']} val points{best}."]


def _files_section(summary):
    return ["## Files", "", *(f"- `{f}`" for f in summary["files"].values()), "",
            "![accuracy by category](accuracy_by_category.png)", ""]


def _benchmarks_section(summary):
    if not summary.get("benchmarks"):
        return None
    lines = benchmarks_markdown(summary["benchmarks"])
    lines += ["", "Time per benchmark (s, scoring and generation): " + "; ".join(
        f"{s['title']}: " + ", ".join(f"{n} {m['timing_s']:.1f}" for n, m in s["models"].items())
        for s in summary["benchmarks"]), "", "![benchmarks](benchmarks.png)"]
    return lines


REPORT_SECTIONS = (_models_section, _data_section, _settings_section, _accuracy_section, _paired_section,
                   _benchmarks_section,
                   _generation_section,
                   _explanations_section, _topics_section, _timing_section, _training_section, _files_section)


def report_markdown(summary):
    """report.md: the models, data, settings, the table, the paired differences (with an RL
    model), the benchmarks, generated answers, explanations
    (--explain), topics, timing, the loss curve and the files, from evaluate()'s summary."""
    lines = ["# ScienceQA evaluation"]
    for section in REPORT_SECTIONS:
        part = section(summary)
        if part:
            lines += ["", *part]
    return "\n".join(lines)

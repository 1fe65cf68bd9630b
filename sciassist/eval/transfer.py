"""Transfer and forgetting: the same models on other benchmarks, scored the same honest ways.

Per question and model (benchmark_run), from two teacher-forced passes and one greedy one:
- letter: the most probable letter after the answer prefix, among the question's letters
  (nanochat's "categorical" rule; with --prompt_style nanochat, its own prompt). The headline
  where it applies: it is the fine-tune's own answer format and nanochat's published metric,
  and it has no length bias (every option is one token). It does not apply to a text_first
  fine-tune (its answers name the option before the letter): there the headline is choice per
  character, which undoes the short-option bias of summed scores.
- choice: the option whose whole answer line (" A. <option>") has the highest summed
  log-probability. Summed log-probabilities favour short options, so also
- choice per token and choice per character: the same sums divided by the answer line's token
  count, or by the option text's length in characters (what lm-evaluation-harness's acc_norm
  divides by: `len(choice)`).
- generated: the greedy reply, parsed strictly; an unparseable reply is invalid and wrong.
Choice rules need the SciAssist answer prefix (prompt style sciassist).

Per benchmark (benchmark_summary): accuracy with 95% Wilson intervals per rule and model,
chance, the invalid-reply rate, how often each rule picks the shortest option, and the
fine-tuned minus base difference on the same questions with a 95% paired interval
(normal approximation on the per-question differences; sciassist.eval.table.paired_change);
with an RL model too, RL minus fine-tuned and RL minus base as well; MMLU also by subject group.
"""

import time

from sciassist.common import synchronize
from sciassist.data.answers import ANSWER_PREFIX, parse_answer
from sciassist.eval.questions import prompts_for
from sciassist.eval.scoring import argmax, choice_token_scores, generate_answers, letter_probabilities
from sciassist.eval.table import (
    COMPARISONS,
    MODEL_NAMES,
    MODEL_TITLES,
    accuracy_cell,
    chance_accuracy,
    comparison_key,
    paired_change,
    paired_changes,
)

RULES = ("letter", "choice", "choice_per_token", "choice_per_char", "generated")
RULE_TITLES = {"letter": "letter", "choice": "choice (summed)", "choice_per_token": "choice per token",
               "choice_per_char": "choice per character (acc_norm)", "generated": "greedy reply"}


def benchmark_run(model, tokenizer, records, prompt_style="sciassist", batch_size=32, generate=True,
                  max_new_tokens=32, answer_format="letter_first"):
    """{rule: per-question predicted option index (None = invalid reply)} for the RULES that
    apply to the prompt style and answer format, "headline" (the rule reported first) and
    "timing_s"."""
    prompts, prefix = prompts_for(records, prompt_style)
    choices = [r["meta"]["choices"] for r in records]
    num_choices = [len(c) for c in choices]
    device = model.get_device()
    synchronize(device)
    t0 = time.perf_counter()
    out = {}
    if prefix != ANSWER_PREFIX or answer_format == "letter_first":
        out["letter"] = [argmax(p) for p in letter_probabilities(model, tokenizer, prompts, num_choices, prefix,
                                                                 batch_size)]
    if prefix == ANSWER_PREFIX:
        continuations, token_scores = choice_token_scores(model, tokenizer, prompts, choices, prefix, batch_size,
                                                          answer_format)
        sums, per_token, per_char = [], [], []
        for lines, scores, options in zip(continuations, token_scores, choices, strict=True):
            total = [sum(s) for s in scores]
            sums.append(argmax(total))
            per_token.append(argmax([t / max(1, len(line)) for t, line in zip(total, lines, strict=True)]))
            per_char.append(argmax([t / max(1, len(text)) for t, text in zip(total, options, strict=True)]))
        out.update(choice=sums, choice_per_token=per_token, choice_per_char=per_char)
    if generate:
        texts = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
        out["generated"] = [parse_answer(t, k, prefix, c, answer_format)
                            for t, k, c in zip(texts, num_choices, choices, strict=True)]
    out["headline"] = "letter" if "letter" in out else "choice_per_char"
    synchronize(device)
    out["timing_s"] = time.perf_counter() - t0
    return out


def _shortest(choices):
    lengths = [len(c) for c in choices]
    return lengths.index(min(lengths))


def benchmark_summary(info, records, runs):
    """The benchmark's row data: info (load_benchmark's) + per rule and model the accuracy
    cell, invalid replies, shortest-option picks, and the paired change (base -> finetuned):
    "change" {rule: paired_change}. With an "rl" run, also "changes" {comparison key
    (rl_vs_finetuned, ...): {rule: paired_change}} for each comparison of the models given."""
    gold = [r["meta"]["answer"] for r in records]
    shortest = [_shortest(r["meta"]["choices"]) for r in records]
    summary = {**info, "count": len(records), "chance": 100 * chance_accuracy([len(r["meta"]["choices"])
                                                                               for r in records]),
               "gold_is_shortest": 100 * sum(g == s for g, s in zip(gold, shortest, strict=True)) / len(records),
               "headline": next(iter(runs.values()))["headline"], "models": {}, "change": {}, "groups": {}}
    headline = summary["headline"]
    correct = {}
    for name, run in runs.items():
        model = {"timing_s": run["timing_s"]}
        for rule in RULES:
            if rule not in run:
                continue
            predictions = run[rule]
            flags = [p == g for p, g in zip(predictions, gold, strict=True)]
            correct[(name, rule)] = flags
            cell = accuracy_cell(flags)
            cell["picks_shortest"] = 100 * sum(p == s for p, s in zip(predictions, shortest, strict=True)) / len(gold)
            if rule == "generated":
                cell["invalid"] = 100 * sum(p is None for p in predictions) / len(gold)
            model[rule] = cell
        summary["models"][name] = model
    if "base" in runs and "finetuned" in runs:
        for rule in RULES:
            if ("base", rule) in correct and ("finetuned", rule) in correct:
                summary["change"][rule] = paired_change(correct[("base", rule)], correct[("finetuned", rule)])
    if "rl" in runs:
        summary["changes"] = {}
        for rule in RULES:
            flags = {name: correct[(name, rule)] for name in runs if (name, rule) in correct}
            for key, change in paired_changes(flags).items():
                summary["changes"].setdefault(key, {})[rule] = change
    groups = sorted({r["meta"].get("topic") for r in records if r["meta"].get("topic")})
    if groups and info.get("benchmark", "").startswith("mmlu"):
        for group in groups:
            members = [i for i, r in enumerate(records) if r["meta"].get("topic") == group]
            summary["groups"][group] = {name: accuracy_cell([correct[(name, headline)][i] for i in members])
                                        for name in runs}
    return summary


def seconds_spent(timing):
    """The seconds of a model run's timing dict spent on the questions (not loading the model,
    and not its rates, questions_per_s)."""
    return sum(v for k, v in timing.items() if k.endswith("_s") and not k.endswith("_per_s") and k != "load_s")


def scienceqa_summary(records, runs, split, scoring):
    """ScienceQA's row in the same shape, from the main evaluation's runs (its scoring rule as
    the headline, its strictly parsed replies as generated)."""
    converted = {}
    for name, run in runs.items():
        converted[name] = {scoring: run["prediction"], "headline": scoring,
                           "timing_s": seconds_spent(run["timing"])}
        if run.get("generated_prediction") is not None:
            converted[name]["generated"] = run["generated_prediction"]
    info = {"benchmark": "scienceqa", "title": f"ScienceQA ({scoring} scoring)", "kind": "scienceqa", "split": split}
    return benchmark_summary(info, records, converted)


# ----------------------------------------------------------------------------- report

KIND_ORDER = {"scienceqa": 0, "transfer": 1, "forgetting": 2}
KIND_TITLES = {"scienceqa": "ScienceQA", "transfer": "transfer", "forgetting": "forgetting"}


def _cell(cell):
    if not cell or cell.get("accuracy") is None:
        return "-"
    return f"{cell['accuracy']:.1f} [{cell['ci95'][0]:.1f}, {cell['ci95'][1]:.1f}]"


def _change(change):
    if not change:
        return "-", "-"
    text = f"{change['difference']:+.1f} [{change['ci95'][0]:+.1f}, {change['ci95'][1]:+.1f}]"
    verdict = ("better" if change["difference"] > 0 else "worse") if change["beyond_noise"] else "within noise"
    return text, verdict


def change_cell(change, up="better", down="worse"):
    """A paired change as one cell: "+5.0 [+1.0, +9.0] better", or "... within noise"."""
    text, verdict = _change(change)
    if text == "-":
        return "-"
    if change["beyond_noise"]:
        verdict = up if change["difference"] > 0 else down
    return f"{text} {verdict}"


def _compared(rows):
    """(models in the pipeline's order, comparisons (later, earlier) of them) in these rows."""
    names = [n for n in MODEL_NAMES if any(n in s["models"] for s in rows)]
    return names, [(later, earlier) for later, earlier in COMPARISONS if later in names and earlier in names]


def _with_rl_markdown(rows):
    """The first two tables with an RL model: a column per model and one per comparison
    (sciassist.eval.table.COMPARISONS), each change with its 95% paired interval and verdict."""
    names, pairs = _compared(rows)
    titles = [MODEL_TITLES[n] for n in names]
    pair_titles = [f"{MODEL_TITLES[later]} - {MODEL_TITLES[earlier]}" for later, earlier in pairs]
    slash = " / ".join(titles)
    lines = ["## Beyond ScienceQA: transfer and forgetting", "",
             "Headline rule: **letter** scoring where the answer format has the letter first (the fine-tune's own "
             "answer and nanochat's published rule; no length bias), **choice per character** for a text_first "
             "fine-tune (summed choice scores favour short options; per character, as lm-eval's acc_norm, undoes "
             f"that); ScienceQA keeps its own scoring. Accuracy (%) with 95% Wilson intervals; {', '.join(pair_titles)}"
             ": the later model minus the earlier on the same questions, in points, with a 95% paired interval; "
             "\"within noise\" when it includes 0.", "",
             "| | benchmark | split | questions | rule | chance | " + " | ".join(titles + pair_titles)
             + f" | invalid replies ({slash}) |",
             "|---|---|---|---:|---|---:|" + "---:|" * (len(names) + len(pairs)) + "---:|"]

    def changes(s, rule):
        return [change_cell(s.get("changes", {}).get(comparison_key(*pair), {}).get(rule)) for pair in pairs]

    for s in rows:
        models, headline = [s["models"].get(n, {}) for n in names], s["headline"]
        invalid = " / ".join(f"{m['generated']['invalid']:.1f}" if "generated" in m else "-" for m in models)
        cells = [_cell(m.get(headline)) for m in models] + changes(s, headline)
        lines.append(f"| {KIND_TITLES.get(s['kind'], s['kind'])} | {s['title']} | {s['split']} | {s['count']} | "
                     f"{RULE_TITLES[headline]} | {s['chance']:.1f} | " + " | ".join(cells) + f" | {invalid} |")
    lines += ["", f"Every rule ({' -> '.join(titles)} accuracy, the changes, and how often the rule picks the "
              "shortest option; summed choice scores favour short options):", "",
              "| benchmark | rule | " + " | ".join(titles + pair_titles) + f" | picks shortest ({slash}) | "
              "gold is shortest |", "|---|---|" + "---:|" * (len(names) + len(pairs)) + "---:|---:|"]
    for s in rows:
        for rule in RULES:
            cells = [s["models"].get(n, {}).get(rule) for n in names]
            if all(c is None for c in cells):
                continue
            shortest = " / ".join(f"{c['picks_shortest']:.1f}" if c else "-" for c in cells)
            lines.append(f"| {s['title']} | {RULE_TITLES[rule]} | " + " | ".join([_cell(c) for c in cells]
                                                                                + changes(s, rule))
                         + f" | {shortest} | {s['gold_is_shortest']:.1f} |")
    return lines


def benchmarks_markdown(summaries):
    """The report's section: one table, ScienceQA first, then transfer, then forgetting; then
    the other scoring rules and MMLU's groups. With an RL model, every model and comparison
    gets its column (_with_rl_markdown); base and fine-tuned alone keep the two-model layout."""
    rows = sorted(summaries, key=lambda s: KIND_ORDER.get(s["kind"], 3))
    if "rl" in _compared(rows)[0]:
        return _with_rl_markdown(rows) + _groups_and_skipped(rows)
    lines = ["## Beyond ScienceQA: transfer and forgetting", "",
             "Headline rule: **letter** scoring where the answer format has the letter first (the fine-tune's own "
             "answer and nanochat's published rule; no length bias), **choice per character** for a text_first "
             "fine-tune (summed choice scores favour short options; per character, as lm-eval's acc_norm, undoes "
             "that); ScienceQA keeps its own scoring. Accuracy (%) with 95% Wilson intervals; change = fine-tuned "
             "minus base on the same questions, with a 95% paired interval; \"within noise\" when it includes 0.",
             "", "| | benchmark | split | questions | rule | chance | base | fine-tuned | change | verdict | invalid "
             "replies (base / fine-tuned) |", "|---|---|---|---:|---|---:|---:|---:|---:|---|---:|"]
    for s in rows:
        base, ft, headline = s["models"].get("base", {}), s["models"].get("finetuned", {}), s["headline"]
        change, verdict = _change(s["change"].get(headline))
        invalid = " / ".join(f"{m['generated']['invalid']:.1f}" if "generated" in m else "-" for m in (base, ft))
        lines.append(f"| {KIND_TITLES.get(s['kind'], s['kind'])} | {s['title']} | {s['split']} | {s['count']} | "
                     f"{RULE_TITLES[headline]} | {s['chance']:.1f} | {_cell(base.get(headline))} | "
                     f"{_cell(ft.get(headline))} | {change} | {verdict} | {invalid} |")
    lines += ["", "Every rule (base -> fine-tuned accuracy, change, and how often the rule picks the shortest "
              "option; summed choice scores favour short options):", "",
              "| benchmark | rule | base | fine-tuned | change | verdict | picks shortest (base / fine-tuned) | "
              "gold is shortest |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for s in rows:
        for rule in RULES:
            base, ft = s["models"].get("base", {}).get(rule), s["models"].get("finetuned", {}).get(rule)
            if base is None and ft is None:
                continue
            change, verdict = _change(s["change"].get(rule))
            shortest = " / ".join(f"{c['picks_shortest']:.1f}" if c else "-" for c in (base, ft))
            lines.append(f"| {s['title']} | {RULE_TITLES[rule]} | {_cell(base)} | {_cell(ft)} | {change} | {verdict} | "
                         f"{shortest} | {s['gold_is_shortest']:.1f} |")
    return lines + _groups_and_skipped(rows)


def _groups_and_skipped(rows):
    """MMLU's subject groups (a column per model) and the questions left out, per benchmark."""
    lines = []
    for s in rows:
        if s["groups"]:
            lines += ["", f"{s['title']} by subject group ({RULE_TITLES[s['headline']]} scoring):", "",
                      "| group | questions | " + " | ".join(s["models"]) + " |",
                      "|---|---:|" + "---:|" * len(s["models"])]
            for group, cells in s["groups"].items():
                count = next(iter(cells.values()))["count"]
                lines.append(f"| {group} | {count} | " + " | ".join(_cell(cells[n]) for n in s["models"]) + " |")
    skipped = [(s["title"], s["skipped"]) for s in rows if s.get("skipped")]
    for title, counts in skipped:
        lines.append("")
        lines.append(f"{title}: left out " + ", ".join(f"{n} question{'s' if n != 1 else ''} with {why}"
                                                    for why, n in counts.items())
                     + " (two options with the same text cannot be scored fairly)")
    return lines


def draw_benchmark_chart(path, summaries):
    """benchmarks.png: base, fine-tuned and RL headline accuracy (those evaluated) per benchmark
    with 95% intervals and each benchmark's chance level."""
    import matplotlib  # deferred: only drawing needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(summaries, key=lambda s: KIND_ORDER.get(s["kind"], 3))
    names = _compared(rows)[0]
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.2))
    for k, name in enumerate(names):
        xs, ys, errs = [], [], [[], []]
        for i, s in enumerate(rows):
            cell = s["models"].get(name, {}).get(s["headline"])
            if cell and cell["accuracy"] is not None:
                xs.append(i + (k - (len(names) - 1) / 2) * width)
                ys.append(cell["accuracy"])
                errs[0].append(cell["accuracy"] - cell["ci95"][0])
                errs[1].append(cell["ci95"][1] - cell["accuracy"])
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=name)
    for i, s in enumerate(rows):
        ax.hlines(s["chance"], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                  label="chance" if i == 0 else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([s["title"] for s in rows], rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("ScienceQA, transfer and forgetting (headline rule of each, 95% intervals)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

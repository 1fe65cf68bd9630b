"""
Plots of a fine-tuning run and of its evaluation.

- plot_loss_curve: train loss (raw and smoothed), validation loss, best step marked; read
  from the run's metrics.jsonl and/or a text log of an older run (the original project's).
- plot_accuracy_by_category: ScienceQA accuracy per column (NAT, SOC, ..., Avg), one bar
  per model, the chance level of each column as a short line.
- plot_rl_curves: an RL run's reward per step (raw and smoothed) and its validations (greedy
  accuracy, pass@k, maj@k), read from its metrics.jsonl.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): training calls
plot_loss_curve at every evaluation, possibly in a notebook whose interactive backend must
not be switched, and pyplot's global state is neither needed nor thread-safe.
"""

import json
import math
import os
import re
from pathlib import Path

# -----------------------------------------------------------------------------
# reading loss values


def read_metrics(metrics_path):
    """Read a run's metrics.jsonl into {"train": [(step, loss)], "val": [(step, loss)]}.

    Accepted record shapes (one JSON object per line): {"step", "train_loss"} and/or
    {"step", "val_loss"}, or {"step", "loss"} with an optional "kind"/"split"/"type"/"event"
    of "val"/"eval"/"validation" (anything else counts as train). Lines that are not JSON
    objects are skipped: the file may be read while training is appending to it.
    """
    series = {"train": [], "val": []}
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line while training appends
            if not isinstance(record, dict):
                continue
            step = record.get("step")
            if not isinstance(step, (int, float)) or isinstance(step, bool):
                continue
            kind = str(record.get("kind") or record.get("split") or record.get("type") or record.get("event") or "")
            is_val_record = kind.lower() in ("val", "eval", "validation")
            for key, target in (("train_loss", "train"), ("val_loss", "val"),
                                ("loss", "val" if is_val_record else "train")):
                value = record.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    series[target].append((int(step), float(value)))
    return series


# One regex for the step, one for every "<kind> loss <value>" on the line. Written to accept
# the forms seen in nanochat-style logs:
#   "Step 25/748 | train loss: 1.234 | val loss: 1.100"
#   "step 00025/00748 (3.34%) | loss: 1.234567 | lrm: 1.00 | ..."
#   "Step 00025 | Validation loss: 1.100"   "Step 00025/00748 | Training loss: 1.23| lrm: 0.9"
#   "step=25 train_loss=1.23 val_loss=1.10"  "iter 25: loss 1.23"
_STEP_RE = re.compile(r"\b(?:step|iter|iteration)\b\s*[:#=]?\s*(\d+)", re.IGNORECASE)
# (?<![A-Za-z]) rather than \b: in "val_loss" the underscore is a word character
_LOSS_RE = re.compile(
    r"(?:(?<![A-Za-z])(train|training|val|valid|validation|eval|evaluation|test)[\s_-]*)?"
    r"(?<![A-Za-z])loss(?![A-Za-z])\s*(?:[:=]|is)?\s*"
    r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)",
    re.IGNORECASE,
)
_BEST_BEFORE_RE = re.compile(r"best[\s_-]*$", re.IGNORECASE)
_VAL_WORD_RE = re.compile(r"(?<![A-Za-z])(val|valid|validation|eval|evaluation)(?![A-Za-z])", re.IGNORECASE)


def parse_training_log(log_file):
    """Loss values of a plain-text training log: {"train": [(step, loss)], "val": [...]}.

    A line counts when it names a step ("step 25", "Step 25/748", "step=25", "iter 25")
    and at least one loss ("train loss: 1.2", "Validation loss: 1.1", "loss 1.2",
    "val_loss=1.1"). A bare "loss" is a validation loss when the line mentions
    validation/eval, else a training loss. Raises ValueError when no line matches, with
    examples of what was expected, so a wrong file is not plotted as an empty chart.
    """
    series = {"train": [], "val": []}
    with open(log_file, encoding="utf-8", errors="replace") as f:
        for line in f:
            step_match = _STEP_RE.search(line)
            if step_match is None:
                continue
            step = int(step_match.group(1))
            for match in _LOSS_RE.finditer(line):
                if _BEST_BEFORE_RE.search(line[:match.start()]):
                    continue  # "best val loss" repeats an earlier value, it is no new point
                kind, value = match.group(1) or "", float(match.group(2))
                if not math.isfinite(value):
                    continue
                kind = kind.lower()
                if kind in ("train", "training"):
                    target = "train"
                elif kind:
                    target = "val"
                else:
                    target = "val" if _VAL_WORD_RE.search(line) else "train"
                series[target].append((step, value))
    if not series["train"] and not series["val"]:
        raise ValueError(
            f"{log_file}: no loss values found; expected lines like "
            f"'Step 25/748 | train loss: 1.234 | val loss: 1.100' or 'step 00025 | loss: 1.234'"
        )
    return series


# -----------------------------------------------------------------------------
# smoothing and the best step


def smooth(values, beta=0.9):
    """Bias-corrected exponential moving average (as in Adam): early points are not dragged
    towards zero, so the smoothed curve starts where the raw one does."""
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = beta * average + (1 - beta) * v
        out.append(average / (1 - beta ** i))
    return out


def best_point(points):
    """(step, loss) of the lowest loss; the earliest one on ties. None for no points."""
    if not points:
        return None
    return min(points, key=lambda p: (p[1], p[0]))


# -----------------------------------------------------------------------------
# figures


def _new_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_path):
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    return out_path


def _draw_series(ax, series, label_suffix, style):
    train = sorted(series["train"])
    val = sorted(series["val"])
    if train:
        steps, losses = [p[0] for p in train], [p[1] for p in train]
        # the raw curve is noisy per batch: faint, with the smoothed trend on top
        ax.plot(steps, losses, style, color="tab:blue", alpha=0.25, linewidth=1, label=f"train (raw){label_suffix}")
        beta = 0.9 if len(losses) >= 20 else 0.5
        ax.plot(steps, smooth(losses, beta), style, color="tab:blue", linewidth=2,
                label=f"train (smoothed){label_suffix}")
    if val:
        ax.plot([p[0] for p in val], [p[1] for p in val], style, color="tab:orange", marker="o", markersize=3,
                linewidth=2, label=f"val{label_suffix}")
        step, loss = best_point(val)
        ax.plot([step], [loss], marker="*", color="tab:red", markersize=14, linestyle="none",
                label=f"best val {loss:.3f} @ step {step}{label_suffix}")
        ax.axvline(step, color="tab:red", alpha=0.3, linestyle=":")


def plot_loss_curve(metrics_path, out_path, log_file=None, title="Training and validation loss"):
    """Draw the loss curve of a run from metrics.jsonl (metrics_path, may be None) and/or a
    text log (log_file), write it to out_path (PNG) and return a summary dict:
    {"train_points", "val_points", "best_val_step", "best_val_loss", "sources"}.
    With both, the log's curves are dashed so the two runs can be told apart."""
    sources = []
    if metrics_path is not None:
        sources.append((str(metrics_path), read_metrics(metrics_path), "-", ""))
    if log_file is not None:
        suffix = " (log)" if metrics_path is not None else ""
        sources.append((str(log_file), parse_training_log(log_file), "--" if metrics_path is not None else "-", suffix))
    if not sources:
        raise ValueError("plot_loss_curve needs metrics_path or log_file")
    if not any(s["train"] or s["val"] for _, s, _, _ in sources):
        raise ValueError(f"{', '.join(name for name, *_ in sources)}: no loss values to plot")

    fig = _new_figure(9, 5)
    ax = fig.add_subplot(1, 1, 1)
    for _, series, style, suffix in sources:
        _draw_series(ax, series, suffix, style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)

    # the summary describes the primary source (metrics.jsonl when given)
    primary = sources[0][1]
    best = best_point(primary["val"])
    return {
        "train_points": len(primary["train"]),
        "val_points": len(primary["val"]),
        "best_val_step": best[0] if best else None,
        "best_val_loss": best[1] if best else None,
        "sources": [name for name, *_ in sources],
    }


def plot_accuracy_by_category(columns, accuracies, out_path, chance=None, counts=None,
                              title="ScienceQA accuracy by category"):
    """Grouped bars: accuracies {model name: [percent or None per column]}; chance: the
    chance percent per column (drawn as a short black line over each group); counts: the
    number of questions per column (shown under the column names). None = n/a (no bar).
    Writes a PNG to out_path and returns out_path."""
    names = list(accuracies)
    if not names:
        raise ValueError("plot_accuracy_by_category needs at least one model")
    for name in names:
        if len(accuracies[name]) != len(columns):
            raise ValueError(f"model {name!r}: {len(accuracies[name])} values for {len(columns)} columns")
    fig = _new_figure(max(8, 1.1 * len(columns) + 2), 5)
    ax = fig.add_subplot(1, 1, 1)
    group_width = 0.8
    bar_width = group_width / len(names)
    for j, name in enumerate(names):
        xs, heights = [], []
        for i, value in enumerate(accuracies[name]):
            if value is not None:
                xs.append(i - group_width / 2 + (j + 0.5) * bar_width)
                heights.append(value)
        bars = ax.bar(xs, heights, width=bar_width, label=name)
        for bar, value in zip(bars, heights, strict=True):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.8, f"{value:.1f}", ha="center", va="bottom",
                    fontsize=7)
    if chance is not None:
        labelled = False
        for i, value in enumerate(chance):
            if value is None:
                continue
            ax.hlines(value, i - group_width / 2, i + group_width / 2, colors="black", linestyles="--", linewidth=1.5,
                      label=None if labelled else "chance")
            labelled = True
    labels = list(columns)
    if counts is not None:
        labels = [f"{c}\n(n={n})" if n else f"{c}\n(n/a)" for c, n in zip(columns, counts, strict=True)]
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _save(fig, out_path)


# -----------------------------------------------------------------------------
# reinforcement learning


def read_json_lines(path):
    """The JSON objects of a JSONL file; other lines (a half-written last one) are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _save_atomically(fig, out_path):
    """Save to a temporary file beside out_path, then rename: a reader never sees half a PNG."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def plot_rl_curves(metrics_path, out_path, title="Reinforcement learning"):
    """Two panels from an RL run's metrics.jsonl: the sampled replies' mean reward per step (raw
    and smoothed), and at each validation the greedy accuracy, pass@k (one line per k) and maj@k
    of the largest k. Writes a PNG atomically to out_path and returns {"steps", "validations"}."""
    records = read_json_lines(metrics_path)
    rewards = sorted((r["step"], r["reward_mean"]) for r in records if _number(r.get("step"))
                     and _number(r.get("reward_mean")))
    validations = sorted((r for r in records if _number(r.get("step")) and _number(r.get("val_accuracy"))),
                         key=lambda r: r["step"])
    if not rewards and not validations:
        raise ValueError(f"{metrics_path}: no reward or validation values to plot")
    fig = _new_figure(12, 4.5)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    if rewards:
        steps, values = [p[0] for p in rewards], [p[1] for p in rewards]
        left.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=1, label="reward mean (raw)")
        left.plot(steps, smooth(values, 0.9 if len(values) >= 20 else 0.5), color="tab:blue", linewidth=2,
                  label="reward mean (smoothed)")
        left.legend(loc="lower right", fontsize=8)
    left.set_xlabel("step")
    left.set_ylabel("reward")
    left.set_title("sampled replies")
    left.grid(True, alpha=0.3)
    if validations:
        steps = [r["step"] for r in validations]
        right.plot(steps, [r["val_accuracy"] for r in validations], color="black", marker="o", markersize=3,
                   linewidth=2, label="greedy accuracy")
        ks = sorted({int(key.split("@")[1]) for r in validations for key in r if key.startswith("val_pass@")})
        colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
        for i, k in enumerate(ks):
            points = [(r["step"], r[f"val_pass@{k}"]) for r in validations if _number(r.get(f"val_pass@{k}"))]
            right.plot([p[0] for p in points], [p[1] for p in points], color=colors[i % len(colors)], marker="o",
                       markersize=3, linewidth=1.5, label=f"pass@{k}")
        if ks:
            points = [(r["step"], r[f"val_maj@{ks[-1]}"]) for r in validations if _number(r.get(f"val_maj@{ks[-1]}"))]
            right.plot([p[0] for p in points], [p[1] for p in points], "--", color="gray", marker="s", markersize=3,
                       linewidth=1.5, label=f"maj@{ks[-1]}")
        right.legend(loc="lower right", fontsize=8)
    right.set_ylim(0, 1.02)
    right.set_xlabel("step")
    right.set_ylabel("fraction of validation questions")
    right.set_title("validation")
    right.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _save_atomically(fig, out_path)
    return {"steps": len(rewards), "validations": len(validations)}

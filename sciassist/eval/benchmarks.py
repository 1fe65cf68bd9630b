"""Science benchmarks beyond ScienceQA, read into the evaluator's question records.

Transfer: ARC-Easy, ARC-Challenge (grade-school science exams), OpenBookQA (elementary
science), SciQ (crowd-written science questions). Forgetting: MMLU (57 subjects; a science
group, and any one subject). Each is read from the Hugging Face hub at a pinned revision, or
from a local root laid out as `datasets` `save_to_disk` folders (`<root>/ai2_arc/ARC-Easy/
validation`, `<root>/mmlu/<subject>/test`, ...) or JSONL files at the same paths plus
`.jsonl`, with the hub's columns. Every record is checked; a bad one stops the load with one
line naming the benchmark, split, id and field.

A question becomes the same kind of record as a prepared ScienceQA one (sciassist.data.
scienceqa.format_record: the tutor's system prompt, the question, lettered options, the gold
answer line), so every scoring rule and prompt style of the evaluator applies unchanged.
"""

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sciassist.data import scienceqa as sqa
from sciassist.eval.questions import MAX_CHOICES, EvaluationError

# Hub revisions the loaders are pinned to (the repositories' main at the time of writing).
REVISIONS = {
    "allenai/ai2_arc": "210d026faf9955653af8916fad021475a3f00453",
    "allenai/openbookqa": "388097ea7776314e93a529163e0fea805b8a6454",
    "allenai/sciq": "2c94ad3e1aafab77146f384e23536f97a4849815",
    "cais/mmlu": "c30699e8356da336a370243923dbaf21066bb9fe",
}

# MMLU's subjects by the four groups of its paper (Hendrycks et al., 2021).
MMLU_GROUPS = {
    "STEM": ("abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
             "college_mathematics", "college_physics", "computer_security", "conceptual_physics",
             "electrical_engineering", "elementary_mathematics", "high_school_biology", "high_school_chemistry",
             "high_school_computer_science", "high_school_mathematics", "high_school_physics",
             "high_school_statistics", "machine_learning"),
    "humanities": ("formal_logic", "high_school_european_history", "high_school_us_history",
                   "high_school_world_history", "international_law", "jurisprudence", "logical_fallacies",
                   "moral_disputes", "moral_scenarios", "philosophy", "prehistory", "professional_law",
                   "world_religions"),
    "social sciences": ("econometrics", "high_school_geography", "high_school_government_and_politics",
                        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
                        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
                        "sociology", "us_foreign_policy"),
    "other": ("anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
              "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
              "professional_medicine", "virology"),
}
MMLU_SUBJECTS = tuple(sorted(s for group in MMLU_GROUPS.values() for s in group))
MMLU_GROUP_OF = {s: group for group, subjects in MMLU_GROUPS.items() for s in subjects}
# The natural-science subjects: the part of MMLU closest to what a science tutor learns.
MMLU_SCIENCE = ("anatomy", "astronomy", "college_biology", "college_chemistry", "college_physics",
                "conceptual_physics", "high_school_biology", "high_school_chemistry", "high_school_physics",
                "medical_genetics", "virology")

SPLITS = {"train": "train", "val": "validation", "test": "test", "dev": "dev"}  # ours -> the hub's


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    kind: str  # "transfer" (science next door) or "forgetting" (general knowledge)
    repo: str
    config: str | None  # the hub config; "{subject}" for MMLU
    local: str  # the path under a local root; {split} (and {subject}) filled in
    subjects: tuple = ()  # MMLU: the subjects read


_ARC = dict(kind="transfer", repo="allenai/ai2_arc")
BENCHMARKS = {
    "arc_easy": Benchmark("arc_easy", "ARC-Easy", config="ARC-Easy", local="ai2_arc/ARC-Easy/{split}", **_ARC),
    "arc_challenge": Benchmark("arc_challenge", "ARC-Challenge", config="ARC-Challenge",
                               local="ai2_arc/ARC-Challenge/{split}", **_ARC),
    "openbookqa": Benchmark("openbookqa", "OpenBookQA", "transfer", "allenai/openbookqa", "main",
                            "openbookqa/main/{split}"),
    "sciq": Benchmark("sciq", "SciQ", "transfer", "allenai/sciq", None, "sciq/{split}"),
    "mmlu": Benchmark("mmlu", "MMLU", "forgetting", "cais/mmlu", "{subject}", "mmlu/{subject}/{split}",
                      MMLU_SUBJECTS),
    "mmlu_science": Benchmark("mmlu_science", "MMLU science", "forgetting", "cais/mmlu", "{subject}",
                              "mmlu/{subject}/{split}", MMLU_SCIENCE),
}


def parse_benchmarks(text):
    """"arc_easy,mmlu:anatomy,mmlu_science" -> [Benchmark]; an unknown name or subject is an
    EvaluationError listing the valid ones."""
    chosen = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, _, subject = part.partition(":")
        if name == "mmlu" and subject:
            if subject not in MMLU_SUBJECTS:
                raise EvaluationError(f"--benchmarks: no MMLU subject {subject!r}; the subjects are "
                                      f"{', '.join(MMLU_SUBJECTS)}")
            base = BENCHMARKS["mmlu"]
            chosen.append(Benchmark(part, f"MMLU {subject.replace('_', ' ')}", base.kind, base.repo, base.config,
                                    base.local, (subject,)))
        elif name in BENCHMARKS and not subject:
            chosen.append(BENCHMARKS[name])
        else:
            raise EvaluationError(f"--benchmarks: unknown benchmark {part!r}; expected a comma-separated list of "
                                  f"{', '.join(BENCHMARKS)} or mmlu:<subject>")
    names = [b.name for b in chosen]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EvaluationError(f"--benchmarks names {', '.join(repeated)} more than once")
    return chosen


# ----------------------------------------------------------------------------- reading rows

def _hub_rows(benchmark, subject, hub_split, revision):
    import datasets  # deferred: only the hub path needs it at call time
    config = benchmark.config.format(subject=subject) if benchmark.config else None
    rev = revision or REVISIONS[benchmark.repo]
    try:
        data = datasets.load_dataset(benchmark.repo, config, split=hub_split, revision=rev)
    except Exception as e:  # no network, no such split: one line that says where it looked
        raise EvaluationError(f"{benchmark.name}: cannot read {benchmark.repo} ({config or 'default'}, {hub_split}) "
                              f"at revision {rev} from the Hugging Face hub: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}. Use --benchmark_dir with a local copy."
                              ) from None
    return [dict(row) for row in data], f"hf:{benchmark.repo}@{rev[:12]}"


def _local_rows(benchmark, subject, hub_split, root):
    path = Path(root) / benchmark.local.format(split=hub_split, subject=subject)
    jsonl = path.with_name(path.name + ".jsonl")
    if path.is_dir():
        import datasets  # deferred: only `datasets` folders need it
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as e:
            raise EvaluationError(f"{benchmark.name}: {path} is not a `datasets` folder: {e}") from None
        return [dict(row) for row in data], str(path)
    if jsonl.is_file():
        rows = []
        for number, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{jsonl}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise EvaluationError(f"{jsonl}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows, str(jsonl)
    raise EvaluationError(f"{benchmark.name}: neither {path} (a `datasets` folder) nor {jsonl} exists under "
                          f"--benchmark_dir {root}")


# ----------------------------------------------------------------------------- rows -> questions

class _Bad(Exception):
    def __init__(self, field, problem):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


class _Ambiguous(Exception):
    """A well-formed question that cannot be scored fairly (two options with the same text):
    left out and counted in the load's info, never dropped silently."""


def _text(row, field):
    value = row.get(field)
    if not isinstance(value, str) or not value.strip():
        raise _Bad(field, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _options(row, field="choices"):
    """ARC / OpenBookQA: {"text": [...], "label": [...]} and answerKey, a label (a letter, or a
    digit in some ARC questions) -> (options, answer index)."""
    choices = row.get(field)
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list) or len(choices["text"]) != len(choices["label"]):
        raise _Bad(field, f"must be {{'text': [...], 'label': [...]}} of equal lengths, got {choices!r}")
    texts = [t.strip() if isinstance(t, str) else t for t in choices["text"]]
    if not all(isinstance(t, str) and t for t in texts):
        raise _Bad(f"{field}.text", f"must be non-empty strings, got {choices['text']!r}")
    key = row.get("answerKey")
    labels = [str(label).strip() for label in choices["label"]]
    if not isinstance(key, str) or key.strip() not in labels:
        raise _Bad("answerKey", f"{key!r} is not one of the labels {labels}")
    return texts, labels.index(key.strip())


def _sciq_options(row, seed):
    """SciQ has no letters: the correct answer and three distractors, put in an order drawn from
    numpy's default_rng([seed, crc32 of the question]), the same in every run and every process."""
    question = _text(row, "question")
    options = [_text(row, f) for f in ("correct_answer", "distractor1", "distractor2", "distractor3")]
    order = np.random.default_rng([seed, zlib.crc32(question.encode("utf-8"))]).permutation(len(options)).tolist()
    return [options[i] for i in order], order.index(0)


def _mmlu_options(row):
    choices = row.get("choices")
    if not isinstance(choices, list) or not all(isinstance(c, str) and c.strip() for c in choices):
        raise _Bad("choices", f"must be a list of non-empty strings, got {choices!r}")
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise _Bad("answer", f"must be an index into the {len(choices)} choices, got {answer!r}")
    return [c.strip() for c in choices], answer


def _question(benchmark, subject, row, index, seed):
    """(id, question text, options, answer index) of one hub row."""
    if benchmark.repo == "allenai/ai2_arc":
        qid, question = row.get("id"), _text(row, "question")
        options, answer = _options(row)
    elif benchmark.repo == "allenai/openbookqa":
        qid, question = row.get("id"), _text(row, "question_stem")
        options, answer = _options(row)
    elif benchmark.repo == "allenai/sciq":
        qid = index
        options, answer = _sciq_options(row, seed)
        question = _text(row, "question")
    else:
        qid, question = f"{subject}-{index}", _text(row, "question")
        options, answer = _mmlu_options(row)
    if not 2 <= len(options) <= MAX_CHOICES:
        raise _Bad("choices", f"has {len(options)} options; 2 to {MAX_CHOICES} can be scored")
    if len(set(options)) != len(options):
        raise _Ambiguous("an option repeated")
    return str(qid if qid is not None else index), question, options, answer


def load_benchmark(benchmark, split="val", root=None, seed=42, limit=None, revision=None, options=None):
    """The questions of `benchmark` (a Benchmark) in `split` (train | val | test | dev): from
    the local root `root` when given, else from the hub at REVISIONS (or `revision`). limit:
    a seeded subset of that many (numpy default_rng(seed), the order kept). Returns (records,
    info). options: sciassist.data.scienceqa.FormatOptions to write the questions with (default:
    the prepared ScienceQA data's); evaluate() passes those of the ScienceQA questions it scores,
    so a benchmark is asked as the fine-tune was trained."""
    hub_split = SPLITS.get(split)
    if hub_split is None:
        raise EvaluationError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    options = options or sqa.FormatOptions()
    records, sources, skipped = [], [], {}
    for subject in benchmark.subjects or (None,):
        rows, source = (_local_rows(benchmark, subject, hub_split, root) if root is not None
                        else _hub_rows(benchmark, subject, hub_split, revision))
        sources.append(source)
        for index, row in enumerate(rows):
            try:
                qid, question, choices, answer = _question(benchmark, subject, row, index, seed)
            except _Ambiguous as reason:
                skipped[str(reason)] = skipped.get(str(reason), 0) + 1
                continue
            except _Bad as bad:
                shown = row.get("id", index) if isinstance(row, dict) else index
                raise EvaluationError(f"{benchmark.name} {hub_split}: record {shown}: field {bad.field!r} "
                                      f"{bad.problem}") from None
            raw = {"pid": f"{benchmark.name.partition(':')[0]}:{qid}", "split": split, "question": question,
                   "choices": choices, "answer": answer, "hint": "", "image": None, "has_image": False,
                   "lecture": "", "solution": "",
                   "subject": subject or benchmark.title, "topic": MMLU_GROUP_OF.get(subject), "grade": None,
                   "category": subject}
            records.append(sqa.format_record(raw, options))
    available = len(records)
    if limit is not None and limit < available:
        keep = sorted(np.random.default_rng(seed).choice(available, size=limit, replace=False).tolist())
        records = [records[i] for i in keep]
    pids = [r["meta"]["pid"] for r in records]
    if len(set(pids)) != len(pids):
        repeated = next(p for p in pids if pids.count(p) > 1)
        raise EvaluationError(f"{benchmark.name} {hub_split}: id {repeated!r} appears more than once")
    info = {"benchmark": benchmark.name, "title": benchmark.title, "kind": benchmark.kind, "split": hub_split,
            "source": sources[0] if len(sources) == 1 else f"{len(sources)} subjects from "
                                                           f"{Path(sources[0]).parent.parent if root else sources[0]}",
            "available": available + sum(skipped.values()), "skipped": skipped, "count": len(records),
            "selection": f"seeded subset (seed {seed})" if limit is not None and limit < available else "whole split"}
    return records, info

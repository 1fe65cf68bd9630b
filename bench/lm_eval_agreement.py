"""
Agreement with EleutherAI's lm-evaluation-harness on ARC-Easy validation, offline.

A nanochat model (a checkpoint you give, or a random one with a tokenizer trained on the
questions) is exported to transformers (sciassist.export) and evaluated by lm-eval's own `hf`
model on a task file that reads the local ARC-Easy copy with lm-eval's ARC prompt
("Question: ...\\nAnswer:", each option " <text>", acc and acc_norm). The same nanochat weights
are then scored by SciAssist's text scorer (sciassist.eval.scoring.text_continuation_scores:
lm-eval's context/continuation split, no <|bos|>, as lm-eval gives this tokenizer) with the
same two metrics. Prints both accuracies, their difference, the questions whose answer differs
and the largest difference between per-option log-likelihoods.

    pip install lm_eval
    python bench/lm_eval_agreement.py [--arc ../shared/benchmarks/ai2_arc/ARC-Easy/validation]
        [--checkpoint SPEC] [--limit N] [--out DIR]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from random_model import random_gpt  # noqa: E402

from nanochat.checkpoint import load_model, save_checkpoint  # noqa: E402
from nanochat.gpt import GPTConfig  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from sciassist.eval.scoring import text_continuation_scores  # noqa: E402
from sciassist.export import ExportSettings, export  # noqa: E402

DEFAULT_ARC = REPO_ROOT.parent / "shared" / "benchmarks" / "ai2_arc" / "ARC-Easy" / "validation"
TASK = """task: arc_easy_local
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {arrow}
validation_split: validation
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def random_checkpoint(docs, folder):
    """A random GPT (depth 2, width 256, output projections drawn so blocks do something) and a
    1,024-token tokenizer trained on the questions, in nanochat's layout."""
    texts = [d["question"] + " " + " ".join(d["choices"]["text"]) for d in docs]
    tokenizer = Tokenizer.train_from_iterator(texts * 2, vocab_size=1024)
    tokenizer.save(folder / "tokenizer")
    config = GPTConfig(sequence_len=512, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2, n_embd=256)
    model = random_gpt(config, "cpu", seed=0)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 0.3)
    checkpoint = folder / "base_checkpoints" / "d2"
    save_checkpoint(checkpoint, 0, model, {"model_config": config.__dict__})
    return checkpoint


def ours(checkpoint, docs, batch_size):
    model, tokenizer, _ = load_model(checkpoint, device="cpu")
    model.eval()
    contexts = [f"Question: {d['question']}\nAnswer:" for d in docs]
    options = [[" " + t for t in d["choices"]["text"]] for d in docs]
    return text_continuation_scores(model, tokenizer, contexts, options, batch_size)


def theirs(export_dir, arrow, work, limit, batch_size):
    import lm_eval
    from lm_eval.tasks import TaskManager
    tasks = work / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "arc_easy_local.yaml").write_text(TASK.format(arrow=arrow), encoding="utf-8")
    result = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={export_dir},dtype=float32",
                                     tasks=["arc_easy_local"], task_manager=TaskManager(include_path=str(tasks)),
                                     device="cpu", batch_size=batch_size, limit=limit, log_samples=True)
    samples = sorted(result["samples"]["arc_easy_local"], key=lambda s: s["doc_id"])
    lls = [[float(r[0]) for r in s["filtered_resps"]] for s in samples]
    return result["results"]["arc_easy_local"], lls


def accuracy(lls, docs, normalise):
    correct = 0
    for scores, d in zip(lls, docs, strict=True):
        lengths = [len(t) for t in d["choices"]["text"]]
        values = [s / n for s, n in zip(scores, lengths, strict=True)] if normalise else scores
        correct += values.index(max(values)) == d["choices"]["label"].index(d["answerKey"])
    return 100 * correct / len(docs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arc", default=str(DEFAULT_ARC), help="ARC-Easy validation as a `datasets` folder")
    parser.add_argument("--checkpoint", default=None, help="a nanochat checkpoint folder (default: a random model)")
    parser.add_argument("--limit", type=int, default=None, help="the first N questions (default: all)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", default=None, help="also write agreement.json here")
    args = parser.parse_args(argv)
    import datasets
    arc = Path(args.arc)
    all_docs = [dict(d) for d in datasets.load_from_disk(str(arc))]
    docs = all_docs[:args.limit] if args.limit else all_docs
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(all_docs, work)
        export_dir = work / "hf"
        export(ExportSettings(checkpoint=str(checkpoint), out_dir=str(export_dir), device="cpu"))
        t0 = time.perf_counter()
        ours_lls = ours(checkpoint, docs, args.batch_size)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics, their_lls = theirs(export_dir, next(arc.glob("*.arrow")), work, args.limit, args.batch_size)
        theirs_s = time.perf_counter() - t0
    rows = {}
    for name, normalise in (("acc", False), ("acc_norm", True)):
        rows[name] = {"lm_eval": 100 * metrics[f"{name},none"], "sciassist": accuracy(ours_lls, docs, normalise),
                      "sciassist_on_lm_eval_lls": accuracy(their_lls, docs, normalise)}
    differ = sum(a.index(max(a)) != b.index(max(b)) for a, b in zip(ours_lls, their_lls, strict=True))
    max_diff = max(abs(x - y) for a, b in zip(ours_lls, their_lls, strict=True) for x, y in zip(a, b, strict=True))
    report = {"questions": len(docs), "checkpoint": args.checkpoint or "random d2 (width 256)",
              "torch": torch.__version__, "metrics": rows, "questions_whose_acc_answer_differs": differ,
              "max_abs_loglik_difference": max_diff, "sciassist_s": ours_s, "lm_eval_s": theirs_s}
    print(f"ARC-Easy validation, {len(docs)} questions, {report['checkpoint']}, torch {torch.__version__}")
    print("| metric | lm-eval | SciAssist | difference |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['lm_eval']:.2f} | {r['sciassist']:.2f} | {r['sciassist'] - r['lm_eval']:+.2f} |")
    print(f"answers that differ (acc): {differ}; largest |log-likelihood difference|: {max_diff:.2e}; "
          f"time: SciAssist {ours_s:.1f} s, lm-eval {theirs_s:.1f} s")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "agreement.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

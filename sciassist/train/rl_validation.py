"""Whether RL is working: the validation of an RL run, at step 0, every --eval_every steps and at
the end, on the questions of --val_path as written (options not shuffled).

Greedy: one reply (temperature 0) to each of the first --eval_questions, read by the evaluator's
strict parser: accuracy, invalid rate, mean reward, what `sciassist evaluate` would count.

Sampled: n = --val_samples replies (default samples_per_question) to each of the first
--val_questions, at the training temperature and top-k, so it measures the policy being trained.
From a question's n replies, c of them correct:

  pass@k = 1 - C(n-c, k) / C(n, k)      the unbiased estimate of "one of k replies is correct"
                                        (Chen et al. 2021), averaged over the questions
  maj@k  = whether the majority of the parsed answers of the first k replies is the gold one;
           invalid replies do not vote, a tie goes to the answer given first, no valid
           reply at all counts as wrong

for k = 1, 2, 4, ... and n. Pass@k rising with k while pass@1 stays low says the right answer is
within reach of sampling, which is what the policy gradient can reinforce; maj@k above greedy
accuracy says the sampled answers carry more than the most likely one.

The replies' seeds are drawn from a generator seeded from (seed, "val", step) alone
(rl_questions.val_generator), one per reply: validation reproduces, and it draws nothing from the
generators of the training steps, so a run's trajectory does not depend on how often it validates.
Under torchrun each rank decodes its share of the questions and the replies are gathered
(sciassist.train.rl_ranks), so the figures are those of one process. The model is in eval mode.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import torch

from sciassist.data.answers import LETTERS
from sciassist.train.rl_questions import val_generator
from sciassist.train.rl_ranks import gathered, share
from sciassist.train.rl_step import evaluating, reward_samples, row_seeds, sample_rows

SAMPLES_FILE = "samples.jsonl"  # replies to the first SHOWN_QUESTIONS val questions at each validation
CURVES_FILE = "rl_curves.png"
SHOWN_QUESTIONS = 8


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one question with c correct among n replies: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_answer(answers):
    """The answer given most often among `answers` (None, an invalid reply, does not vote); a tie
    goes to the one given first. None when no answer is valid."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    most = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == most)


def maj_at_k(answers, gold, k: int) -> bool:
    """Whether the majority answer of the first k replies is the gold one (no valid reply: never)."""
    winner = majority_answer(answers[:k])
    return winner is not None and winner == gold


def sample_counts(n: int) -> list[int]:
    """The k of pass@k and maj@k for n replies: 1, 2, 4, ... up to n, and n itself."""
    ks = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]
    return ks if ks[-1] == n else [*ks, n]


def greedy_validation(run) -> tuple[dict, list]:
    """(metrics, samples) of greedy replies to run.val_questions (this rank's share decoded here,
    every rank's returned)."""
    s, questions = run.settings, run.val_questions
    mine = share(len(questions), run.runtime)
    prompts = [run.tokenizer.render_for_completion(questions[i].messages) for i in mine]
    sampled = sample_rows(run.engine, prompts, run.batches.generation, [0] * len(prompts), s.max_new_tokens, 0.0,
                          None)
    own, _ = reward_samples(run, [questions[i] for i in mine], prompts, sampled, 1, first_group=mine.start)
    samples = gathered(run.runtime, own)
    n = len(samples)
    metrics = {"val_reward_mean": sum(x.reward for x in samples) / n,
               "val_accuracy": sum(x.predicted == questions[x.group].answer for x in samples) / n,
               "val_invalid_rate": sum(x.predicted is None for x in samples) / n,
               "val_truncated_rate": sum(x.truncated for x in samples) / n}
    return metrics, samples


def sampled_validation(run, step: int) -> tuple[dict, list]:
    """(metrics, samples) of val_samples replies to each of the first val_questions, their seeds
    drawn from step `step`'s validation generator; empty when --val_questions is 0."""
    s = run.settings
    questions = run.val_questions[:s.val_questions]
    n = s.val_samples or s.samples_per_question
    if not questions:
        return {}, []
    seeds = row_seeds(val_generator(s.seed, step), len(questions) * n)
    mine = share(len(questions), run.runtime)
    prompts = [run.tokenizer.render_for_completion(questions[i].messages) for i in mine]
    rows = [p for p in prompts for _ in range(n)]
    sampled = sample_rows(run.engine, rows, run.batches.generation, seeds[mine.start * n:mine.stop * n],
                          s.max_new_tokens, s.temperature, s.top_k or None)
    own, _ = reward_samples(run, [questions[i] for i in mine], prompts, sampled, n, first_group=mine.start)
    samples = gathered(run.runtime, own)
    answers = [[x.predicted for x in samples[i * n:(i + 1) * n]] for i in range(len(questions))]
    metrics = {"val_sampled_questions": len(questions), "val_samples_per_question": n,
               "val_sample_reward_mean": sum(x.reward for x in samples) / len(samples),
               "val_sample_invalid_rate": sum(x.predicted is None for x in samples) / len(samples)}
    for k in sample_counts(n):
        metrics[f"val_pass@{k}"] = sum(pass_at_k(n, sum(a == q.answer for a in group), k)
                                       for group, q in zip(answers, questions, strict=True)) / len(questions)
    for k in sample_counts(n):
        metrics[f"val_maj@{k}"] = sum(maj_at_k(group, q.answer, k)
                                      for group, q in zip(answers, questions, strict=True)) / len(questions)
    return metrics, samples


@torch.no_grad()
def validate(run, step: int) -> tuple[dict, list]:
    """The validation at `step`: (its metrics, the samples-file lines of the first SHOWN_QUESTIONS
    questions, greedy reply first, then the sampled ones)."""
    with evaluating(run.model):
        greedy, greedy_samples = greedy_validation(run)
        sampled, sampled_samples = sampled_validation(run, step)
    lines = []
    for question_index, question in enumerate(run.val_questions[:SHOWN_QUESTIONS]):
        shown = [("greedy", 0, greedy_samples[question_index])]
        shown += [("sampled", i, x) for i, x in enumerate(x for x in sampled_samples if x.group == question_index)]
        for kind, index, x in shown:
            lines.append({"step": step, "question_index": question_index, "kind": kind, "sample": index,
                          "question": prompt_text(question.messages), "reply": x.text,
                          "answer": LETTERS[x.predicted] if x.predicted is not None else None,
                          "gold": question.gold_letter, "reward": x.reward, "truncated": x.truncated})
    return {**greedy, **sampled}, lines


def prompt_text(messages) -> str:
    """The question as the model read it: the last user message."""
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


def validation_line(step: int, num_steps: int, metrics: dict) -> str:
    """One printed line of a validation's figures."""
    line = (f"validation at step {step}/{num_steps}: greedy accuracy {metrics['val_accuracy']:.3f}, invalid "
            f"{metrics['val_invalid_rate']:.3f}")
    if "val_samples_per_question" in metrics:
        ks = sample_counts(metrics["val_samples_per_question"])
        line += (f" | {metrics['val_sampled_questions']} questions x {metrics['val_samples_per_question']} samples: "
                 + " ".join(f"pass@{k} {metrics[f'val_pass@{k}']:.3f}" for k in ks)
                 + f", maj@{ks[-1]} {metrics[f'val_maj@{ks[-1]}']:.3f}, invalid "
                 f"{metrics['val_sample_invalid_rate']:.3f}")
    return line


def append_samples(path, lines) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)


def keep_samples_until(path, step: int) -> None:
    """Cut the samples file to the validations of steps <= `step` (a resumed run's), or remove it
    when there are none."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a kill
    if kept:
        path.write_text("".join(kept), encoding="utf-8")
    else:
        path.unlink()

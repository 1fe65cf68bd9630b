"""The questions an RL run practises on, and how a step shows them.

A question is a prepared JSONL record: "messages" (the prompt; a final assistant message, the
reference answer, is dropped as the evaluator drops it) and "meta" with "choices" (2 to 26
option texts) and "answer" (the gold option's index), as `sciassist prepare` writes ScienceQA.

Which questions a step asks is a function of (seed, step): the order of the whole set is
reshuffled every pass and cut into steps (sciassist.data.batching.step_examples, the
fine-tune's rule). With shuffle_options each question's options are put in a new order every
step (the same order for all replies of its group), the gold index moved with its option: a
policy that prefers a letter or a position then earns nothing for it. The order comes from the
step's generator (step_generator), a function of (seed, step) alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from sciassist.data.answers import LETTERS, OPTIONS_LAYOUTS, options_block
from sciassist.data.batching import step_examples
from sciassist.data.conversations import read_conversations
from sciassist.data.records import record_problem
from sciassist.train.rl_settings import RLError


@dataclass(frozen=True)
class Question:
    """One question as a step shows it: the prompt messages, the options in the order shown and
    the gold index among them, and the record (its meta carrying the same choices and answer)."""

    messages: list
    choices: list
    answer: int
    record: dict

    @property
    def gold_letter(self) -> str:
        return LETTERS[self.answer]


def question_problem(record) -> str | None:
    """What keeps a record from being a question (meta with choices and an answer index), or None."""
    meta = record.get("meta")
    if not isinstance(meta, dict):
        return "no \"meta\" object (RL needs meta.choices and meta.answer, the gold option's index)"
    missing = [name for name in ("choices", "answer") if meta.get(name) is None]
    if missing:
        return f"meta has no {' and no '.join(missing)}"
    problem = record_problem({"question": "", "choices": meta["choices"], "answer": meta["answer"]})
    return f"meta: {problem}" if problem else None


def options_layout(messages, choices) -> str | None:
    """The layout in which the last user message ends with the options (letter_first "A. x"
    lines or letter_after "x (A)" lines), or None when it ends with neither."""
    content = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
    if not isinstance(content, str):
        return None
    return next((layout for layout in OPTIONS_LAYOUTS if content.endswith(options_block(choices, layout))), None)


def as_question(record) -> Question:
    messages = list(record["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return Question(messages=messages, choices=list(record["meta"]["choices"]), answer=record["meta"]["answer"],
                    record=record)


def load_questions(path, flag="--data_path", shuffle_options=True, limit=None) -> list[Question]:
    """The questions of a prepared JSONL file (the first `limit`), each checked: an RLError names the
    file and record of the first that cannot be asked (or, with shuffle_options, shuffled)."""
    try:
        records = read_conversations(path, require_assistant=False)
    except FileNotFoundError:
        raise RLError(f"{flag}: {path} not found (a JSONL file of questions; ScienceQA's is written by "
                      f"`sciassist prepare`)") from None
    except IsADirectoryError:
        raise RLError(f"{flag}: {path} is a directory; expected a JSONL file of questions") from None
    questions = []
    for i, record in enumerate(records[:limit] if limit else records):
        where = f"{flag} {path}: record {i + 1}"
        problem = question_problem(record)
        if problem:
            raise RLError(f"{where}: {problem}")
        question = as_question(record)
        if question.messages[-1:] and question.messages[-1].get("role") != "user":
            raise RLError(f"{where}: the prompt must end with a user message")
        if shuffle_options and options_layout(question.messages, question.choices) is None:
            raise RLError(f"{where}: its last user message does not end with its options as 'A. option' or "
                          f"'option (A)' lines, so they cannot be shuffled; --shuffle_options false asks the "
                          f"questions as written")
        questions.append(question)
    return questions


def shuffled(question: Question, generator: torch.Generator) -> Question:
    """The question with its options in an order drawn from `generator`: shown option i is the
    original option order[i], the gold index is where the gold option went, and the last user
    message ends with the options in that order (in the layout it had)."""
    n = len(question.choices)
    order = torch.randperm(n, generator=generator).tolist()
    choices = [question.choices[j] for j in order]
    answer = order.index(question.answer)
    layout = options_layout(question.messages, question.choices)
    old_block, new_block = options_block(question.choices, layout), options_block(choices, layout)
    last_user = max(i for i, m in enumerate(question.messages) if m.get("role") == "user")
    messages = [dict(m) for m in question.messages]
    content = messages[last_user]["content"]
    messages[last_user]["content"] = content[:len(content) - len(old_block)] + new_block
    meta = dict(question.record["meta"], choices=choices, answer=answer, answer_letter=LETTERS[answer])
    record = dict(question.record, messages=messages, meta=meta)
    return Question(messages=messages, choices=choices, answer=answer, record=record)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s option orders and sampling seeds: seeded from (seed, step)
    alone, so a step draws the same whether the run got there in one go or resumed."""
    digest = hashlib.blake2b(f"sciassist-rl:{seed}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def val_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the sampled validation after step `step`: seeded from (seed, "val", step)
    alone, apart from the steps' generators, so validating draws nothing a step would draw."""
    digest = hashlib.blake2b(f"sciassist-rl:{seed}:val:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's generator for the policy-gradient pass of step `step` on rank `rank`
    (LoRA's dropout draws from it): a function of (seed, step, rank) alone, so a resumed run drops
    what the uninterrupted one dropped on every rank."""
    digest = hashlib.blake2b(f"sciassist-rl:{seed}:dropout:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def step_questions(questions: list[Question], step: int, per_step: int, seed: int, generator=None) -> list[Question]:
    """The questions of step `step` as shown: chosen by (seed, step), their options shuffled with
    `generator` when one is given."""
    _, indices = step_examples(len(questions), step, per_step, seed)
    chosen = [questions[i] for i in indices]
    return [shuffled(q, generator) for q in chosen] if generator is not None else chosen

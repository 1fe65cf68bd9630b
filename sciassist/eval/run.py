"""
ScienceQA evaluation of nanochat checkpoints: a base model and a fine-tuned one, on exactly
the same questions.

Two ways to read a model's answer:

1. Letter scoring (the headline number). The prompt is rendered exactly as in training
   (the record's messages without the final assistant message, then <|assistant_start|>),
   followed by the fixed start of every training answer, "The correct answer is". The
   answer is the letter, among the ones the question has (2-5), that the model finds most
   likely next. With a small BPE vocabulary " B" can be two tokens (" ", "B"), so the
   letters are compared as token continuations: prefix + " " + letter is encoded for each
   letter, the tokens all letters share become part of the prompt, and each letter is
   scored by the summed log-probability of its remaining tokens. When every remainder is
   one token (the usual case), a single forward pass scores all letters of a question.
   Deterministic, and never an unparseable answer.

   --scoring choice reads the whole answer line instead: each option is scored by the
   summed log-probability of its answer line after the prefix, exactly as training writes
   it (" <L>. <option text>", or " <option text> (<L>)." in the text_first answer format),
   so a model that knows the answer's text but not yet its letter still gets credit.

   The answer format (sciassist.data.scienceqa.answer_line) decides the default: letter scoring
   for letter_first data (the default format), choice scoring for text_first data, where
   the letter only comes after the option text and letter scoring cannot apply. With
   --answer_format auto it is read from the evaluated file's reference answers.

2. Generated answers. Greedy decoding with the KV-cache engine, then a strict parse of
   "The correct answer is X" (text_first: "The correct answer is <option> (X)", the text
   being that option's; see parse_answer). An answer that does not parse counts as wrong
   and is reported as invalid; the agreement with the scored answer is reported too.

--prompt_style nanochat asks the way nanochat's own multiple-choice evaluation does (the
question, options as "- choice=A" lines, "Respond only with the letter of the correct
answer.", no system prompt, the letter as the reply's first token): the fair prompt for an
unmodified nanochat chat model, which never saw the SciAssist answer format.

The ScienceQA table follows the benchmark's definitions: NAT/SOC/LAN by subject, TXT = has
a non-empty hint, IMG = has an image, NO = neither, G1-6/G7-12 by grade, Avg = all. A
column is computed only on questions whose metadata is known (the local copy of ScienceQA
lacks subject/grade for most questions); the report says on how many.
"""

import dataclasses
import gc
import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.checkpoint import default_base_dir
from sciassist.data.scienceqa import ANSWER_FORMATS, OPTIONS_LAYOUTS, answer_line, detect_answer_format, options_block

LETTERS = "ABCDE"  # ScienceQA questions have 2 to 5 options
ANSWER_PREFIX = "The correct answer is"
NANOCHAT_QUESTION_PREFIX = "Multiple Choice question: "
NANOCHAT_INSTRUCTION = "Respond only with the letter of the correct answer."
PROMPT_STYLES = ("sciassist", "nanochat")
SCORING_MODES = ("letter", "choice")
COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")
SUBJECT_COLUMNS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
WILSON_Z = 1.959963984540054  # two-sided 95%
# The model returns logits for every position (B, T, V) in fp32; cap their number per batch
# so d20's 65,536-token vocabulary cannot exhaust memory (2**28 floats = 1 GiB, about three
# times that at peak with the softcap's temporaries).
LOGITS_PER_BATCH = 2**28


class EvaluationError(ValueError):
    """Bad evaluation input (data, settings, files); the message says what to fix."""


# -----------------------------------------------------------------------------
# questions


def check_question(record, where):
    """A ScienceQA JSONL record must carry meta with choices (2-5) and the answer index;
    returns the number of choices."""
    meta = record.get("meta") if isinstance(record, dict) else None
    if not isinstance(meta, dict):
        raise EvaluationError(f"{where}: no 'meta' object; evaluation needs ScienceQA records as written by "
                              f"sciassist.data.scienceqa (meta with choices and answer)")
    choices, answer = meta.get("choices"), meta.get("answer")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise EvaluationError(f"{where}: meta.choices must be a list of 2 to {len(LETTERS)} options, got {choices!r}")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise EvaluationError(f"{where}: meta.answer must be an index into the {len(choices)} choices, got {answer!r}")
    if not isinstance(record.get("messages"), list) or not record["messages"]:
        raise EvaluationError(f"{where}: no 'messages' list")
    return len(choices)


def question_pid(record, index):
    pid = record.get("meta", {}).get("pid")
    return str(pid) if pid is not None else str(index)


def load_questions(data_path=None, scienceqa=None, split="val", limit=None, seed=42, answer_format="letter_first"):
    """The questions to evaluate, as JSONL-shaped records ({"messages", "meta"}).

    From a prepared JSONL file (data_path; --limit takes its first N lines, as the file is
    already a seeded subset) or straight from a ScienceQA source (scienceqa = sample | hf |
    DIR; --limit draws the same seeded subset that sciassist.data.scienceqa's prepare would;
    formatted with the default FormatOptions and `answer_format`). Returns (records,
    description dict).
    """
    if data_path is not None and scienceqa is not None:
        raise EvaluationError("give either --data_path or --scienceqa, not both")
    if limit is not None and limit < 1:
        raise EvaluationError(f"--limit must be at least 1, got {limit}")
    if scienceqa is not None:
        from sciassist.data import scienceqa as sqa
        raw = sqa.load_scienceqa(scienceqa, split)
        available = len(raw)
        if limit is not None:
            raw = sqa.select_subset(raw, limit, seed)
        skipped = Counter(sqa.skip_reason(r) for r in raw)
        skipped.pop(None, None)
        options = sqa.FormatOptions(answer_format=answer_format)
        records = [sqa.format_record(r, options) for r in raw if sqa.skip_reason(r) is None]
        info = {"source": f"scienceqa:{scienceqa}", "split": split, "available": available,
                "selected": len(raw), "skipped": dict(skipped), "count": len(records),
                "selection": f"seeded subset (seed {seed})" if limit is not None else "whole split"}
    else:
        if data_path is None:
            data_path = f"data/scienceqa_{split}.jsonl"
        path = Path(data_path)
        if not path.is_file():
            raise EvaluationError(f"{path}: no such file; prepare it with `python -m sciassist.data.scienceqa` "
                                  f"or evaluate straight from a source with --scienceqa sample|hf|DIR")
        from sciassist.data.conversations import read_conversations
        records = list(read_conversations(path))
        available = len(records)
        if limit is not None:
            records = records[:limit]
        info = {"source": str(path), "split": split, "available": available, "selected": len(records),
                "skipped": {}, "count": len(records),
                "selection": f"first {limit} records" if limit is not None else "whole file"}
    if not records:
        raise EvaluationError(f"no questions to evaluate from {info['source']} ({info['split']})")
    for i, record in enumerate(records):
        check_question(record, f"{info['source']}: record {i + 1}")
    return records, info


def resolve_scoring(scoring, answer_format, prompt_style="sciassist"):
    """The scoring rule to use ("auto": letter for letter_first, choice for text_first);
    an impossible combination is an EvaluationError."""
    if scoring not in (*SCORING_MODES, "auto"):
        raise EvaluationError(f"--scoring must be one of auto, {', '.join(SCORING_MODES)}, got {scoring!r}")
    if answer_format not in ANSWER_FORMATS:
        raise EvaluationError(f"--answer_format must be one of auto, {', '.join(ANSWER_FORMATS)}, "
                              f"got {answer_format!r}")
    if scoring == "auto":
        scoring = "choice" if answer_format == "text_first" and prompt_style == "sciassist" else "letter"
    if scoring == "letter" and answer_format == "text_first" and prompt_style == "sciassist":
        raise EvaluationError("letter scoring reads the letter right after \"The correct answer is\"; in the "
                              "text_first answer format the option text comes first: use --scoring choice")
    return scoring


def user_text(record):
    """The last user message's content (the question with its options)."""
    for message in reversed(record["messages"]):
        if message.get("role") == "user":
            return message["content"]
    raise EvaluationError(f"question {question_pid(record, '?')}: no user message")


def question_stem(record):
    """The user message without its trailing option lines (either layout): the question, with the
    context lines the data format put before it."""
    text = user_text(record)
    choices = record["meta"]["choices"]
    for layout in OPTIONS_LAYOUTS:
        block = options_block(choices, layout)
        if text.endswith(block):
            return text[: -len(block)].rstrip()
    return text.rstrip()  # an unknown layout: keep everything rather than guess a cut


def nanochat_prompt(record):
    """nanochat's multiple-choice prompt for one question: a single user message; the
    letter follows "=" so that it tokenizes the same way in the options as in the reply."""
    choices = record["meta"]["choices"]
    lines = [f"{NANOCHAT_QUESTION_PREFIX}{question_stem(record)}"]
    lines += [f"- {choice}={LETTERS[i]}" for i, choice in enumerate(choices)]
    text = "\n".join(lines) + "\n\n" + NANOCHAT_INSTRUCTION
    return [{"role": "user", "content": text}]


def prompts_for(records, prompt_style):
    """(prompts as message lists, answer prefix) for a prompt style."""
    if prompt_style == "sciassist":
        return [r["messages"] for r in records], ANSWER_PREFIX
    if prompt_style == "nanochat":
        return [nanochat_prompt(r) for r in records], ""
    raise EvaluationError(f"prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {prompt_style!r}")


# -----------------------------------------------------------------------------
# letter scoring


def letter_continuations(tokenizer, answer_prefix, num_choices):
    """Tokens shared by every "<prefix> <letter>" of a question, and each letter's
    remaining tokens. The shared tokens go into the prompt; the remainders are scored."""
    texts = [f"{answer_prefix} {letter}" if answer_prefix else letter for letter in LETTERS[:num_choices]]
    return _shared_and_rest(tokenizer, texts, "the tokenizer encodes one answer letter as a prefix of another")


def _shared_and_rest(tokenizer, texts, problem):
    """Encode each text; return the tokens all of them start with and what follows in each."""
    encoded = [tokenizer.encode(text) for text in texts]
    shared = 0
    while all(len(e) > shared for e in encoded) and len({e[shared] for e in encoded}) == 1:
        shared += 1
    continuations = [e[shared:] for e in encoded]
    if any(not c for c in continuations):
        raise EvaluationError(f"{problem} ({texts})")
    return encoded[0][:shared], continuations


def _scoring_rows(context, continuations):
    """Sequences to run for one question: (ids, [(letter, position, token), ...]). Letters
    whose continuation is a single token share one sequence (the context alone); a letter of
    several tokens gets its own sequence, context + its tokens but the last."""
    rows = []
    singles = [(j, len(context) - 1, c[0]) for j, c in enumerate(continuations) if len(c) == 1]
    if singles:
        rows.append((context, singles))
    for j, c in enumerate(continuations):
        if len(c) > 1:
            rows.append((context + c[:-1], [(j, len(context) - 1 + t, tok) for t, tok in enumerate(c)]))
    return rows


def _autocast(device):
    # nanochat runs bf16 autocast on CUDA and plain fp32 elsewhere
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def _score_rows(model, rows, batch_size, pad_id=0):
    """Log-probabilities of each row's target tokens. Rows are sorted by length so a batch
    holds similar lengths; right padding cannot change earlier positions (causal attention),
    so no mask is needed. One forward pass per batch."""
    device = model.get_device()
    vocab_size = model.config.vocab_size
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    start = 0
    while start < len(order):
        longest = len(rows[order[start]][0])
        n = max(1, min(batch_size, LOGITS_PER_BATCH // (longest * vocab_size)))
        chunk = order[start:start + n]
        start += n
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        for b, r in enumerate(chunk):
            ids[b, :len(rows[r][0])] = torch.tensor(rows[r][0], dtype=torch.long)
        with _autocast(device):
            logits = model(ids.to(device))
        batch_index, positions, tokens = [], [], []
        for b, r in enumerate(chunk):
            for _, position, token in rows[r][1]:
                batch_index.append(b)
                positions.append(position)
                tokens.append(token)
        picked = logits[torch.tensor(batch_index, device=device), torch.tensor(positions, device=device)]
        log_probs = picked.float().log_softmax(dim=-1)
        values = log_probs[torch.arange(len(tokens), device=device), torch.tensor(tokens, device=device)].tolist()
        k = 0
        for r in chunk:
            out[r] = values[k:k + len(rows[r][1])]
            k += len(rows[r][1])
    return out


def letter_scores(model, tokenizer, prompts, num_choices, answer_prefix=ANSWER_PREFIX, batch_size=32):
    """Per question, the summed log-probability of each of its letters (see module doc).
    prompts: message lists (or {"messages": ...}); a final assistant message is dropped."""
    if len(prompts) != len(num_choices):
        raise ValueError(f"{len(prompts)} prompts but {len(num_choices)} num_choices")
    by_count = {k: letter_continuations(tokenizer, answer_prefix, k) for k in sorted(set(num_choices))}
    rows, owners = [], []  # owners[i] = question index of rows[i]
    for q, (prompt, k) in enumerate(zip(prompts, num_choices, strict=True)):
        shared, continuations = by_count[k]
        context = tokenizer.render_for_completion(prompt) + shared
        for row in _scoring_rows(context, continuations):
            rows.append(row)
            owners.append(q)
    values = _score_rows(model, rows, batch_size, pad_id=tokenizer.get_bos_token_id())
    scores = [[0.0] * k for k in num_choices]
    for (_, targets), q, row_values in zip(rows, owners, values, strict=True):
        for (letter, _, _), value in zip(targets, row_values, strict=True):
            scores[q][letter] += value
    return scores


def choice_lines(answer_prefix, choices, answer_format="letter_first"):
    """Each option's answer line as training writes it (sciassist.data.scienceqa.answer_line),
    with `answer_prefix` in place of "The correct answer is"."""
    lines = [answer_line(choices, i, answer_format) for i in range(len(choices))]
    return [answer_prefix + line[len(ANSWER_PREFIX):] for line in lines]


def choice_continuations(tokenizer, answer_prefix, choices, answer_format="letter_first"):
    """Tokens shared by every answer line of a question (choice_lines), and each option's
    remaining tokens. Each line is encoded whole, as the training answer is."""
    return _shared_and_rest(tokenizer, choice_lines(answer_prefix, choices, answer_format),
                            "one answer line is a prefix of another")


def choice_scores(model, tokenizer, prompts, choices, answer_prefix=ANSWER_PREFIX, batch_size=32,
                  answer_format="letter_first"):
    """Per question, the summed log-probability of each option's whole answer line
    (" <L>. <choice>", or " <choice> (<L>)." for text_first) after the prompt and the
    prefix (see the module doc). choices: the option texts of each question."""
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    if not answer_prefix:
        raise EvaluationError("choice scoring needs the SciAssist answer prefix (prompt style sciassist)")
    rows, owners = [], []
    for q, (prompt, options) in enumerate(zip(prompts, choices, strict=True)):
        shared, continuations = choice_continuations(tokenizer, answer_prefix, options, answer_format)
        context = tokenizer.render_for_completion(prompt) + shared
        for row in _scoring_rows(context, continuations):
            rows.append(row)
            owners.append(q)
    values = _score_rows(model, rows, batch_size, pad_id=tokenizer.get_bos_token_id())
    scores = [[0.0] * len(options) for options in choices]
    for (_, targets), q, row_values in zip(rows, owners, values, strict=True):
        for (option, _, _), value in zip(targets, row_values, strict=True):
            scores[q][option] += value
    return scores


def softmax(values):
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def letter_probabilities(model, tokenizer, prompts, num_choices, answer_prefix=ANSWER_PREFIX, batch_size=32):
    """Per question, probabilities over its letters: softmax of the letter scores (for
    single-token letters that is the softmax of the next-token logits restricted to them)."""
    scores = letter_scores(model, tokenizer, prompts, num_choices, answer_prefix, batch_size)
    return [softmax(s) for s in scores]


def argmax(values):
    """Index of the largest value; the first one on ties (deterministic)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


# -----------------------------------------------------------------------------
# generated answers


def generate_answers(model, tokenizer, prompts, max_tokens=32, batch_size=32):
    """Greedy replies (text) to each prompt, decoded in batches of similar prompt lengths
    with Engine.generate_multi (equal to decoding each prompt alone)."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    prompt_ids = [tokenizer.render_for_completion(p) for p in prompts]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    texts = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outputs = engine.generate_multi([prompt_ids[i] for i in chunk], max_tokens=max_tokens, temperature=0.0)
        for i, tokens in zip(chunk, outputs, strict=True):
            texts[i] = tokenizer.decode(tokens)
    return texts


# The phrase may start a sentence or not ("The"/"the"); the letter must be upper case and
# stand alone: followed by . , : ; ) or the end of a line. So "The correct answer is a
# mammal" (the article) and "... is A dog" are not answers, and nothing after the phrase's
# first occurrence is searched ("vitamin C." in an explanation is never read as C).
_PHRASE_RE = re.compile(r"the correct answer is", re.IGNORECASE)
_LETTER_AFTER_PHRASE_RE = re.compile(r"[ \t]*:?[ \t]*(?:\(([A-Z])\)|\*\*([A-Z])\*\*|([A-Z])(?=[.,:;)]|[ \t]*(?:\n|$)))")
_LETTER_ALONE_RE = re.compile(r"\s*(?:\(([A-Z])\)|\*\*([A-Z])\*\*|([A-Z])(?=[.,:;)]|[ \t]*(?:\n|$)))")


def _text_first_reply(text, choices, answer_prefix=ANSWER_PREFIX):
    """What a text_first reply names: after the first answer phrase, an option's text (case
    aside, any run of whitespace, newlines included where the option has one) followed by
    "(X)" that ends a line (a final "." allowed). Returns the index of the option it names
    (when options differ only in case, the one whose letter it gives, else the first) and
    the letter; (None, None) when no option's text stands there."""
    found = re.compile(re.escape(answer_prefix), re.IGNORECASE).search(text or "")
    if found is None:
        return None, None
    named = []
    for i, choice in enumerate(choices):
        words = r"\s+".join(re.escape(word) for word in choice.split())
        match = re.compile(r"[ \t]*:?[ \t]*(?i:" + words + r")[ \t]*\(([A-Z])\)\.?[ \t]*(?:\n|$)").match(
            text, found.end())
        if match:
            named.append((i, match.group(1)))
    if not named:
        return None, None
    return next(((i, letter) for i, letter in named if LETTERS[i] == letter), named[0])


def text_first_breakdown(texts, records, answer_prefix=ANSWER_PREFIX):
    """Why text_first replies are invalid: how many name an option's text (spacing and case
    aside) before "(X)", and of those how many give that option's own letter. A model that
    knows the answer but cannot bind letters to options names texts with random letters."""
    names_option = letter_matches = 0
    for text, record in zip(texts, records, strict=True):
        named, letter = _text_first_reply(text, record["meta"]["choices"], answer_prefix)
        if named is not None:
            names_option += 1
            letter_matches += LETTERS[named] == letter
    return {"names_an_option": names_option, "letter_matches_text": letter_matches}


def parse_answer(text, num_choices, answer_prefix=ANSWER_PREFIX, choices=None, answer_format="letter_first"):
    """The option index a reply states, or None when it does not state one strictly.

    With the SciAssist prefix: the FIRST "The correct answer is" (any case of the phrase),
    then a capital letter among the question's letters, alone: "B", "B.", "(B)", "**B**",
    "B: dog", "B," or "B" at the end of a line. Rejected, on purpose: "The correct answer is
    a mammal" / "... is a" (lower case: the article "a" is indistinguishable from option a;
    training always writes capitals), "The correct answer is A dog" (a capital article),
    "the answer is B" (not the trained phrase), a letter beyond the question's options, and
    any letter found later in the text (e.g. "vitamin C." in an explanation).
    With answer_prefix "" (nanochat style): the reply must begin with such a lone letter.

    answer_format "text_first" (needs `choices`): the first "The correct answer is" must be
    followed by an option's text and then "(X)" ending the line (a final "." allowed), and the
    text must be option X's (spacing and case aside; an option written over several lines may
    be). A reply that names
    one option's text with another's letter, or a text that is no option, is invalid.
    """
    if text is None:
        return None
    if answer_format == "text_first" and answer_prefix:
        if choices is None:
            raise ValueError("parse_answer: the text_first format needs the question's choices")
        named, letter = _text_first_reply(text, choices[:num_choices], answer_prefix)
        return named if named is not None and LETTERS[named] == letter else None
    if answer_prefix:
        if answer_prefix != ANSWER_PREFIX:
            phrase = re.compile(re.escape(answer_prefix), re.IGNORECASE)
        else:
            phrase = _PHRASE_RE
        found = phrase.search(text)
        if found is None:
            return None
        match = _LETTER_AFTER_PHRASE_RE.match(text, found.end())
    else:
        match = _LETTER_ALONE_RE.match(text)
    if match is None:
        return None
    letter = next(g for g in match.groups() if g)
    index = LETTERS.find(letter)
    return index if 0 <= index < num_choices else None


# -----------------------------------------------------------------------------
# statistics and the ScienceQA table


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


def chance_accuracy(num_choices):
    """Expected accuracy (fraction) of guessing uniformly: the mean of 1/k."""
    if not num_choices:
        return None
    return sum(1 / k for k in num_choices) / len(num_choices)


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


def majority_predictions(records, letter_counts):
    """Always answer the most common gold letter (letter_counts: letter -> count), among the
    letters a question has: a 2-option question cannot be answered "C". Ties: earlier letter."""
    predictions = []
    for record in records:
        k = len(record["meta"]["choices"])
        predictions.append(max(range(k), key=lambda i: (letter_counts.get(LETTERS[i], 0), -i)))
    return predictions


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
        num_choices = [len(r["meta"]["choices"]) for r in records]
        cells = {}
        for c, members in column_members.items():
            expected = chance_accuracy([num_choices[i] for i in members])
            cells[c] = {"correct": None, "count": len(members),
                        "accuracy": 100 * expected if expected is not None else None, "ci95": None}
        rows.append({"name": "chance", "kind": "expected", "cells": cells})
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


def format_table_markdown(table):
    """Markdown: accuracy with its 95% Wilson interval per cell, and the question counts."""
    columns = table["columns"]
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines.append("| questions | " + " | ".join(str(table["counts"][c]) if table["counts"][c] else "n/a"
                                            for c in columns) + " |")
    for row in table["rows"]:
        cells = []
        for c in columns:
            cell = row["cells"][c]
            if cell["accuracy"] is None:
                cells.append("n/a")
            elif cell["ci95"] is None:
                cells.append(f"{cell['accuracy']:.2f}")
            else:
                lo, hi = cell["ci95"]
                cells.append(f"{cell['accuracy']:.2f} [{lo:.1f}, {hi:.1f}]")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_topics_markdown(topics, names):
    lines = ["| topic | questions | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for t in topics:
        lines.append(f"| {t['topic']} | {t['count']} | " + " | ".join(f"{t['accuracy'][n]:.1f}" for n in names) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the benchmark's results format


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


def write_results_file(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_results_file(path):
    """Read and check a results file: integer predictions, count = len(results) and acc =
    100 * correct / count."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    for key in ("acc", "correct", "count", "results"):
        if key not in data:
            raise EvaluationError(f"{path}: missing {key!r} (expected the ScienceQA results format)")
    if not isinstance(data["results"], dict) or not all(isinstance(v, int) for v in data["results"].values()):
        raise EvaluationError(f"{path}: 'results' must map question ids to option indices")
    if data["count"] != len(data["results"]):
        raise EvaluationError(f"{path}: count {data['count']} but {len(data['results'])} results")
    expected = 100 * data["correct"] / data["count"] if data["count"] else 0.0
    if abs(data["acc"] - expected) > 1e-9:
        raise EvaluationError(f"{path}: acc {data['acc']} is not 100 * correct / count = {expected}")
    return data


# -----------------------------------------------------------------------------
# models



def resolve_model_spec(spec, base_dir=None):
    """A checkpoint folder (or its model_<step>.pt), or "source[:tag[:step]]" under a nanochat
    base dir (e.g. "sft:d20", "base:d4:1000") -> (checkpoint_dir, step or None = latest)."""
    from nanochat.checkpoint import SOURCE_ALIASES, SOURCE_DIRS, CheckpointError, find_checkpoint
    path = Path(spec).expanduser()
    if path.is_file():
        match = re.fullmatch(r"model_(\d+)\.pt", path.name)
        if match is None:
            raise CheckpointError(f"{path}: expected a checkpoint folder or a model_<step>.pt file")
        return path.parent, int(match.group(1))
    if path.is_dir():
        return path, None
    parts = str(spec).split(":")
    source = SOURCE_ALIASES.get(parts[0], parts[0])
    if source not in SOURCE_DIRS or len(parts) > 3:
        raise CheckpointError(f"{spec!r} is neither an existing checkpoint folder nor source[:tag[:step]] "
                              f"with source one of {', '.join(SOURCE_DIRS)} (e.g. sft:d20, base:d4:1000)")
    tag = parts[1] if len(parts) > 1 and parts[1] else None
    step = None
    if len(parts) > 2 and parts[2]:
        if not parts[2].isdigit():
            raise CheckpointError(f"{spec!r}: the step must be a number, got {parts[2]!r}")
        step = int(parts[2])
    return find_checkpoint(base_dir if base_dir is not None else default_base_dir(), source, tag, step)


def load_model_spec(spec, base_dir=None, device=None):
    """(model, tokenizer, info) for a --base / --finetuned value."""
    from nanochat.checkpoint import find_last_step, load_model
    checkpoint_dir, step = resolve_model_spec(spec, base_dir)
    if step is None:
        step = find_last_step(checkpoint_dir)
    model, tokenizer, meta = load_model(checkpoint_dir, step, device=device)
    return model, tokenizer, model_info(model, meta, spec=spec, checkpoint_dir=checkpoint_dir, step=step)


def model_info(model, meta=None, spec=None, checkpoint_dir=None, step=None):
    meta = meta or {}
    keep = ("val_loss", "best_val_loss", "val_bpb", "source_model", "mmlu_acc", "arc_easy_acc")
    return {
        "spec": spec,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir is not None else None,
        "step": step if step is not None else meta.get("step"),
        "model_config": dataclasses.asdict(model.config),
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(model.get_device()),
        "meta": {k: meta[k] for k in keep if k in meta},
    }


# -----------------------------------------------------------------------------
# running one model


def run_model(model, tokenizer, records, prompt_style="sciassist", batch_size=32, generate=True,
              max_new_tokens=32, sample_indices=(), sample_max_tokens=128, scoring="letter",
              answer_format="letter_first"):
    """Letter scoring (+ generation) of one model on the questions. Returns a dict of
    per-question lists (probabilities, prediction, generated, generated_prediction) and
    timings. scoring "choice": probabilities and prediction come from choice scoring.
    answer_format: how the answer line is written (choice scoring and the parse)."""
    prompts, prefix = prompts_for(records, prompt_style)
    num_choices = [len(r["meta"]["choices"]) for r in records]
    device = model.get_device()

    _sync(device)
    t0 = time.perf_counter()
    if scoring == "choice":
        scores = choice_scores(model, tokenizer, prompts, [r["meta"]["choices"] for r in records], prefix, batch_size,
                               answer_format)
        probabilities = [softmax(s) for s in scores]
    elif scoring == "letter":
        probabilities = letter_probabilities(model, tokenizer, prompts, num_choices, prefix, batch_size)
    else:
        raise EvaluationError(f"scoring must be one of {', '.join(SCORING_MODES)}, got {scoring!r}")
    _sync(device)
    letter_s = time.perf_counter() - t0
    run = {
        "probabilities": probabilities,
        "prediction": [argmax(p) for p in probabilities],
        "generated": None,
        "generated_prediction": None,
        "samples": {},
        "timing": {"letter_s": letter_s, "letter_questions_per_s": len(records) / letter_s if letter_s > 0 else None},
        "prompt_tokens_over_sequence_len": sum(len(tokenizer.render_for_completion(p)) > model.config.sequence_len
                                               for p in prompts),
    }
    if generate:
        t0 = time.perf_counter()
        texts = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size)
        _sync(device)
        generate_s = time.perf_counter() - t0
        run["generated"] = texts
        run["generated_prediction"] = [parse_answer(t, k, prefix, r["meta"]["choices"], answer_format)
                                       for t, k, r in zip(texts, num_choices, records, strict=True)]
        run["timing"].update(generate_s=generate_s,
                             generate_questions_per_s=len(records) / generate_s if generate_s > 0 else None)
    if sample_indices:
        # longer replies for the few questions shown in samples.md (the explanation too)
        t0 = time.perf_counter()
        texts = generate_answers(model, tokenizer, [prompts[i] for i in sample_indices], sample_max_tokens, batch_size)
        run["samples"] = dict(zip(sample_indices, texts, strict=True))
        run["timing"]["samples_s"] = time.perf_counter() - t0
    return run


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_summary(records, run):
    """Valid-answer rate, accuracy of generated answers and agreement with the scored answer."""
    if run["generated_prediction"] is None:
        return None
    golds = [r["meta"]["answer"] for r in records]
    generated, letter = run["generated_prediction"], run["prediction"]
    n = len(records)
    valid = [p is not None for p in generated]
    agree = [g is not None and g == s for g, s in zip(generated, letter, strict=True)]
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


def answer_prefix_check(tokenizer, records, answer_prefix=ANSWER_PREFIX, scoring="letter",
                        answer_format="letter_first"):
    """How many reference answers start with "<prefix> <gold letter>" AND tokenize so that
    the prompt + scored tokens are a prefix of the training tokens (i.e. letter scoring
    reads the exact position training taught). Returns (matching, checked). For choice
    scoring: how many start with the gold option's answer line, tokenized the same way."""
    matching = checked = 0
    cache = {}
    if scoring == "choice":
        for record in records:
            content = record["messages"][-1].get("content")
            if record["messages"][-1].get("role") != "assistant" or not isinstance(content, str):
                continue
            checked += 1
            meta = record["meta"]
            line = choice_lines(answer_prefix, meta["choices"], answer_format)[meta["answer"]]
            expected = tokenizer.encode(line)
            matching += content.startswith(line) and tokenizer.encode(content)[:len(expected)] == expected
        return matching, checked
    for record in records:
        messages = record["messages"]
        if messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str):
            continue
        checked += 1
        meta = record["meta"]
        k = len(meta["choices"])
        if k not in cache:
            cache[k] = letter_continuations(tokenizer, answer_prefix, k)
        shared, continuations = cache[k]
        expected = shared + continuations[meta["answer"]]
        content = messages[-1]["content"]
        if content.startswith(f"{answer_prefix} {LETTERS[meta['answer']]}") and \
                tokenizer.encode(content)[:len(expected)] == expected:
            matching += 1
    return matching, checked


# -----------------------------------------------------------------------------
# the whole evaluation


@dataclass
class EvalSettings:
    """Every option of an evaluation, with its default (the CLI, the notebook, the training
    run's --eval_after and the tests all start from this)."""
    base: str | None = None          # checkpoint folder or source[:tag[:step]]
    finetuned: str | None = None     # checkpoint folder (a fine-tune output dir) or source[:tag[:step]]
    base_dir: str | None = None      # nanochat base dir for source:tag specs ($NANOCHAT_BASE_DIR, ~/.cache/nanochat)
    data_path: str | None = None     # prepared JSONL (default data/scienceqa_<split>.jsonl)
    scienceqa: str | None = None     # or straight from a source: sample | hf | DIR
    split: str = "val"
    limit: int | None = None
    seed: int = 42
    prompt_style: str = "sciassist"  # sciassist | nanochat
    scoring: str = "auto"            # auto | letter | choice (the whole answer line, sciassist style only)
    answer_format: str = "auto"      # auto (read from the data's answers) | letter_first | text_first
    batch_size: int = 32
    generate: bool = True
    max_new_tokens: int = 32         # "The correct answer is X. <choice>" (text_first: more for long options)
    num_samples: int = 5             # questions shown side by side in samples.md
    sample_max_tokens: int = 128     # reply length for those (room for the explanation)
    train_path: str | None = None    # gold letters for the majority row (default: found beside the data)
    metrics_path: str | None = None  # a run's metrics.jsonl to re-draw (default: <finetuned>/metrics.jsonl)
    log_file: str | None = None      # an older run's text log to draw too
    out_dir: str = "eval_results"
    device: str = "auto"             # auto | cpu | cuda | cuda:N | mps


def resolve_device(device):
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_letter_counts(settings, records):
    """Gold-letter counts for the majority row: of the TRAIN split when it can be found
    (settings.train_path, data/scienceqa_train.jsonl beside --data_path, or the train split
    of the --scienceqa source), else of the evaluated questions. Returns (counts, source)."""
    try:
        if settings.train_path is not None:
            from sciassist.data.conversations import read_conversations
            train = read_conversations(settings.train_path)
            return Counter(r["meta"]["answer_letter"] for r in train if "meta" in r), str(settings.train_path)
        if settings.scienceqa is not None:
            from sciassist.data import scienceqa as sqa
            raw = sqa.load_scienceqa(settings.scienceqa, "train")
            counts = Counter(LETTERS[r["answer"]] for r in raw if sqa.skip_reason(r) is None)
            if counts:
                return counts, f"train split of scienceqa:{settings.scienceqa}"
        else:
            data_path = Path(settings.data_path or f"data/scienceqa_{settings.split}.jsonl")
            candidate = data_path.with_name("scienceqa_train.jsonl")
            if candidate.is_file() and candidate.resolve() != data_path.resolve():
                from sciassist.data.conversations import read_conversations
                train = read_conversations(candidate)
                counts = Counter(r["meta"]["answer_letter"] for r in train if "meta" in r)
                if counts:
                    return counts, str(candidate)
    except Exception as e:  # the majority row is a baseline: fall back, and say so
        fallback = Counter(r["meta"]["answer_letter"] for r in records)
        return fallback, f"the evaluated questions (train split unavailable: {e})"
    return Counter(LETTERS[r["meta"]["answer"]] for r in records), "the evaluated questions (no train split found)"


def evaluate(settings, models=None):
    """Run the evaluation and write every file into settings.out_dir; returns the summary
    (also written as results.json). models: optional {"base"|"finetuned": (model, tokenizer,
    info)} already in memory (the end of a training run), used instead of loading."""
    started = time.perf_counter()
    models = dict(models or {})
    out_dir = Path(settings.out_dir)
    if settings.prompt_style not in PROMPT_STYLES:
        raise EvaluationError(f"--prompt_style must be one of {', '.join(PROMPT_STYLES)}, "
                              f"got {settings.prompt_style!r}")
    if settings.scoring not in (*SCORING_MODES, "auto"):
        raise EvaluationError(f"--scoring must be one of auto, {', '.join(SCORING_MODES)}, got {settings.scoring!r}")
    if settings.answer_format not in (*ANSWER_FORMATS, "auto"):
        raise EvaluationError(f"--answer_format must be one of auto, {', '.join(ANSWER_FORMATS)}, "
                              f"got {settings.answer_format!r}")
    if settings.scoring == "choice" and settings.prompt_style != "sciassist":
        raise EvaluationError("--scoring choice scores the SciAssist answer line; use it with --prompt_style sciassist")
    specs = {name: getattr(settings, name) for name in ("base", "finetuned")
             if getattr(settings, name) is not None and name not in models}
    if not specs and not models and settings.metrics_path is None and settings.log_file is None:
        raise EvaluationError("nothing to do: give --base and/or --finetuned (or --log_file / --metrics_path to "
                              "only draw a loss curve)")
    # Fail on a bad log before spending minutes on models.
    if settings.log_file is not None:
        from sciassist.plots import parse_training_log
        try:
            parse_training_log(settings.log_file)
        except (OSError, ValueError) as e:
            raise EvaluationError(f"--log_file: {e}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    loss_summary = _draw_loss_curve(settings, out_dir, files)
    if not specs and not models:
        summary = {"settings": dataclasses.asdict(settings), "loss_curve": loss_summary, "files": files}
        _write_json(out_dir / "results.json", summary)
        print(f"loss curve written to {out_dir / 'loss_curve.png'} (no models given, nothing else to evaluate)")
        return summary

    source_format = "letter_first" if settings.answer_format == "auto" else settings.answer_format
    records, data_info = load_questions(settings.data_path, settings.scienceqa, settings.split,
                                        settings.limit, settings.seed, source_format)
    answer_format = detect_answer_format(records) if settings.answer_format == "auto" else settings.answer_format
    settings = dataclasses.replace(settings, answer_format=answer_format,
                                   scoring=resolve_scoring(settings.scoring, answer_format, settings.prompt_style))
    device = resolve_device(settings.device)
    # samples.md shows longer replies (room for the explanation) unless the main
    # generation is already as long; then its texts are reused
    longer = settings.sample_max_tokens > (settings.max_new_tokens if settings.generate else 0)
    sample_indices = list(range(min(settings.num_samples, len(records)))) if longer else []
    shown_indices = list(range(min(settings.num_samples, len(records))))
    runs, infos = {}, {}
    for name in ("base", "finetuned"):
        if name not in models and name not in specs:
            continue
        t0 = time.perf_counter()
        if name in models:
            model, tokenizer, info = models.pop(name)
        else:
            model, tokenizer, info = load_model_spec(specs[name], settings.base_dir, device)
        load_s = time.perf_counter() - t0
        print(f"[{name}] {info.get('checkpoint_dir') or info.get('spec')} step {info.get('step')}: "
              f"{settings.scoring} scoring {len(records)} questions", file=sys.stderr, flush=True)
        run = run_model(model, tokenizer, records, settings.prompt_style, settings.batch_size, settings.generate,
                        settings.max_new_tokens, sample_indices, settings.sample_max_tokens, settings.scoring,
                        settings.answer_format)
        run["timing"]["load_s"] = load_s
        matching, checked = None, None
        if settings.prompt_style == "sciassist":
            matching, checked = answer_prefix_check(tokenizer, records, ANSWER_PREFIX, settings.scoring,
                                                    settings.answer_format)
        info = dict(info, answer_prefix_matches=matching, answer_prefix_checked=checked)
        runs[name], infos[name] = run, info
        del model, tokenizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    letter_counts, majority_source = train_letter_counts(settings, records)
    predictions = {name: run["prediction"] for name, run in runs.items()}
    for name, run in runs.items():
        if run["generated_prediction"] is not None:
            predictions[f"{name} (generated)"] = run["generated_prediction"]
    predictions["majority"] = majority_predictions(records, letter_counts)
    table = build_table(records, predictions)
    table["majority_source"] = majority_source
    table["majority_letter"] = letter_counts.most_common(1)[0][0] if letter_counts else None
    topics = topic_breakdown(records, predictions)
    generation = {name: generation_summary(records, run) for name, run in runs.items()}
    if settings.answer_format == "text_first" and settings.prompt_style == "sciassist":
        for name, run in runs.items():
            if generation[name] is not None:
                generation[name].update(text_first_breakdown(run["generated"], records))

    _write_outputs(out_dir, files, settings, records, runs, table)
    summary = {
        "settings": dataclasses.asdict(settings),
        "data": data_info,
        "models": infos,
        "table": table,
        "topics": topics,
        "generation": generation,
        "timing": {name: run["timing"] for name, run in runs.items()},
        "prompt_tokens_over_sequence_len": {name: run["prompt_tokens_over_sequence_len"] for name, run in runs.items()},
        "loss_curve": loss_summary,
        "device": str(device),
        "files": files,
    }
    summary["total_s"] = time.perf_counter() - started
    (out_dir / "table.md").write_text(format_table_markdown(table) + "\n", encoding="utf-8")
    files["table_md"] = "table.md"
    files["report"] = "report.md"
    files["results"] = "results.json"
    (out_dir / "samples.md").write_text(samples_markdown(records, runs, shown_indices, settings), encoding="utf-8")
    files["samples"] = "samples.md"
    (out_dir / "report.md").write_text(report_markdown(summary), encoding="utf-8")
    _write_json(out_dir / "results.json", summary)
    print(format_table_text(table))
    print(f"(majority row: most common gold letter of {majority_source}; files in {out_dir})")
    return summary


def _write_json(path, data):
    Path(path).write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def _draw_loss_curve(settings, out_dir, files):
    from sciassist.plots import plot_loss_curve
    metrics, explicit = settings.metrics_path, settings.metrics_path is not None or settings.log_file is not None
    if metrics is None and settings.finetuned is not None:
        candidate = Path(settings.finetuned) / "metrics.jsonl"
        metrics = candidate if candidate.is_file() else None
    if metrics is None and settings.log_file is None:
        return None
    try:
        summary = plot_loss_curve(metrics, out_dir / "loss_curve.png", log_file=settings.log_file)
    except (OSError, ValueError) as e:
        if explicit:
            raise EvaluationError(f"loss curve: {e}") from None
        # a run's own metrics.jsonl that holds no losses yet must not cost the evaluation
        print(f"warning: no loss curve drawn: {e}", file=sys.stderr)
        return {"error": str(e)}
    files["loss_curve"] = "loss_curve.png"
    return summary


def _write_outputs(out_dir, files, settings, records, runs, table):
    from sciassist.plots import plot_accuracy_by_category
    golds = [r["meta"]["answer"] for r in records]
    for name, run in runs.items():
        path = write_results_file(out_dir / f"predictions_{name}.json", results_data(records, run["prediction"]))
        files[f"predictions_{name}"] = path.name
        if run["generated"] is not None:
            path = write_results_file(out_dir / f"predictions_{name}_generated.json",
                                      results_data(records, run["generated_prediction"], run["generated"]))
            files[f"predictions_{name}_generated"] = path.name
        lines = []
        for i, record in enumerate(records):
            meta = record["meta"]
            prediction = run["prediction"][i]
            item = {
                "pid": question_pid(record, i),
                "gold": golds[i],
                "gold_letter": LETTERS[golds[i]],
                "num_choices": len(meta["choices"]),
                "prediction": prediction,
                "prediction_letter": LETTERS[prediction],
                "correct": prediction == golds[i],
                "probabilities": [round(p, 6) for p in run["probabilities"][i]],
                "generated": None, "generated_prediction": None, "valid": None, "generated_correct": None,
                "subject": meta.get("subject"), "grade": meta.get("grade"), "topic": meta.get("topic"),
                "has_image": meta.get("has_image"), "has_hint": meta.get("has_hint"),
            }
            if run["generated"] is not None:
                generated = run["generated_prediction"][i]
                item.update(generated=run["generated"][i], generated_prediction=generated,
                            valid=generated is not None, generated_correct=generated == golds[i])
            lines.append(json.dumps(item, ensure_ascii=False))
        path = out_dir / f"per_question_{name}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files[f"per_question_{name}"] = path.name
    _write_json(out_dir / "table.json", table)
    files["table_json"] = "table.json"
    model_rows = [row for row in table["rows"] if row["name"] in runs]
    chance_row = next(row for row in table["rows"] if row["name"] == "chance")
    plot_accuracy_by_category(
        table["columns"],
        {row["name"]: [row["cells"][c]["accuracy"] for c in table["columns"]] for row in model_rows},
        out_dir / "accuracy_by_category.png",
        chance=[chance_row["cells"][c]["accuracy"] for c in table["columns"]],
        counts=[table["counts"][c] for c in table["columns"]],
        title=f"ScienceQA {settings.split}: accuracy by category ({settings.scoring} scoring)",
    )
    files["accuracy_chart"] = "accuracy_by_category.png"


# -----------------------------------------------------------------------------
# markdown


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


def samples_markdown(records, runs, sample_indices, settings):
    names = list(runs)
    prompts, prefix = prompts_for(records, settings.prompt_style)
    lines = [f"# Sample answers ({settings.split}, prompt style {settings.prompt_style})", ""]
    if settings.scoring == "choice":
        lines.append("Choice scoring: the option whose whole answer line is most likely (its probability among the "
                     "question's options). Generated: greedy reply; the answer is read by the strict parser.")
    else:
        lines.append("Letter scoring: the most likely letter after the answer prefix (its probability among the "
                     "question's letters). Generated: greedy reply; the answer is read by the strict parser.")
    for i in sample_indices:
        record = records[i]
        meta = record["meta"]
        gold = meta["answer"]
        lines += ["", f"## {question_pid(record, i)} ({meta.get('subject') or 'subject unknown'}, "
                      f"{meta.get('topic') or 'topic unknown'})", "", _quote(prompts[i][-1]["content"]), "",
                  f"Gold answer: **{LETTERS[gold]}. {meta['choices'][gold]}**", ""]
        lines.append("| | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        cells = []
        for name in names:
            p = runs[name]["prediction"][i]
            mark = "correct" if p == gold else "wrong"
            cells.append(f"{LETTERS[p]} (p={runs[name]['probabilities'][i][p]:.2f}, {mark})")
        lines.append(f"| {settings.scoring} scoring | " + " | ".join(cells) + " |")
        cells = []
        for name in names:
            text = runs[name]["samples"].get(i)
            if text is None and runs[name]["generated"] is not None:
                text = runs[name]["generated"][i]
            parsed = (parse_answer(text, len(meta["choices"]), prefix, meta["choices"], settings.answer_format)
                      if text is not None else None)
            cells.append("not generated" if text is None else
                         ("invalid (no strict answer)" if parsed is None else
                          f"{LETTERS[parsed]} ({'correct' if parsed == gold else 'wrong'})"))
        lines.append("| generated | " + " | ".join(cells) + " |")
        for name in names:
            text = runs[name]["samples"].get(i)
            if text is None and runs[name]["generated"] is not None:
                text = runs[name]["generated"][i]
            if text is not None:
                lines += ["", f"**{name}**:", "", _fence(text.strip())]
    return "\n".join(lines) + "\n"


def report_markdown(summary):
    s = summary["settings"]
    data = summary["data"]
    table = summary["table"]
    known = table["known"]
    lines = ["# ScienceQA evaluation", ""]
    lines += ["## Models", ""]
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
    lines += ["", "## Data", ""]
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
    lines += ["", "## Settings", ""]
    after = f'"{ANSWER_PREFIX}"'
    if s["prompt_style"] != "sciassist":
        after = "<|assistant_start|> (the letter is the first token)"
    line = "\" <option> (<L>).\"" if s.get("answer_format") == "text_first" else "\" <L>. <option>\""
    how = ("letter scoring" if s.get("scoring", "letter") == "letter" else
           f"CHOICE scoring (each option's whole answer line {line})")
    how += f"; answer format {s.get('answer_format', 'letter_first')}"
    lines.append(f"- prompt style `{s['prompt_style']}`; {how} after {after}; "
                 f"batch size {s['batch_size']}; device {summary['device']}")
    if s["generate"]:
        rule = ("the reply states \"The correct answer is X\" strictly (capital letter among the question's letters, "
                "standing alone; first occurrence only)" if s["prompt_style"] == "sciassist" else
                "the reply begins with a capital letter among the question's letters, standing alone")
        if s["prompt_style"] == "sciassist" and s.get("answer_format") == "text_first":
            rule = ("the reply's first \"The correct answer is\" is followed on its line by an option's text and "
                    "that option's letter as \"(X)\"")
        lines.append(f"- generation: greedy, at most {s['max_new_tokens']} tokens; an answer is valid only when "
                     f"{rule}; invalid answers count as wrong")
    else:
        lines.append("- generation: off")
    lines += ["", "## Accuracy (%), 95% Wilson intervals", "", format_table_markdown(table), ""]
    lines.append(f"Rows: {s.get('scoring', 'letter')} scoring per model; \"(generated)\" = the strictly parsed "
                 f"greedy reply; majority = "
                 f"always the most common gold letter ({table.get('majority_letter')}) of "
                 f"{table.get('majority_source')}, among the letters a question has; chance = mean of 1/k on the "
                 f"same questions.")
    generation = {k: v for k, v in summary["generation"].items() if v is not None}
    if generation:
        lines += ["", "## Generated answers", "",
                  f"| model | valid | invalid | accuracy | agreement with {s.get('scoring', 'letter')} scoring |",
                  "|---|---:|---:|---:|---:|"]
        for name, g in generation.items():
            among = ""
            if g["agreement_among_valid"] is not None:
                among = f" ({100 * g['agreement_among_valid']:.1f}% of valid)"
            lines.append(f"| {name} | {g['valid']} ({100 * g['valid_rate']:.1f}%) | {g['invalid']} | "
                         f"{100 * g['accuracy']:.2f} | {100 * g['agreement']:.1f}%{among} |")
        for name, g in generation.items():
            if "names_an_option" in g:
                lines.append(f"\n{name}: {g['names_an_option']} of {g['count']} replies name an option's text; "
                             f"{g['letter_matches_text']} of those give that option's own letter.")
    topics = summary["topics"]
    if topics:
        names = [row["name"] for row in table["rows"] if row["kind"] == "predictions"]
        lines += ["", "## By topic (accuracy %)", "", format_topics_markdown(topics, names)]
    lines += ["", "## Timing", "", f"| model | load s | {s.get('scoring', 'letter')} scoring s | questions/s | "
              "generation s | questions/s |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, t in summary["timing"].items():
        gen_s = f"{t['generate_s']:.1f}" if "generate_s" in t else "-"
        gen_q = f"{t['generate_questions_per_s']:.1f}" if t.get("generate_questions_per_s") else "-"
        lines.append(f"| {name} | {t['load_s']:.1f} | {t['letter_s']:.1f} | {t['letter_questions_per_s']:.1f} | "
                     f"{gen_s} | {gen_q} |")
    lines.append(f"\nTotal {summary['total_s']:.1f} s.")
    if summary.get("loss_curve") and "error" not in summary["loss_curve"]:
        lc = summary["loss_curve"]
        best = (f"; best val loss {lc['best_val_loss']:.4f} at step {lc['best_val_step']}"
                if lc.get("best_val_loss") is not None else "")
        lines += ["", "## Training", "", "![loss curve](loss_curve.png)", "",
                  f"From {', '.join(lc['sources'])}: {lc['train_points']} train points, "
                  f"{lc['val_points']} val points{best}."]
    lines += ["", "## Files", ""]
    lines += [f"- `{f}`" for f in summary["files"].values()]
    lines += ["", "![accuracy by category](accuracy_by_category.png)", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# after training, and the CLI


def evaluate_after_training(output_dir, base=None, data_path=None, scienceqa=None, split="val", limit=None,
                            out_dir=None, model=None, tokenizer=None, data_dir=None, **overrides):
    """Evaluate a fine-tuning run's output dir (the checkpoint with the largest step, or the
    given in-memory model/tokenizer) against `base`, writing into <output_dir>/eval by
    default; the same code and files as `python sciassist_evaluate.py`. Returns the summary.

    base: a checkpoint folder / model file / source[:tag[:step]]; default: the model the run
    started from (meta "source_model" of the run's checkpoint), when that file still exists.
    data_dir: where the prepared scienceqa_<split>.jsonl is, when data_path is not given.
    overrides: any other EvalSettings field (device, batch_size, max_new_tokens, ...)."""
    output_dir = Path(output_dir)
    step = _latest_step(output_dir)
    if base is None and step is not None:
        source_model = _read_meta(output_dir, step).get("source_model")
        if source_model and Path(source_model).exists():
            base = str(source_model)
    if data_path is None and scienceqa is None and data_dir is not None:
        data_path = str(Path(data_dir) / f"scienceqa_{split}.jsonl")
    settings = EvalSettings(base=base, finetuned=str(output_dir), data_path=data_path, scienceqa=scienceqa,
                            split=split, limit=limit, out_dir=str(out_dir or output_dir / "eval"))
    settings = dataclasses.replace(settings, **overrides)
    models = None
    if model is not None:
        if tokenizer is None:
            raise ValueError("evaluate_after_training: model given without its tokenizer")
        info = model_info(model, _read_meta(output_dir, step) if step is not None else None, spec=str(output_dir),
                          checkpoint_dir=output_dir, step=step)
        models = {"finetuned": (model, tokenizer, info)}
    return evaluate(settings, models)


def _read_meta(directory, step):
    path = Path(directory) / f"meta_{step:06d}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _latest_step(directory):
    steps = [int(m.group(1)) for p in Path(directory).glob("model_*.pt")
             if (m := re.fullmatch(r"model_(\d+)\.pt", p.name))]
    return max(steps) if steps else None


def build_arg_parser():
    import argparse
    d = EvalSettings()
    p = argparse.ArgumentParser(
        prog="sciassist_evaluate.py",
        description="Evaluate nanochat checkpoints on ScienceQA: letter scoring, generated answers, the "
                    "ScienceQA table, plots and a report.")
    p.add_argument("--base", help="base model: a checkpoint folder or source[:tag[:step]], e.g. sft:d20")
    p.add_argument("--finetuned", help="fine-tuned model: a checkpoint folder (a fine-tune output dir) or "
                                       "source[:tag[:step]]")
    p.add_argument("--base_dir", help="nanochat base dir for source:tag specs "
                                      "(default $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    p.add_argument("--data_path", help="prepared JSONL (default data/scienceqa_<split>.jsonl)")
    p.add_argument("--scienceqa", help="evaluate straight from a ScienceQA source instead: sample | hf | DIR")
    p.add_argument("--split", default=d.split, choices=["train", "val", "test"], help=f"default {d.split}")
    p.add_argument("--limit", type=int,
                   help="at most this many questions (JSONL: the first N; source: a seeded subset)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"subset seed with --scienceqa (default {d.seed})")
    p.add_argument("--prompt_style", default=d.prompt_style, choices=PROMPT_STYLES,
                   help="sciassist = the training format; nanochat = nanochat's own multiple-choice prompt")
    p.add_argument("--scoring", default=d.scoring, choices=("auto", *SCORING_MODES),
                   help="letter = the letter after the answer prefix; choice = each option's whole answer line "
                        "as training writes it; auto (default) = letter, or choice for text_first answers")
    p.add_argument("--answer_format", default=d.answer_format, choices=("auto", *ANSWER_FORMATS),
                   help="how the fine-tune's answers were written (python -m sciassist.data.scienceqa --answer_format); "
                        "auto (default) reads it from the evaluated file's reference answers "
                        "(letter_first with --scienceqa)")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--no_generate", dest="generate", action="store_false", help="skip generated answers")
    p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens,
                   help=f"generation length (default {d.max_new_tokens})")
    p.add_argument("--num_samples", type=int, default=d.num_samples,
                   help=f"questions in samples.md (default {d.num_samples})")
    p.add_argument("--sample_max_tokens", type=int, default=d.sample_max_tokens,
                   help=f"reply length for samples.md (default {d.sample_max_tokens})")
    p.add_argument("--train_path",
                   help="train JSONL for the majority row (default: scienceqa_train.jsonl beside the data)")
    p.add_argument("--metrics_path", help="metrics.jsonl of a run to re-draw (default: <finetuned>/metrics.jsonl)")
    p.add_argument("--log_file", help="text log of a training run (e.g. the original project's) to draw as well")
    p.add_argument("--out_dir", default=d.out_dir, help=f"default {d.out_dir}")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda | mps (default auto)")
    return p


def main(argv=None):
    args = build_arg_parser().parse_args(argv)
    settings = EvalSettings(**vars(args))
    from nanochat.checkpoint import CheckpointError
    from sciassist.data.conversations import ConversationError
    from sciassist.data.scienceqa import ScienceQAError
    try:
        evaluate(settings)
    except (EvaluationError, CheckpointError, ConversationError, ScienceQAError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

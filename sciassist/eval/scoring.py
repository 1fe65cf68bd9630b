"""How a model's answer to a question is read: scored from its next-token probabilities, or
generated and parsed.

Letter scoring. The prompt is rendered exactly as in training (the record's messages
without the final assistant message, then <|assistant_start|>), followed by the fixed start
of every training answer, "The correct answer is". The answer is the letter, among the ones
the question has (2-5), that the model finds most likely next. With a small BPE vocabulary
" B" can be two tokens (" ", "B"), so the letters are compared as token continuations:
prefix + " " + letter is encoded for each letter, the tokens all letters share become part
of the prompt, and each letter is scored by the summed log-probability of its remaining
tokens. When every remainder is one token (the usual case), a single forward pass scores
all letters of a question.

Choice scoring. Each option is scored by the summed log-probability of its whole answer line
after the prefix, exactly as training writes it (" <L>. <option text>", or " <option text>
(<L>)." in the text_first answer format), so a model that knows the answer's text but not
yet its letter still gets credit. In the text_first format the letter only comes after the
option text, so letter scoring cannot apply there and choice scoring is the rule.

Both are deterministic and never give an unparseable answer. Generated answers are greedy
replies from the KV-cache engine, read by the strict parser (sciassist.data.answers.parse_answer).

Batches. Every function here takes batch_size as a number, "auto" or a BatchSize (the one
object an evaluation passes everywhere): a batch that runs out of memory is halved until it
fits, and the smaller size is kept from then on. A question's score and greedy reply depend
on the batch it shares only through the rounding of the forward pass (a batch's shape changes
the kernels' order of sums): in fp32 the scores agree within 1e-5 and the replies are the same;
in bf16 the scores agree within about 2e-2, so a near tie can go the other way
(tests/eval/test_batch_memory.py)."""

import functools
import math
import sys

import torch

from nanochat.engine import Engine
from sciassist import memory
from sciassist.common import AUTO, autocast, compute_dtype
from sciassist.data.answers import ANSWER_PREFIX, LETTERS, choice_lines
from sciassist.eval.questions import EvaluationError

# The model returns logits for every position (B, T, V) in fp32; cap their number per batch
# so d20's 65,536-token vocabulary cannot exhaust memory (2**28 floats = 1 GiB, about three
# times that at peak with the softcap's temporaries).
LOGITS_PER_BATCH = 2**28


# --batch_size auto starts here on every device. On a card the halving finds what fits; on a CPU
# 32 is what the evaluator always used (a CPU has no card memory to run out of: the machine's
# memory is the limit, and a larger batch gains nothing once the cores are busy).
AUTO_BATCH_SIZE = 32


def check_count(name, value):
    """A batch size or a token count: a whole number >= 1, else EvaluationError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise EvaluationError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def _say(line):
    print(line, file=sys.stderr, flush=True)


class BatchSize:
    """How many rows an evaluation runs at once: `size` now. It starts at the number given, or at
    AUTO_BATCH_SIZE for "auto"; a batch that runs out of memory is halved (one line through `say`,
    sciassist.memory.halving) until it fits, and the size that fitted is kept for every later
    batch, so the limit is found once per evaluation, not once per batch. memory.OutOfMemory
    when even a batch of 1 does not fit."""

    def __init__(self, size=AUTO, say=_say):
        self.size = AUTO_BATCH_SIZE if size == AUTO else check_count("batch_size", size)
        self.say = say

    def chunks(self, items, work, device, most=None):
        """Yield (chunk, work(chunk)) for consecutive chunks of `items`, each as long as the
        current size allows (and at most most(chunk's first item), when given)."""
        start = 0
        while start < len(items):
            tried = min(self.size, len(items) - start)
            if most is not None:
                tried = max(1, min(tried, most(items[start])))
            result, fitted = memory.halving(functools.partial(_first, work, items, start), tried, device,
                                            what="a batch of", say=self.say)
            if fitted < tried:
                self.size = fitted
            yield items[start:start + fitted], result
            start += fitted


def _first(work, items, start, n):
    """work on the n items from `start`."""
    return work(items[start:start + n])


def batches_of(batch_size) -> BatchSize:
    """`batch_size` as a BatchSize: a number or "auto" makes a new one; a BatchSize is itself."""
    return batch_size if isinstance(batch_size, BatchSize) else BatchSize(batch_size)


# ----------------------------------------------------------------------------- continuations

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


def letter_continuations(tokenizer, answer_prefix, num_choices):
    """Tokens shared by every "<prefix> <letter>" of a question, and each letter's
    remaining tokens. The shared tokens go into the prompt; the remainders are scored."""
    texts = [f"{answer_prefix} {letter}" if answer_prefix else letter for letter in LETTERS[:num_choices]]
    return _shared_and_rest(tokenizer, texts, "the tokenizer encodes one answer letter as a prefix of another")


def choice_continuations(tokenizer, answer_prefix, choices, answer_format="letter_first"):
    """Tokens shared by every answer line of a question (choice_lines), and each option's
    remaining tokens. Each line is encoded whole, as the training answer is."""
    return _shared_and_rest(tokenizer, choice_lines(answer_prefix, choices, answer_format),
                            "one answer line is a prefix of another")


# ----------------------------------------------------------------------------- forward passes

def _scoring_rows(context, continuations):
    """Sequences to run for one question: (ids, [(option, position, token), ...]). Options
    whose continuation is a single token share one sequence (the context alone); an option of
    several tokens gets its own sequence, context + its tokens but the last."""
    rows = []
    singles = [(j, len(context) - 1, c[0]) for j, c in enumerate(continuations) if len(c) == 1]
    if singles:
        rows.append((context, singles))
    for j, c in enumerate(continuations):
        if len(c) > 1:
            rows.append((context + c[:-1], [(j, len(context) - 1 + t, tok) for t, tok in enumerate(c)]))
    return rows


@torch.inference_mode()
def _score_rows(model, rows, batch_size, pad_id=0):
    """Log-probabilities of each row's target tokens. Rows are sorted by length so a batch
    holds similar lengths; right padding cannot change earlier positions (causal attention),
    so no mask is needed. One forward pass per batch."""
    batches = batches_of(batch_size)
    device = model.get_device()
    vocab_size = model.config.vocab_size
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [None] * len(rows)
    chunks = batches.chunks(order, functools.partial(_score_batch, model, rows, pad_id), device,
                            most=lambda r: LOGITS_PER_BATCH // (len(rows[r][0]) * vocab_size))
    for chunk, values in chunks:
        k = 0
        for r in chunk:
            out[r] = values[k:k + len(rows[r][1])]
            k += len(rows[r][1])
    return out


def _score_batch(model, rows, pad_id, chunk):
    """The target tokens' log-probabilities of the rows in `chunk`, in order, from one forward pass."""
    device = model.get_device()
    longest = len(rows[chunk[0]][0])
    ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
    for b, r in enumerate(chunk):
        ids[b, :len(rows[r][0])] = torch.tensor(rows[r][0], dtype=torch.long)
    with autocast(device):
        logits = model(ids.to(device))
    targets = [(b, position, token) for b, r in enumerate(chunk) for _, position, token in rows[r][1]]
    batch_index, positions, tokens = (list(column) for column in zip(*targets, strict=True))
    picked = logits[torch.tensor(batch_index, device=device), torch.tensor(positions, device=device)]
    log_probs = picked.float().log_softmax(dim=-1)
    return log_probs[torch.arange(len(tokens), device=device), torch.tensor(tokens, device=device)].tolist()


def _token_scores(model, tokenizer, prompts, question_continuations, batch_size):
    """Per question and option, the log-probability of each token of the option's
    continuation after the prompt and the shared tokens (one list per option, in order).
    question_continuations: (shared, continuations) per question."""
    rows, owners = [], []  # owners[i] = question index of rows[i]
    for q, (prompt, (shared, continuations)) in enumerate(zip(prompts, question_continuations, strict=True)):
        context = tokenizer.render_for_completion(prompt) + shared
        for row in _scoring_rows(context, continuations):
            rows.append(row)
            owners.append(q)
    values = _score_rows(model, rows, batch_size, pad_id=tokenizer.get_bos_token_id())
    scores = [[[] for _ in continuations] for _, continuations in question_continuations]
    for (_, targets), q, row_values in zip(rows, owners, values, strict=True):
        for (option, _, _), value in zip(targets, row_values, strict=True):
            scores[q][option].append(value)
    return scores


def summed(token_scores):
    """Per question, each option's summed log-probability (its whole continuation's)."""
    return [[sum(tokens) for tokens in options] for options in token_scores]


def _summed_scores(model, tokenizer, prompts, question_continuations, batch_size):
    """Per question, the summed log-probability of each option's continuation."""
    return summed(_token_scores(model, tokenizer, prompts, question_continuations, batch_size))


def text_continuation_scores(model, tokenizer, contexts, continuations, batch_size=32, bos=False):
    """Per question, the summed log-probability of each continuation text after a plain-text
    context (no chat template), split as lm-evaluation-harness splits a causal model's pair:
    trailing spaces of the context move to the continuation, context + continuation is
    encoded whole and the continuation's tokens are those after the context's own encoding.
    bos: start with <|bos|> (lm-eval's hf model adds nothing for a tokenizer like the exported
    one, which has no post-processor). contexts: [str]; continuations: [[str]]."""
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuation lists")
    start = [tokenizer.get_bos_token_id()] if bos else []
    pairs = []
    for context, options in zip(contexts, continuations, strict=True):
        stripped = context.rstrip()
        moved = context[len(stripped):]
        if not stripped:
            raise EvaluationError("a context must not be empty")
        context_ids = start + tokenizer.encode(stripped)
        tails = [(start + tokenizer.encode(stripped + moved + option))[len(context_ids):] for option in options]
        if any(not tail for tail in tails):
            raise EvaluationError(f"an empty continuation after {stripped[-40:]!r}")
        pairs.append((context_ids, tails))
    rows, owners = [], []
    for q, (context_ids, tails) in enumerate(pairs):
        for row in _scoring_rows(context_ids, tails):
            rows.append(row)
            owners.append(q)
    values = _score_rows(model, rows, batch_size, pad_id=tokenizer.get_bos_token_id())
    sums = [[0.0] * len(tails) for _, tails in pairs]
    for (_, targets), q, row_values in zip(rows, owners, values, strict=True):
        for (option, _, _), value in zip(targets, row_values, strict=True):
            sums[q][option] += value
    return sums


# ----------------------------------------------------------------------------- scores

def letter_scores(model, tokenizer, prompts, num_choices, answer_prefix=ANSWER_PREFIX, batch_size=32):
    """Per question, the summed log-probability of each of its letters (see module doc).
    prompts: message lists (or {"messages": ...}); a final assistant message is dropped."""
    if len(prompts) != len(num_choices):
        raise ValueError(f"{len(prompts)} prompts but {len(num_choices)} num_choices")
    by_count = {k: letter_continuations(tokenizer, answer_prefix, k) for k in sorted(set(num_choices))}
    return _summed_scores(model, tokenizer, prompts, [by_count[k] for k in num_choices], batch_size)


def choice_scores(model, tokenizer, prompts, choices, answer_prefix=ANSWER_PREFIX, batch_size=32,
                  answer_format="letter_first"):
    """Per question, the summed log-probability of each option's whole answer line
    (" <L>. <choice>", or " <choice> (<L>)." for text_first) after the prompt and the
    prefix (see the module doc). choices: the option texts of each question."""
    _, token_scores = choice_token_scores(model, tokenizer, prompts, choices, answer_prefix, batch_size,
                                          answer_format)
    return summed(token_scores)


def choice_token_scores(model, tokenizer, prompts, choices, answer_prefix=ANSWER_PREFIX, batch_size=32,
                        answer_format="letter_first"):
    """(continuations, token scores) per question: each option's answer-line tokens after the
    shared ones (choice_continuations) and the log-probability of each of them. choice_scores
    is their sum; constrained_choice walks them token by token."""
    if len(prompts) != len(choices):
        raise ValueError(f"{len(prompts)} prompts but {len(choices)} choice lists")
    if not answer_prefix:
        raise EvaluationError("choice scoring needs the SciAssist answer prefix (prompt style sciassist)")
    continuations = [choice_continuations(tokenizer, answer_prefix, options, answer_format) for options in choices]
    scores = _token_scores(model, tokenizer, prompts, continuations, batch_size)
    return [c for _, c in continuations], scores


def constrained_choice(continuations, token_scores):
    """The option that greedy decoding picks when every next token must keep the reply on one
    of the question's answer lines (each line tokenized as training writes it).

    At each position the lines still possible either agree on the next token or branch; at a
    branch, greedy decoding takes the most likely of the branching tokens. The model's
    distribution at a position depends only on the tokens before it, which all lines still
    possible share, so each line's own teacher-forced log-probability of its next token (from
    the choice-scoring pass) is exactly what the decoder would compare: no extra forward pass.
    Ties go to the earlier option. A line that ends where a longer line goes on (never the case
    for answer lines, whose letters differ) gives way to the longer one."""
    alive = list(range(len(continuations)))
    position = 0
    while len(alive) > 1:
        going_on = [j for j in alive if len(continuations[j]) > position]
        if not going_on:
            break
        best = {}
        for j in going_on:  # the first line with a given next token carries its log-probability
            best.setdefault(continuations[j][position], token_scores[j][position])
        token = max(best, key=lambda t: best[t])
        alive = [j for j in going_on if continuations[j][position] == token]
        position += 1
    return alive[0]


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


# ----------------------------------------------------------------------------- generation

def generate_answers(model, tokenizer, prompts, max_tokens=32, batch_size=32):
    """Greedy replies (text) to each prompt, decoded in batches of similar prompt lengths
    with Engine.generate_multi (equal to decoding each prompt alone)."""
    check_count("max_tokens", max_tokens)
    batches = batches_of(batch_size)
    engine = Engine(model, tokenizer, compute_dtype(model.get_device()))
    prompt_ids = [tokenizer.render_for_completion(p) for p in prompts]
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    texts = [None] * len(prompt_ids)

    def generate(chunk):
        return engine.generate_multi([prompt_ids[i] for i in chunk], max_tokens=max_tokens, temperature=0.0)

    for chunk, outputs in batches.chunks(order, generate, model.get_device()):
        for i, tokens in zip(chunk, outputs, strict=True):
            texts[i] = tokenizer.decode(tokens)
    return texts


# ----------------------------------------------------------------------------- the scored position

def _reference_answer(record):
    """The record's reference answer text, or None when its last message is not one."""
    message = record["messages"][-1]
    content = message.get("content")
    return content if message.get("role") == "assistant" and isinstance(content, str) else None


def answer_prefix_check(tokenizer, records, answer_prefix=ANSWER_PREFIX, scoring="letter",
                        answer_format="letter_first"):
    """How many reference answers start with "<prefix> <gold letter>" AND tokenize so that
    the prompt + scored tokens are a prefix of the training tokens (i.e. letter scoring
    reads the exact position training taught). Returns (matching, checked). For choice
    scoring: how many start with the gold option's answer line, tokenized the same way."""
    matching = checked = 0
    cache = {}
    for record in records:
        content = _reference_answer(record)
        if content is None:
            continue
        checked += 1
        meta = record["meta"]
        if scoring == "choice":
            start = choice_lines(answer_prefix, meta["choices"], answer_format)[meta["answer"]]
            expected = tokenizer.encode(start)
        else:
            k = len(meta["choices"])
            if k not in cache:
                cache[k] = letter_continuations(tokenizer, answer_prefix, k)
            shared, continuations = cache[k]
            start = f"{answer_prefix} {LETTERS[meta['answer']]}"
            expected = shared + continuations[meta["answer"]]
        matching += content.startswith(start) and tokenizer.encode(content)[:len(expected)] == expected
    return matching, checked

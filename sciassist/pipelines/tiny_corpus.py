"""What the tiny base model learns from (sciassist.pipelines.tiny): the training split's text as
plain documents, a BPE tokenizer trained on them, endless batches of their tokens, and the
bits-per-byte measure on validation text."""

import math

import torch

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer
from sciassist.common import UserError
from sciassist.data.answers import LETTERS
from sciassist.data.scienceqa import load_scienceqa

DEFAULT_VOCAB_SIZE = 4096
BYTES_PER_VOCAB_ENTRY = 64  # auto vocab: at most one token per this many bytes of training text
MIN_AUTO_VOCAB_SIZE = 512


class TinyError(UserError):
    """A run that cannot start; the message says what to do."""


# ----------------------------------------------------------------------------- text

def record_document(record):
    """One raw ScienceQA record as one plain-text document ("" when it has no question).

    Laid out as the fine-tuning prompt is (context, question, lettered choices), followed by
    the solution and the lecture. The answer line is left out: teaching the answer format is
    the fine-tune's job.
    """
    if not record.get("question"):
        return ""
    parts = []
    if record.get("hint"):
        parts.append(f"Context: {record['hint'].strip()}")
    if record.get("caption"):
        parts.append(f"Image: {record['caption'].strip()}")
    parts.append(record["question"].strip())
    choices = record.get("choices") or []
    if choices:
        parts.append("\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices[:len(LETTERS)])))
    if record.get("solution"):
        parts.append(record["solution"].strip())
    if record.get("lecture"):
        parts.append(record["lecture"].strip())
    return "\n\n".join(parts)


def corpus_documents(records):
    """Documents of a list of records: one per record with a question, each lecture kept
    only the first time it appears (see the module docstring)."""
    seen_lectures = set()
    documents = []
    for record in records:
        lecture = record.get("lecture")
        if lecture and lecture in seen_lectures:
            record = {**record, "lecture": None}
        elif lecture:
            seen_lectures.add(lecture)
        document = record_document(record)
        if document:
            documents.append(document)
    return documents


def training_corpus(source):
    """The documents the tokenizer and the model are trained on: the train split only."""
    return corpus_documents(load_scienceqa(source, "train"))


def choose_vocab_size(documents, requested=None):
    """`requested` as given, else 4,096 capped by the text's size (module docstring)."""
    if requested is not None:
        return requested
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    cap = 2 ** int(math.log2(max(1, n_bytes // BYTES_PER_VOCAB_ENTRY)))
    return max(MIN_AUTO_VOCAB_SIZE, min(DEFAULT_VOCAB_SIZE, cap))


def train_tokenizer(documents, vocab_size, exact=True):
    """rustbpe on `documents`. With exact=False a vocab the text cannot fill is shrunk by a
    quarter until it can (automatic sizing on a very small text); 256 bytes + the specials
    always can. With exact=True that is an error."""
    smallest = 256 + len(SPECIAL_TOKENS)
    while True:
        try:
            return Tokenizer.train_from_iterator(documents, vocab_size)
        except ValueError as e:
            if exact or vocab_size <= smallest:
                raise TinyError(f"cannot train a {vocab_size}-token tokenizer: {e}") from e
            smaller = max(smallest, vocab_size * 3 // 4)
            print(f"note: the training text is too small for {vocab_size} tokens; trying {smaller}")
            vocab_size = smaller


# ----------------------------------------------------------------------------- batches

def token_stream(token_docs, seed):
    """Endless token ids: documents in a fresh seeded order each epoch, concatenated.
    Yields (token, epoch)."""
    generator = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        for i in torch.randperm(len(token_docs), generator=generator).tolist():
            for token in token_docs[i]:
                yield token, epoch
        epoch += 1


def batches(token_docs, batch_size, seq_len, seed):
    """Endless (inputs, targets, epoch): B*T+1 consecutive stream tokens, targets shifted by
    one, so every token is used once per epoch (nanochat's base-training layout)."""
    stream = token_stream(token_docs, seed)
    carry = None  # the last target of a batch is the first input of the next
    while True:
        need = batch_size * seq_len + (1 if carry is None else 0)
        chunk = [] if carry is None else [carry]
        epoch = 0
        for _ in range(need):
            token, epoch = next(stream)
            chunk.append(token)
        carry = chunk[-1]
        buf = torch.tensor(chunk, dtype=torch.long)
        yield buf[:-1].view(batch_size, seq_len), buf[1:].view(batch_size, seq_len), epoch


def eval_rows(token_docs, seq_len, max_rows):
    """Up to max_rows rows of seq_len+1 tokens of the documents in their given order (the
    same rows every time, so val_bpb is comparable between runs). (N, T+1) long or None."""
    flat = [t for doc in token_docs for t in doc]
    n = min(max_rows, len(flat) // (seq_len + 1))
    if n == 0:
        return None
    return torch.tensor(flat[:n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1)


@torch.no_grad()
def bits_per_byte(model, rows, token_bytes, batch_size=8):
    """nanochat's val_bpb: summed loss over target tokens that are text (bytes > 0), divided by
    ln 2 times their total UTF-8 bytes. Independent of the vocabulary size."""
    device = model.get_device()
    token_bytes = token_bytes.to(device)
    total_nats, total_bytes = 0.0, 0
    for i in range(0, rows.size(0), batch_size):
        row = rows[i:i + batch_size].to(device)
        losses = model(row[:, :-1], row[:, 1:], loss_reduction="none")
        nbytes = token_bytes[row[:, 1:]]
        total_nats += (losses.float() * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    return total_nats / (math.log(2) * total_bytes) if total_bytes else float("nan")

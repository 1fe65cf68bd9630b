"""
Conversations -> training batches, in three separately testable stages.

1. tokenize_conversations: render each conversation with its supervision mask (only the
   assistant's tokens and its <|assistant_end|> are trained on), cut it to max_seq_len and
   count what was cut.
2. arrange_step: which conversations one optimizer step uses (a shuffle of the whole set per
   epoch, from the seed), how they are packed into rows, and which rows each rank runs.
   The arrangement is a pure function of (dataset lengths, seed, step, world size), so every rank
   computes the same one without talking to the others, and a resumed run gets the same
   batches as an uninterrupted one.
3. collate: rows -> tensors (inputs, targets) and, on the host, what the forward needs to
   know about them (the packed layout, the supervised positions): nothing is read back from
   the device during a training forward.

Positions. A conversation of L tokens occupies L-1 positions: inputs are ids[:-1] and
targets ids[1:] (the last token is only ever a target). max_seq_len bounds the positions,
so a conversation keeps at most max_seq_len + 1 tokens.

Packing (padding-free). nanochat pads each batch of conversations to its longest, which on
ScienceQA-like data spends about half the compute on padding. Here several conversations
share a row of up to max_seq_len positions; the batch's `layout`
(nanochat.attention.PackedLayout) tells GPT.forward where each one starts, so attention stays
inside a conversation and rotary positions restart at 0.
Targets that would cross from one conversation into the next do not exist by construction
(each conversation brings its own targets); padding positions have target -1.

The baseline nanochat-style padded batching (one conversation per row, right-padded with
<|assistant_end|> to the longest in the batch) is kept for comparison (bench/bench_train.py).
"""

import bisect
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from nanochat.attention import PackedLayout

# Rows of a packed micro-batch are padded to a multiple of this: shapes then repeat often
# enough for kernels (and torch.compile) to reuse their plans, at a cost of < 64 positions.
ROW_MULTIPLE = 64
# A rank with no rows left in a step still runs a forward/backward (DDP needs every rank to
# take part in every gradient all-reduce): on this many pad positions, all ignored.
EMPTY_ROW_LEN = 8
# Large enough that render_conversation never cuts: we cut ourselves, to count it.
_NO_LIMIT = 1 << 40


@dataclass
class TokenizedDataset:
    """Token ids and supervision masks of a set of conversations, ready to batch.

    ids[i] and masks[i] have the same length (<= max_seq_len + 1); mask 1 = this token is a
    training target. Conversations with no supervised token left after truncation are not
    kept (they would cost compute and teach nothing); record_indices maps back to the input.
    """

    ids: list
    masks: list
    max_seq_len: int
    record_indices: list
    num_truncated: int = 0  # conversations cut to max_seq_len + 1 tokens
    num_truncated_tokens: int = 0  # tokens those cuts removed
    num_dropped: int = 0  # conversations left out: no supervised token (after truncation)
    lengths: list = field(init=False, repr=False)  # positions per conversation (tokens - 1)
    supervised: list = field(init=False, repr=False)  # supervised targets per conversation

    def __post_init__(self):
        self.lengths = [len(x) - 1 for x in self.ids]
        self.supervised = [sum(m[1:]) for m in self.masks]

    def __len__(self):
        return len(self.ids)

    def total_tokens(self):
        return sum(self.lengths)

    def total_supervised(self):
        return sum(self.supervised)

    def describe(self):
        """One line for logs: size, supervision and what truncation did."""
        n = len(self)
        text = (f"{n} conversations, {self.total_tokens()} positions "
                f"({self.total_supervised()} supervised), longest {max(self.lengths, default=0)}")
        if self.num_truncated:
            text += (f"; {self.num_truncated} truncated to max_seq_len={self.max_seq_len} "
                     f"({self.num_truncated_tokens} tokens cut)")
        if self.num_dropped:
            text += f"; {self.num_dropped} dropped (no assistant token left to train on)"
        return text


def tokenize_conversations(tokenizer, records, max_seq_len):
    """Render records ({"messages": [...]} or message lists) with tokenizer.render_conversation
    and cut each to max_seq_len positions (max_seq_len + 1 tokens). Returns a TokenizedDataset."""
    if type(max_seq_len) is not int or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    keep_tokens = max_seq_len + 1
    ids_list, masks_list, record_indices = [], [], []
    truncated = truncated_tokens = dropped = 0
    for index, record in enumerate(records):
        try:
            ids, mask = tokenizer.render_conversation(record, max_tokens=_NO_LIMIT)
        except ValueError as e:
            raise ValueError(f"conversation {index}: {e}") from e
        if len(ids) > keep_tokens:
            truncated += 1
            truncated_tokens += len(ids) - keep_tokens
            ids, mask = ids[:keep_tokens], mask[:keep_tokens]
        if len(ids) < 2 or not any(mask[1:]):
            dropped += 1
            continue
        ids_list.append(list(ids))
        masks_list.append(list(mask))
        record_indices.append(index)
    return TokenizedDataset(ids=ids_list, masks=masks_list, max_seq_len=max_seq_len,
                            record_indices=record_indices, num_truncated=truncated,
                            num_truncated_tokens=truncated_tokens, num_dropped=dropped)


# -----------------------------------------------------------------------------
# Which conversations each optimizer step uses

def steps_per_epoch(num_examples, examples_per_step):
    """Optimizer steps in one pass: num_examples // examples_per_step (nanochat's count, so
    12,000 examples at 64 per step give 187 steps per epoch). The leftover examples of an
    epoch (a different few each epoch, since the order is reshuffled) are not used; a set
    smaller than one step gives one step with all of it."""
    if num_examples <= 0:
        return 0
    return max(1, num_examples // examples_per_step)


@functools.lru_cache(maxsize=4)
def epoch_order(num_examples, epoch, seed):
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so
    it is reproducible, differs between epochs, and needs no state to resume."""
    return tuple(np.random.default_rng([seed, epoch]).permutation(num_examples).tolist())


def step_examples(num_examples, step, examples_per_step, seed):
    """(epoch, example indices) of global optimizer step `step` (0-based)."""
    per_epoch = steps_per_epoch(num_examples, examples_per_step)
    if per_epoch == 0:
        raise ValueError("no training examples")
    epoch, within = divmod(step, per_epoch)
    order = epoch_order(num_examples, epoch, seed)
    size = min(examples_per_step, num_examples)
    return epoch, list(order[within * size:(within + 1) * size])


# -----------------------------------------------------------------------------
# Packing and sharding

def pack_rows(lengths, row_len):
    """Best-fit decreasing bin packing: longest first (ties keep the given order), each into
    the row with the least room that still fits it, else a new row. Returns rows as lists of
    indices into `lengths`. Near-optimal for many short items and cheap (n log n)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = []
    free = []  # sorted (room left, row index)
    for i in order:
        length = lengths[i]
        if length > row_len:
            raise ValueError(f"item {i} has {length} positions, more than a row of {row_len}")
        k = bisect.bisect_left(free, (length, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - length, r))
        else:
            rows.append([i])
            bisect.insort(free, (row_len - length, len(rows) - 1))
    return rows


def balanced_row_len(lengths, num_rows, max_len):
    """The narrowest row width (a multiple of ROW_MULTIPLE, at most max_len) into which
    best-fit still packs `lengths` in `num_rows` rows. Packing into full-width rows leaves
    the last row of a step part empty, and every row of a micro-batch has the same width;
    narrowing all rows spreads that slack evenly instead (0.98 instead of 0.91 of positions
    used on ScienceQA at 64 conversations per step)."""
    width = max(max(lengths), -(-sum(lengths) // num_rows))
    width = min(-(-width // ROW_MULTIPLE) * ROW_MULTIPLE, max_len)
    while width < max_len and len(pack_rows(lengths, width)) > num_rows:
        width = min(width + ROW_MULTIPLE, max_len)
    return width


@dataclass
class StepRows:
    """What one rank does in one optimizer step.

    micro_batches: this rank's micro-batches; each is a list of rows, each row a list of
        dataset indices (one per conversation in the row). An empty micro-batch ([]) means
        "nothing left for this rank": collate makes it an all-ignored dummy.
    row_len: the width of every packed row in this step (None when not packed: each
        micro-batch is as wide as its longest conversation).
    num_supervised: supervised targets of the WHOLE step over ALL ranks: the loss of every
        micro-batch is divided by it, so the step's gradient is the mean over its supervised
        tokens however the work was split. Known on every rank without communication,
        because every rank computes the same arrangement.
    """

    micro_batches: list
    row_len: int | None
    num_supervised: int
    num_examples: int


def row_capacity(longest, max_seq_len, pack_len=None):
    """The widest a packed row may be for conversations of at most `longest` positions: pack_len
    (default max_seq_len) or the longest, whichever is wider, rounded up to ROW_MULTIPLE and at
    most max_seq_len."""
    wanted = max(pack_len or max_seq_len, longest)
    return min(max_seq_len, -(-wanted // ROW_MULTIPLE) * ROW_MULTIPLE)


def arrange_step(dataset, example_indices, device_batch_size, world_size=1, rank=0, packed=True, pack_len=None,
                 micro_positions=None):
    """Split one optimizer step's conversations into this rank's micro-batches.

    packed=True: the step's conversations are packed (best-fit) into rows of pack_len
    positions (default max_seq_len; wider when a conversation is longer), then every row is
    narrowed to the balanced width (balanced_row_len). A micro-batch holds as many rows as
    fit in device_batch_size x max_seq_len positions, the memory budget the flag stands
    for: 8 rows of 2048, or 16 of 1024 (micro_positions: another budget, in positions, e.g. the
    one sciassist.train.batch chose for the device). Shorter rows cost less attention, which is computed
    densely over a row (pack_len trades that against packing slack).
    packed=False: nanochat's way, one conversation per row, device_batch_size per
    micro-batch (padded to the longest by collate).
    Rows are dealt to ranks round-robin (longest first), so ranks never share a
    conversation; every rank gets the same number of micro-batches (DDP all-reduces once per
    step and every rank must take part), padding with empty ones where a rank runs out.
    """
    if device_batch_size < 1:
        raise ValueError(f"device_batch_size must be >= 1, got {device_batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    example_indices = list(example_indices)
    row_len = None
    rows_per_micro = device_batch_size
    if packed and example_indices:
        lengths = [dataset.lengths[i] for i in example_indices]
        capacity = row_capacity(max(lengths), dataset.max_seq_len, pack_len)
        row_len = balanced_row_len(lengths, len(pack_rows(lengths, capacity)), capacity)
        rows = [[example_indices[j] for j in row] for row in pack_rows(lengths, row_len)]
        rows.sort(key=lambda row: -sum(dataset.lengths[i] for i in row))
        budget = micro_positions if micro_positions is not None else device_batch_size * dataset.max_seq_len
        rows_per_micro = max(1, budget // row_len)
    else:
        rows = [[i] for i in example_indices]
    my_rows = rows[rank::world_size]
    rows_per_rank = -(-len(rows) // world_size)
    num_micro = max(1, -(-rows_per_rank // rows_per_micro))
    micro_batches = [my_rows[k * rows_per_micro:(k + 1) * rows_per_micro] for k in range(num_micro)]
    return StepRows(micro_batches=micro_batches, row_len=row_len,
                    num_supervised=sum(dataset.supervised[i] for i in example_indices),
                    num_examples=len(example_indices))


def collate(dataset, rows, pad_id, row_len=None, device=None):
    """Rows of dataset indices -> dict(inputs, targets, layout, supervised_index,
    num_supervised, num_tokens, num_positions).

    Width: row_len when given (a packed step's StepRows.row_len), else the longest row (the
    padded baseline). layout: the rows' PackedLayout (each conversation's boundaries, from the
    arrangement, on the host), None when no row holds two conversations (plain causal attention is
    then exact, and faster). Targets are -1 wherever nothing is to be learned: unsupervised
    tokens, padding; supervised_index holds the flat positions (into B*T) of the others.
    num_tokens counts real positions, num_positions all of them (B*T), num_supervised the
    targets != -1.
    """
    used = [sum(dataset.lengths[i] for i in row) for row in rows]
    longest = max(used, default=0)
    if not rows:
        width = min(EMPTY_ROW_LEN, dataset.max_seq_len)
    elif row_len is not None:
        if longest > row_len:
            raise ValueError(f"a row holds {longest} positions, more than row_len={row_len}")
        width = row_len
    else:
        width = longest
    batch = max(1, len(rows))
    inputs = np.full((batch, width), pad_id, dtype=np.int64)
    targets = np.full((batch, width), -1, dtype=np.int64)
    multi_doc = False
    for r, row in enumerate(rows):
        pos = 0
        multi_doc |= len(row) > 1
        for i in row:
            ids, mask = dataset.ids[i], dataset.masks[i]
            n = len(ids) - 1
            inputs[r, pos:pos + n] = ids[:-1]
            target = np.asarray(ids[1:], dtype=np.int64)
            target[np.asarray(mask[1:]) == 0] = -1
            targets[r, pos:pos + n] = target
            pos += n
    layout = None
    if multi_doc:
        layout = PackedLayout.from_row_lengths([[dataset.lengths[i] for i in row] for row in rows], width)
        layout = layout.to(device) if device is not None else layout
    supervised_index = np.flatnonzero(targets.reshape(-1) != -1)
    to = functools.partial(torch.as_tensor, device=device)
    return {
        "inputs": to(inputs),
        "targets": to(targets),
        "layout": layout,
        "supervised_index": to(supervised_index),
        "num_supervised": len(supervised_index),
        "num_tokens": int(sum(used)),
        "num_positions": batch * width,
    }


def step_batches(dataset, step_rows, pad_id, device=None):
    """The collated micro-batches of a step's arrangement (StepRows: this rank's)."""
    return [collate(dataset, rows, pad_id, step_rows.row_len, device) for rows in step_rows.micro_batches]

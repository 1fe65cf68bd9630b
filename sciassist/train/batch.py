"""The device batch of a fine-tuning run: how many positions one micro-batch holds.

--device_batch_size N: rows of max_seq_len positions, exactly as given: a micro-batch holds as
many packed rows as fit in N x max_seq_len positions (N conversations when not packed).

--device_batch_size auto (the default) chooses per device:
- a GPU: the memory planner's (sciassist.train.plan) largest micro-batch for the card's free
  memory, in positions, at the widest row this run's data makes (packed: its longest
  conversation or --pack_len, rounded up as packing rounds; not packed: its longest
  conversation), then proven before step 0 by one forward and backward of that shape, every
  position supervised, with the optimizer states' memory held aside; out of memory halves it
  (one line) until it fits. Under torchrun every rank takes the smallest any rank proved.
- a CPU: CPU_POSITIONS positions (at least one widest row), the fastest measured (bench/RESULTS.md):
  a CPU has no card to fill, and smaller micro-batches keep the loss's elementwise work over the
  vocabulary in cache.
- mps: MPS_ROWS rows of max_seq_len (torch reports no free memory there).
A resumed run takes the batch its resume point recorded, so it continues bit for bit.
Validation keeps eval_steps x VAL_ROWS conversations under auto, the same on every device.

Where not even one widest row fits the card, the run stops (before loading the weights when
the model's fixed memory alone is too much) with one line: the card, the plan, what fits.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from nanochat.attention import PackedLayout
from sciassist.common import AUTO
from sciassist.data.batching import ROW_MULTIPLE, row_capacity
from sciassist.memory import GB, Card, OutOfMemory, halving
from sciassist.train import plan
from sciassist.train.settings import TrainError, TrainSettings

# The CPU's micro-batch, in positions: the fastest or tied of 512-16,384 at 1 thread, fp32 and bf16, on
# an AMD EPYC Zen 4 (AVX512-BF16); on the AVX2-only EPYC 4,096 beat 16,384 and 2,048 is not yet measured
# (bench/RESULTS.md, "The CPU's device batch and precision").
CPU_POSITIONS = 2048
MPS_ROWS = 8  # the former default, kept where no memory can be asked
VAL_ROWS = 8  # auto: validation conversations = eval_steps x VAL_ROWS (the former default batch)
MAX_PLAN_POSITIONS = 2**22  # the planner's search stops here (beyond any card's batch)


class NoBatchFits(TrainError):
    """Not even one row of the run fits the card; the message says what does."""


@dataclasses.dataclass(frozen=True)
class DeviceBatch:
    """A run's micro-batch: `positions` per micro-batch (packed rows fill it), `rows` of the
    widest row (conversations when not packed), how it was chosen and why."""

    positions: int
    rows: int
    widest: int  # the row width it was sized at
    chosen: str  # "given", "planned", "proven", "cpu", "mps" or "recorded"
    reason: str
    planned_positions: int | None = None  # the planner's figure on a card (before proving)

    def record(self) -> dict:
        """The batch as run_summary.json, the resume point and the log keep it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> DeviceBatch:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        return cls(**{**values, "chosen": "recorded",
                      "reason": f"the resume point's ({record.get('chosen')}: {record.get('reason')})"})

    def describe(self) -> str:
        return (f"device batch: {self.rows} row(s) of {self.widest} positions ({self.positions:,} positions per "
                f"micro-batch); {self.reason}")


def widest_row(dataset, settings: TrainSettings) -> int:
    """The widest row this data makes: packed, the longest conversation or --pack_len, rounded up
    to ROW_MULTIPLE, at most max_seq_len (as sciassist.data.batching.arrange_step packs); not
    packed, the longest conversation (a padded micro-batch is as wide as its longest)."""
    longest = max(dataset.lengths, default=1)
    if not settings.packing:
        return max(1, longest)
    return row_capacity(longest, dataset.max_seq_len, settings.pack_len)


def val_conversations(settings: TrainSettings) -> int:
    """How many validation conversations a run evaluates on (the first ones, every time)."""
    rows = VAL_ROWS if settings.device_batch_size == AUTO else settings.device_batch_size
    return settings.eval_steps * rows


def given(settings: TrainSettings, max_seq_len: int) -> DeviceBatch:
    n = settings.device_batch_size
    return DeviceBatch(positions=n * max_seq_len, rows=n, widest=max_seq_len, chosen="given",
                       reason=f"--device_batch_size {n}")


def planned_positions(config, card: Card, bf16: bool, lora=None) -> int:
    """The planner's largest micro-batch (positions) for the card's free memory."""
    rows = plan.max_batch(config, ROW_MULTIPLE, card.free, bf16=bf16, lora=lora,
                          limit=MAX_PLAN_POSITIONS // ROW_MULTIPLE)
    return rows * ROW_MULTIPLE


def fixed_memory_check(settings: TrainSettings, config, card: Card, bf16: bool) -> None:
    """Before the weights are loaded: NoBatchFits when the card cannot hold the model's fixed
    memory plus one row of the narrowest width the run can have (--pack_len, or --max_seq_len)."""
    seq = min(settings.max_seq_len, config.sequence_len)
    # not packed, the widest row is the longest conversation, unknown before the data: one ROW_MULTIPLE
    # stands for it here (the fixed memory decides this check), the data's own width after loading
    narrowest = min(settings.pack_len, seq) if settings.packing else min(ROW_MULTIPLE, seq)
    if planned_positions(config, card, bf16, plan.LoraShape.of(settings)) < narrowest:
        raise NoBatchFits(no_fit_message(settings, config, card, bf16, narrowest))


def no_fit_message(settings: TrainSettings, config, card: Card, bf16: bool, widest: int) -> str:
    """One line: the card, the plan of one row, and what fits instead."""
    lora = plan.LoraShape.of(settings)
    one = plan.memory_plan(config, 1, widest, bf16=bf16, lora=lora)
    fixed = one["params"] + one["grads"] + one["optimizer"]
    kind = f"LoRA r={lora.rank}" if lora else "full fine-tuning"
    usable = plan.USABLE_FRACTION * card.free
    options = []
    if lora is None:
        rank = 16
        positions = planned_positions(config, card, bf16, plan.LoraShape(rank))
        if positions >= widest:
            options.append(f"--lora_rank {rank} ({positions // widest} row(s) of {widest} fit)")
    positions = planned_positions(config, card, bf16, lora)
    shorter = [n for n in (1024, 512, 256) if n < widest and positions >= n]
    if shorter:
        options.append(f"--max_seq_len {shorter[0]} (and --pack_len {shorter[0]})")
    cards = [g for g in plan.CARDS_GB if plan.max_batch(config, widest, g * GB, bf16=bf16, lora=lora) >= 1]
    options.append(f"a card of {cards[0]} GB or more" if cards else "a larger card (none up to 80 GB fits it)")
    return (f"d{config.n_layer} {kind} does not fit {card.describe()}: the plan needs {fixed / GB:.1f} GB of "
            f"weights, gradients and optimizer states plus {one['activations'] / GB:.2f} GB to train one row of "
            f"{widest} positions, and {usable / GB:.1f} GB is usable; what fits: {'; or '.join(options)}")


def prove(model, positions: int, widest: int, precision, packed: bool, optimizer_bytes: int, device,
          say=print) -> int:
    """The largest micro-batch, at most `positions`, whose forward and backward fit: one try of
    rows x widest (every position supervised; packed rows hold two conversations each, so the
    packed attention runs), with optimizer_bytes held aside for the states the first update
    makes; halved on out-of-memory with one line. Leaves no gradient and every random generator
    as it found it. OutOfMemory when not even one row fits."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None

    def attempt(rows):
        ballast = torch.empty(optimizer_bytes, dtype=torch.uint8, device=device)
        try:
            inputs = torch.randint(0, model.config.vocab_size, (rows, widest), device=device)
            layout = None
            if packed and widest >= 2:
                half = widest // 2
                layout = PackedLayout.from_row_lengths([[half, widest - half]] * rows, widest).to(device)
            supervised = torch.arange(rows * widest, device=device)
            with precision.autocast():
                loss = model(inputs, inputs.roll(-1, 1), loss_reduction="sum", layout=layout,
                             supervised_index=supervised)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            model.zero_grad(set_to_none=True)
            del ballast
        return rows

    try:
        rows, _ = halving(attempt, max(1, positions // widest), device, what=f"rows of {widest} positions",
                          say=lambda line: say(f"device batch: {line}"))
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    return rows * widest


def optimizer_state_bytes(config, settings: TrainSettings) -> int:
    """What the optimizers will hold after their first update (the plan's figure)."""
    return plan.fixed_bytes(config, plan.LoraShape.of(settings))["optimizer"]


def choose(settings: TrainSettings, runtime, model, dataset, precision, card: Card | None,
           recorded: dict | None = None, say=print) -> DeviceBatch:
    """The run's DeviceBatch (see the module docstring)."""
    max_seq_len = dataset.max_seq_len
    if settings.device_batch_size != AUTO:
        return given(settings, max_seq_len)
    if recorded:
        return DeviceBatch.from_record(recorded)
    widest = widest_row(dataset, settings)
    device = runtime.device
    if card is None:
        if device.type == "mps":
            return DeviceBatch(positions=MPS_ROWS * max_seq_len, rows=MPS_ROWS, widest=max_seq_len, chosen="mps",
                               reason=f"auto on mps: {MPS_ROWS} rows of --max_seq_len (no free memory to ask)")
        positions = max(CPU_POSITIONS, widest)
        return DeviceBatch(positions=positions, rows=positions // widest, widest=widest, chosen="cpu",
                           reason=f"auto on CPU: {CPU_POSITIONS:,} positions per micro-batch, the fastest measured")
    bf16 = precision.dtype is not None
    config = model.config
    planned = planned_positions(config, card, bf16, plan.LoraShape.of(settings))
    if planned < widest:
        raise NoBatchFits(no_fit_message(settings, config, card, bf16, widest))
    try:
        proven = prove(model, planned, widest, precision, settings.packing, optimizer_state_bytes(config, settings),
                       device, say)
    except OutOfMemory:
        raise NoBatchFits(no_fit_message(settings, config, card, bf16, widest) +
                          " (the plan said one row fits; trying it ran out of memory)") from None
    if runtime.distributed:  # every rank must run the same number of micro-batches
        smallest = torch.tensor([proven], device=device)
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
        proven = int(smallest.item())
    rows = proven // widest
    how = "as planned" if proven == planned else f"halved from the plan's {planned // widest}"
    return DeviceBatch(positions=rows * widest, rows=rows, widest=widest, chosen="proven", planned_positions=planned,
                       reason=f"auto on {card.describe()}: {rows} row(s) of {widest} proven by a forward and backward "
                              f"({how})")

"""One optimizer step: the forward/backward over its micro-batches, the update, and the
figures its metrics record reports; plus the validation loss and the guard of Ctrl-C and
SIGTERM (StopSignals).

Loss. Each micro-batch's loss is the SUM over its supervised tokens divided by the number
of supervised tokens in the whole step (all ranks), so a step's gradient is the mean over
its supervised tokens however the work was split into micro-batches and ranks, and a
micro-batch without any supervised token adds exactly zero.

Precision (sciassist.common.precision_for). Forward passes run under the run's autocast (bf16,
fp16 or none); the weights and optimizer states stay fp32. With fp16 the loss is scaled by a
torch.amp.GradScaler before each backward, the gradients are unscaled before clipping, and the
scaler steps each optimizer: a step whose gradients overflowed (inf/nan) is skipped, the scale
halves, and the step's record says so ("skipped_step": true, "loss_scale"); the step still counts
(the schedule moves on), as every GradScaler loop does. A non-finite *loss* is divergence.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanochat.checkpoint import CheckpointError
from sciassist.common import UserError, print_error
from sciassist.data.batching import arrange_step, step_batches, step_examples
from sciassist.memory import first_line, is_out_of_memory, release_memory

SAVING_NOTICE = "saving the resume point, one moment"

# Dense bf16 peak FLOP/s by GPU name, for MFU (no sparsity). Unknown GPUs report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def lr_multiplier(step, num_steps, warmup_steps=0):
    """Linear warmup over warmup_steps, then linear decay to zero at num_steps (nanochat's
    SFT decay is 1 - step/num_steps from the first step)."""
    decay = max(0.0, 1.0 - step / num_steps)
    if warmup_steps and step < warmup_steps:
        return min((step + 1) / warmup_steps, decay)
    return decay


def accumulate_gradients(train_model, batches, num_supervised, autocast=None, world_size=1, no_sync=None,
                         scaler=None):
    """Forward/backward over one step's micro-batches (this rank's). Each loss is the sum
    over its supervised tokens divided by the step's total over all ranks (times
    world_size, since DDP averages gradients over ranks). Returns the summed loss of these
    micro-batches (a detached tensor). no_sync: DDP's no_sync, so gradients are all-reduced
    once, after the last micro-batch. scaler: fp16's GradScaler, which scales each loss before
    its backward (the returned loss is not scaled)."""
    scale = world_size / max(1, num_supervised)
    total = None
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_ctx:
            with autocast if autocast is not None else contextlib.nullcontext():
                loss_sum = train_model(batch["inputs"], batch["targets"], loss_reduction="sum",
                                       layout=batch["layout"], supervised_index=batch["supervised_index"])
            loss = loss_sum * scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum = loss_sum.detach().float()
        total = loss_sum if total is None else total + loss_sum
    return total


def set_learning_rates(optimizers, multiplier):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


@torch.no_grad()
def evaluate_loss(model, batches, autocast=None, distributed=False):
    """Mean loss per supervised token over a fixed set of collated batches (all ranks)."""
    was_training = model.training
    model.eval()
    device = model.get_device()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        with autocast if autocast is not None else contextlib.nullcontext():
            loss_sum = model(batch["inputs"], batch["targets"], loss_reduction="sum", layout=batch["layout"],
                             supervised_index=batch["supervised_index"])
        totals[0] += loss_sum.double()
        totals[1] += batch["num_supervised"]
    if distributed:
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


class Terminated(KeyboardInterrupt):
    """SIGTERM (schedulers, `timeout`, `docker stop`, Colab): it stops a run as Ctrl-C does."""


# a training command's exit codes: completed, stopped by Ctrl-C (SIGINT) or SIGTERM with a resume
# point saved; RunOutOfMemory.EXIT_CODE after out of memory, 2 on a problem the user can fix
EXIT_CODES = {"completed": 0, "interrupted": 130, "terminated": 143}


class RunOutOfMemory(UserError):
    """A run (fine-tuning, RL) stopped by out-of-memory; the message says what was saved and which
    flag to change. Its command exits with EXIT_CODE."""

    EXIT_CODE = 3


class StepOutOfMemory(Exception):
    """The device ran out of memory in one part of a step (where: "step", "update", "validation")."""

    def __init__(self, error: BaseException, where: str):
        super().__init__(first_line(error))
        self.where = where


def guarded(model, work, where: str):
    """work(), with an out-of-memory error turned into StepOutOfMemory: the gradients of a step cut
    short are dropped (a resume point holds none) and the allocator's cache is released."""
    try:
        return work()
    except Exception as e:  # noqa: BLE001 - only out-of-memory is turned; the rest re-raised
        if not is_out_of_memory(e):
            raise
        error = StepOutOfMemory(e, where)
    model.zero_grad(set_to_none=True)
    release_memory(model.get_device())
    raise error


def keep_after_out_of_memory(progress, saved: list, resume_path, save_resume) -> tuple[str, bool]:
    """After out-of-memory: save the resume point of the last whole step (save_resume()) unless the
    update was cut short (progress.updating), which can leave the weights half-updated: then the
    last saved one stands. Returns (what was kept, in words; whether --resume can continue)."""
    if not progress.updating:
        if saved[-1:] != [progress.step]:
            save_resume()
        return f"resume point of step {progress.step} saved in {resume_path}", True
    if resume_path.is_file() and saved:
        return f"the update was cut short; the resume point of step {saved[-1]} in {resume_path} stands", True
    return "the update was cut short, so no resume point could be saved", False


def command_exit(run) -> int:
    """A training command's exit code for run() (its summary, or None when there is nothing to
    run): EXIT_CODES by the summary's status; RunOutOfMemory.EXIT_CODE or 2 with one `error:` line;
    130 / 143 with one line when Ctrl-C / SIGTERM came before the first step or after the last."""
    try:
        summary = run()
    except RunOutOfMemory as e:
        print_error(e)
        return RunOutOfMemory.EXIT_CODE
    except (UserError, CheckpointError) as e:
        return print_error(e)
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{how} while the run was starting or finishing; nothing more was saved", file=sys.stderr)
        return EXIT_CODES["terminated" if isinstance(e, Terminated) else "interrupted"]
    return EXIT_CODES.get(summary["status"], 0) if summary is not None else 0


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_exception(signum):
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


class StopSignals:
    """The handler of SIGINT and SIGTERM while a training run is in progress (main thread).

    The first signal raises KeyboardInterrupt (Ctrl-C) or Terminated (SIGTERM) where the run
    is, unless a defer_interrupt() block holds it until the block ends. From then on the run is
    stopping: further signals are held for good and only answered with a notice, so the resume
    point being saved is never cut short."""

    def __init__(self):
        self.deferring = 0
        self.pending = None  # the first signal held by defer_interrupt()
        self.notice = None  # what a held signal is answered with while deferring (None: nothing)
        self.stopping = False

    def __call__(self, signum, frame):
        if self.stopping:
            _notice(SAVING_NOTICE)
        elif self.deferring:
            if self.notice:
                _notice(self.notice)
            self.pending = self.pending or signum
        else:
            self.stopping = True
            raise _stop_exception(signum)


def _notice(message):
    try:  # from a signal handler: never let a busy stream turn the notice into an error
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except Exception:
        pass


def _in_main_thread():
    return threading.current_thread() is threading.main_thread()


def _active_guard():
    handler = signal.getsignal(signal.SIGTERM) if _in_main_thread() else None  # SIGTERM's is always the guard
    return handler if isinstance(handler, StopSignals) else None


def _sigint_ignored():
    """SIGINT was ignored when this process started (`nohup cmd &`, a background job of a script):
    whoever started it asked for Ctrl-C not to stop it, so it is left ignored."""
    return signal.getsignal(signal.SIGINT) == signal.SIG_IGN


@contextlib.contextmanager
def stop_signals():
    """Handle Ctrl-C and SIGTERM with a StopSignals for the block (in the main thread; elsewhere
    nothing changes); the previous handlers are put back afterwards. SIGTERM always; SIGINT
    unless it is ignored (_sigint_ignored), as shells and tools like nohup expect."""
    if not _in_main_thread():
        yield None
        return
    guard = StopSignals()
    handled = [signum for signum in STOP_SIGNALS if not (signum == signal.SIGINT and _sigint_ignored())]
    previous = {signum: signal.signal(signum, guard) for signum in handled}
    try:
        yield guard
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stopping():
    """The run is stopping (saving its resume point): hold every signal in the block, with a
    notice. The state before is put back afterwards."""
    guard = _active_guard()
    if guard is None:
        yield
        return
    before, guard.stopping = guard.stopping, True
    try:
        yield
    finally:
        guard.stopping = before


@contextlib.contextmanager
def defer_interrupt(notice=None):
    """Hold Ctrl-C (and, in a run, SIGTERM) until the block is done, so an interrupt never leaves
    the weights, the optimizer state and the metrics record half-updated (a resume point must be
    consistent). notice: printed when a signal is held (for blocks that take a while)."""
    if not _in_main_thread():
        yield
        return
    guard = _active_guard()
    if guard is not None:
        guard.deferring += 1
        before, guard.notice = guard.notice, notice or guard.notice
        try:
            yield
        finally:
            guard.deferring -= 1
            guard.notice = before
        if guard.pending is not None and not guard.deferring and not guard.stopping:
            guard.stopping = True  # after a block that completed: an error raised in it is not replaced
            raise _stop_exception(guard.pending)
        return
    if _sigint_ignored():  # no Ctrl-C can arrive: nothing to hold
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:  # after a block that completed: an error raised in it is not replaced
        raise KeyboardInterrupt


@dataclass
class StepWork:
    """What the forward/backward of one step processed (summed over all ranks)."""

    epoch: int
    train_loss: float  # per supervised token
    positions: int  # padding included
    tokens: int
    supervised: int
    micro_batches: int  # this rank's
    row_len: int


def arrange_for(settings, runtime, dataset, examples, batch):
    """This rank's share of the micro-batches of `examples`, as the settings and the run's device
    batch (sciassist.train.batch.DeviceBatch) arrange them."""
    return arrange_step(dataset, examples, batch.rows, runtime.world_size, runtime.rank, packed=settings.packing,
                        pack_len=settings.pack_len, micro_positions=batch.positions)


def forward_backward(run, step) -> StepWork:
    """Batch step `step`'s conversations (a function of the seed and the step) and
    accumulate their gradients; the gradients are ready for apply_update."""
    s, data, learner = run.settings, run.data, run.learner
    epoch, examples = step_examples(len(data.train_set), step, s.target_examples_per_step, s.seed)
    arranged = arrange_for(s, run.runtime, data.train_set, examples, run.batch)
    batches = step_batches(data.train_set, arranged, data.pad_id, run.device)
    loss_sum = accumulate_gradients(learner.train_model, batches, arranged.num_supervised, learner.precision.autocast(),
                                    run.runtime.world_size, learner.no_sync, learner.scaler)
    counts = torch.tensor([sum(b["num_positions"] for b in batches), sum(b["num_tokens"] for b in batches)],
                          dtype=torch.float64, device=run.device)
    loss_and_counts = torch.cat([loss_sum.double().view(1), counts])
    if run.runtime.distributed:
        dist.all_reduce(loss_and_counts)
    loss, positions, tokens = loss_and_counts.tolist()
    return StepWork(epoch=epoch, train_loss=loss / max(1, arranged.num_supervised), positions=int(positions),
                    tokens=int(tokens), supervised=arranged.num_supervised, micro_batches=len(batches),
                    row_len=arranged.row_len)


@dataclass
class Update:
    """What an optimizer update did: the gradient norm (when clipping and the step was taken),
    and with a GradScaler whether it skipped the step (overflowed gradients) and the scale after."""

    grad_norm: float | None = None
    skipped: bool = False
    loss_scale: float | None = None  # None: no GradScaler


def apply_update(model, optimizers, multiplier, grad_clip=0.0, scaler=None) -> Update:
    """The optimizer update with the scheduled learning rates, clipping the gradient norm to
    grad_clip when > 0.

    scaler (fp16): every optimizer's gradients are unscaled first (scaler.unscale_, which also
    records each one's inf check for scaler.update). If any gradient is inf/nan the whole step is
    skipped: scaler.step alone would skip only the optimizers holding an overflowed gradient and
    still step the others (Muon's matrices without the embeddings, say), a half-update. The
    check is the gradient norm (inf/nan exactly when a gradient is), which clipping computes
    anyway. Otherwise scaler.step(opt) steps each (works for torch.optim.Muon and AdamW, also on
    CPU), and scaler.update() once adjusts the scale: halved after an overflow, doubled after
    2,000 clean steps."""
    set_learning_rates(optimizers, multiplier)
    grad_norm = None
    if scaler is not None:
        for opt in optimizers:
            scaler.unscale_(opt)
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip).item()
    if scaler is None:
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        return Update(grad_norm=grad_norm)
    if grad_norm is None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        finite = math.isfinite(torch.nn.utils.get_total_norm(grads).item()) if grads else True
    else:
        finite = math.isfinite(grad_norm)
    if finite:
        for opt in optimizers:
            scaler.step(opt)
    scaler.update()
    model.zero_grad(set_to_none=True)
    return Update(grad_norm=grad_norm if finite else None, skipped=not finite, loss_scale=scaler.get_scale())


def step_record(run, step, work: StepWork, multiplier, grad_norm, seconds, elapsed_s, update: Update | None = None
                ) -> dict:
    """The metrics.jsonl line of optimizer step `step` (validation adds val_loss to it); with a
    GradScaler (fp16) also skipped_step and loss_scale."""
    device, world = run.device, run.runtime.world_size
    record = {
        "step": step, "epoch": work.epoch, "train_loss": work.train_loss, "lr_multiplier": multiplier,
        "positions_per_s": work.positions / seconds,  # processed positions, padding included
        "real_tokens_per_s": work.tokens / seconds,
        "supervised_tokens_per_s": work.supervised / seconds,
        "token_efficiency": work.tokens / work.positions if work.positions else 0.0,
        "micro_batches": work.micro_batches, "row_len": work.row_len,
        "micro_batch_positions": run.batch.positions if run.batch is not None else None,
        "mfu": run.flops_per_token * work.positions / seconds / (run.peak * world) if run.peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "step_time_s": seconds, "elapsed_s": round(elapsed_s, 3),
        "attention_kernel": run.learner.attention_kernel,
    }
    if grad_norm is not None:
        record["grad_norm"] = grad_norm
    if update is not None and update.loss_scale is not None:
        record["skipped_step"] = update.skipped
        record["loss_scale"] = update.loss_scale
    return record

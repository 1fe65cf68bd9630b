"""
Supervised fine-tuning of a nanochat checkpoint on chat conversations.

    python sciassist_train.py                                  # ScienceQA, the seed's settings
    python sciassist_train.py --data_path my.jsonl --source sft --model_tag d32
    torchrun --nproc_per_node=8 sciassist_train.py ...         # data-parallel on 8 GPUs

How steps are counted. One optimizer step uses `target_examples_per_step` conversations
(64) in total over all ranks. With packing (the default) they are packed into rows (see
sciassist.data.batching: about pack_len positions per row, several conversations per row, each
attending only to itself), and each rank runs its share of the rows as micro-batches of up
to device_batch_size x max_seq_len positions, accumulating gradients. So the number of
micro-batches per step follows the lengths of those 64 conversations (one on ScienceQA at
the default device batch); the number of conversations per step does not change. Without
packing (--packing false) a micro-batch is device_batch_size conversations padded to the
longest, as nanochat did: 64 / (device_batch_size x ranks) micro-batches per step.
An epoch is len(train) // 64 steps, nanochat's count (12,000 examples: 187 steps per epoch,
748 in 4 epochs; the few left over are a different few each epoch, as the order is
reshuffled); --num_iterations overrides the total. Warmup, the linear decay to zero,
--eval_every and --save_every all count optimizer steps.

Loss. Each micro-batch's loss is the SUM over its supervised tokens divided by the number
of supervised tokens in the whole step (all ranks), so a step's gradient is the mean over
its supervised tokens however the work was split into micro-batches and ranks, and a
micro-batch without any supervised token adds exactly zero.

Outputs, in <output_dir>/<output_tag>/ (rank 0 writes):
  model_<step>.pt, meta_<step>.json  the best checkpoint by validation loss (nanochat's
                                     layout, loadable by nanochat.checkpoint.load_model)
  tokenizer/                         a copy of the tokenizer, so the folder is self-contained
  metrics.jsonl                      one line per step (+ step 0): losses, lr, throughput
  loss_curve.png                     redrawn at every evaluation
  run_summary.json                   written at the end
  resume/state.pt                    everything --resume needs (every --save_every steps,
                                     at the end, and on Ctrl-C)
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanochat.checkpoint import default_base_dir
from sciassist.data.batching import (
    plan_step,
    step_batches,
    step_examples,
    steps_per_epoch,
    tokenize_conversations,
)

# Dense bf16 peak FLOP/s by GPU name, for MFU (no sparsity). Unknown GPUs report no MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
SOURCES = ("base", "mid", "sft", "rl")
RESUME_DIR = "resume"
RESUME_FILE = "state.pt"
# Settings that shape the run's trajectory: a resume point made with other values would
# silently turn into a different run, so resuming refuses it.
TRAJECTORY_FIELDS = (
    "data_path", "data_dir", "val_path", "val_split", "max_seq_len", "source", "model_tag", "model_step",
    "checkpoint_dir", "num_epochs", "num_iterations", "target_examples_per_step", "matrix_lr", "embedding_lr",
    "unembedding_lr", "weight_decay", "init_lr_frac", "warmup_steps", "grad_clip", "packing", "pack_len",
    "eval_every", "eval_steps", "seed",
)


class TrainError(Exception):
    """A problem the user can fix (bad flag, missing file, diverged run); the message says how."""


def _setting(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainSettings:
    """Every knob of a fine-tuning run; the one source of defaults for the CLI (each field
    is a --flag of the same name), the notebook and the tests. The defaults reproduce the
    ScienceQA fine-tune: 4 epochs, 64 examples per step, lrs 2e-3 / 1e-1 / 1e-2 scaled by
    init_lr_frac 0.02 and decayed linearly to zero, validation every 25 steps."""

    # data
    data_path: str = _setting("scienceqa", "conversations to train on: a JSONL file ({\"messages\": [...]} or a "
                                           "bare message array per line), or 'scienceqa' for "
                                           "<data_dir>/scienceqa_train.jsonl and scienceqa_val.jsonl (made by "
                                           "`python -m sciassist.data.scienceqa`)")
    data_dir: str = _setting("data", "folder of the prepared scienceqa_{train,val}.jsonl files")
    val_path: typing.Optional[str] = _setting(None, "validation JSONL (default: scienceqa_val.jsonl for 'scienceqa', "
                                                    "else the last --val_split of --data_path)")
    val_split: float = _setting(0.1, "fraction of --data_path held out for validation when there is no --val_path "
                                     "(the last lines of the file; 0 = no validation)")
    skip_bad_lines: bool = _setting(False, "skip malformed JSONL lines (each reported with file:line) instead of "
                                           "stopping at the first")
    max_seq_len: int = _setting(2048, "longest conversation in positions; longer ones are truncated (and counted)")
    # model
    source: str = _setting("sft", "checkpoint kind to start from: base | mid | sft | rl")
    model_tag: typing.Optional[str] = _setting(None, "model folder, e.g. d20 (default: the largest d<N> present)")
    model_step: typing.Optional[int] = _setting(None, "checkpoint step (default: the latest)")
    base_dir: typing.Optional[str] = _setting(None, "nanochat base dir "
                                                    "(default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    checkpoint_dir: typing.Optional[str] = _setting(None, "load model_<step>.pt from exactly this folder instead "
                                                          "(the tokenizer is looked for beside it)")
    # optimisation
    num_epochs: int = _setting(4, "passes over the training set")
    num_iterations: int = _setting(-1, "total optimizer steps; -1 = num_epochs x (train examples // "
                                       "target_examples_per_step)")
    device_batch_size: int = _setting(8, "micro-batch size per GPU, in rows of max_seq_len positions (packed rows "
                                         "are often shorter, then more of them fit); conversations when not packed")
    target_examples_per_step: int = _setting(64, "conversations per optimizer step over all GPUs (effective batch)")
    matrix_lr: float = _setting(0.01, "Muon learning rate for the transformer matrices")
    embedding_lr: float = _setting(0.1, "AdamW learning rate for the token embedding (x (n_embd/768)^-0.5)")
    unembedding_lr: float = _setting(0.002, "AdamW learning rate for lm_head (x (n_embd/768)^-0.5)")
    weight_decay: float = _setting(0.0, "Muon weight decay")
    init_lr_frac: float = _setting(0.02, "every learning rate is multiplied by this (nanochat's SFT convention)")
    warmup_steps: int = _setting(0, "linear warmup steps before the linear decay to zero")
    grad_clip: float = _setting(0.0, "clip the gradient norm to this (0 = off)")
    packing: bool = _setting(True, "pack several conversations per row (false: pad each micro-batch to its "
                                   "longest conversation, as nanochat did)")
    pack_len: int = _setting(1024, "row width packing aims for (rows widen for longer conversations, up to "
                                   "max_seq_len): attention is dense over a row, so shorter rows cost less")
    # evaluation
    eval_every: int = _setting(25, "validation loss every N steps (and at step 0 and the end; 0 = only those)")
    eval_steps: int = _setting(100, "validation uses the first eval_steps x device_batch_size validation "
                                    "conversations, the same ones at every evaluation")
    eval_after: bool = _setting(False, "run sciassist.eval.run on the best checkpoint when training ends")
    # output
    output_dir: str = _setting("finetuned_model_checkpoint", "where runs are written")
    output_tag: str = _setting("finetuned", "run name: files go to <output_dir>/<output_tag>/")
    save_every: int = _setting(250, "write a resume point every N steps (0 = only at the end / on Ctrl-C)")
    resume: bool = _setting(False, "continue the run in <output_dir>/<output_tag>/resume/ (same flags)")
    # runtime
    device: str = _setting("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda if available)")
    dtype: str = _setting("auto", "auto | bfloat16 | float32 (auto: bfloat16 autocast on CUDA, float32 elsewhere)")
    compile: bool = _setting(False, "torch.compile the model for training")
    seed: int = _setting(42, "seed of the data order (reshuffled every epoch) and torch")

    def run_dir(self):
        return Path(self.output_dir).expanduser() / self.output_tag


# -----------------------------------------------------------------------------
# Command line: argparse built from the dataclass, so a new setting is a new flag

def _parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind):
    def parse(text):
        return None if str(text).strip().lower() in ("none", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        prog="sciassist_train.py",
        description="Fine-tune a nanochat checkpoint on chat conversations (ScienceQA by default).")
    hints = typing.get_type_hints(TrainSettings)
    for f in dataclasses.fields(TrainSettings):
        kind = hints[f.name]
        help_text = f.metadata["help"]
        if "(default" not in help_text:
            help_text += f" (default: {f.default})"
        kwargs = {"default": f.default, "help": help_text.replace("%", "%%")}
        if kind is bool:
            # `--compile` alone means true; `--packing false` turns a default-on switch off
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(kind) is typing.Union:  # Optional[X]
            inner = next(a for a in typing.get_args(kind) if a is not type(None))
            kwargs.update(type=_optional(inner), metavar=inner.__name__.upper())
        else:
            kwargs.update(type=kind, metavar=kind.__name__.upper())
        parser.add_argument(f"--{f.name}", **kwargs)
    return parser


def settings_from_args(argv=None):
    return TrainSettings(**vars(build_parser().parse_args(argv)))


def check_settings(s):
    """Raise TrainError naming the flag for any value that cannot work."""
    problems = []

    def need(ok, flag, what):
        if not ok:
            problems.append(f"--{flag} {what}, got {getattr(s, flag)!r}")

    for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "init_lr_frac"):
        value = getattr(s, name)
        need(isinstance(value, (int, float)) and math.isfinite(value) and value > 0, name, "must be a positive number")
    need(s.init_lr_frac <= 1 if isinstance(s.init_lr_frac, (int, float)) else True, "init_lr_frac", "must be <= 1")
    need(math.isfinite(s.weight_decay) and s.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(math.isfinite(s.grad_clip) and s.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)")
    need(0 <= s.val_split < 1, "val_split", "must be a fraction in [0, 1)")
    need(s.num_epochs >= 1 or s.num_iterations > 0, "num_epochs", "must be >= 1")
    need(s.num_iterations == -1 or s.num_iterations > 0, "num_iterations", "must be -1 (from epochs) or > 0")
    for name in ("device_batch_size", "target_examples_per_step", "eval_steps"):
        need(getattr(s, name) >= 1, name, "must be >= 1")
    for name in ("eval_every", "save_every", "warmup_steps"):
        need(getattr(s, name) >= 0, name, "must be >= 0")
    need(s.max_seq_len >= 16, "max_seq_len", "must be >= 16")
    need(s.pack_len >= 1, "pack_len", "must be >= 1")
    need(s.source in SOURCES, "source", f"must be one of {', '.join(SOURCES)}")
    need(s.model_step is None or s.model_step >= 0, "model_step", "must be >= 0")
    need(s.dtype in ("auto", "bfloat16", "float32"), "dtype", "must be auto, bfloat16 or float32")
    need(bool(s.output_tag) and "/" not in s.output_tag and s.output_tag not in (".", ".."),
         "output_tag", "must be a plain folder name")
    try:
        device = torch.device("cpu" if s.device == "auto" else s.device)
    except (RuntimeError, ValueError):
        problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps, got {s.device!r}")
    else:
        if device.type == "cuda" and not torch.cuda.is_available():
            problems.append(f"--device {s.device}: CUDA is not available here (torch {torch.__version__}); "
                            f"use --device cpu")
        if device.type == "mps" and not torch.backends.mps.is_available():
            problems.append(f"--device {s.device}: MPS is not available here; use --device cpu")
        if device.type not in ("cpu", "cuda", "mps"):
            problems.append(f"--device must be auto, cpu, cuda, cuda:N or mps, got {s.device!r}")
    if problems:
        raise TrainError("invalid settings: " + "; ".join(problems))


# -----------------------------------------------------------------------------
# Setup: processes, device, model, data

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    started_process_group: bool = False

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def setup_runtime(settings):
    """Device and, under torchrun (WORLD_SIZE > 1), the process group: NCCL on CUDA, gloo
    on CPU. Each rank gets its own GPU (LOCAL_RANK)."""
    import torch.distributed as dist
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wanted = settings.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(wanted)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    started = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    if world_size > 1:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return Runtime(device=device, rank=rank, world_size=world_size, started_process_group=started)



def load_source_model(settings, device):
    """(model, tokenizer, source description) of the checkpoint to fine-tune."""
    from nanochat.checkpoint import CheckpointError, find_checkpoint, find_last_step, load_model
    try:
        if settings.checkpoint_dir:
            checkpoint_dir = Path(settings.checkpoint_dir).expanduser()
            step = settings.model_step if settings.model_step is not None else find_last_step(checkpoint_dir)
        else:
            base_dir = Path(settings.base_dir).expanduser() if settings.base_dir else default_base_dir()
            checkpoint_dir, step = find_checkpoint(base_dir, settings.source, settings.model_tag, settings.model_step)
        model, tokenizer, _ = load_model(checkpoint_dir, step=step, device=device)
    except CheckpointError as e:
        where = (f"--checkpoint_dir {settings.checkpoint_dir}" if settings.checkpoint_dir else
                 f"--base_dir {settings.base_dir or default_base_dir()} (--source {settings.source}"
                 f"{', --model_tag ' + settings.model_tag if settings.model_tag else ''})")
        raise TrainError(f"no model to fine-tune (looked in {where}): {e}. Download one with "
                         f"`python -m sciassist.hub --model d20`, or point --base_dir / --checkpoint_dir at one") from e
    source = {"checkpoint_dir": str(checkpoint_dir), "step": step,
              "model_file": str(Path(checkpoint_dir) / f"model_{step:06d}.pt")}
    return model, tokenizer, source


def load_conversation_sets(settings):
    """(train records, val records, description) as the settings ask."""
    from sciassist.data.conversations import ConversationError, read_conversations, split_validation

    def read(path, flag):
        path = Path(path).expanduser()
        if not path.is_file():
            if settings.data_path == "scienceqa":
                raise TrainError(f"{path} not found ({flag}). Prepare ScienceQA with `python -m sciassist.data.scienceqa "
                                 f"--out {settings.data_dir}` (or --data_dir DIR where the files are, or "
                                 f"--data_path FILE.jsonl for your own conversations)")
            raise TrainError(f"{flag}: {path} not found (expected a JSONL file, one conversation per line)")
        try:
            records = read_conversations(path, skip_bad=settings.skip_bad_lines)
        except ConversationError as e:
            raise TrainError(f"{e} (--skip_bad_lines true skips such lines and reports them)") from e
        for bad in records.skipped:
            print(f"skipped {path}:{bad.line}: {bad.problem}", file=sys.stderr)
        return records

    if settings.data_path == "scienceqa":
        data_dir = Path(settings.data_dir).expanduser()
        train = read(data_dir / "scienceqa_train.jsonl", "--data_path scienceqa")
        val = read(settings.val_path or data_dir / "scienceqa_val.jsonl",
                   "--val_path" if settings.val_path else "--data_path scienceqa")
        return train, val, f"ScienceQA from {data_dir}"
    train = read(settings.data_path, "--data_path")
    if settings.val_path:
        return train, read(settings.val_path, "--val_path"), f"{settings.data_path} + {settings.val_path}"
    if settings.val_split == 0:
        return train, [], f"{settings.data_path} (no validation)"
    try:
        train, val = split_validation(train, settings.val_split)
    except ValueError as e:
        raise TrainError(f"--val_split {settings.val_split}: {e}") from e
    return train, val, f"{settings.data_path} (last {settings.val_split:.0%} held out for validation)"


def data_fingerprint(*datasets):
    """A hash of the token ids and masks: a resume point only continues the same data."""
    h = hashlib.sha1()
    for ds in datasets:
        for ids, mask in zip(ds.ids, ds.masks, strict=True):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(mask, dtype=np.int8).tobytes())
        h.update(b"|")
    return h.hexdigest()


# -----------------------------------------------------------------------------
# The step: accumulation over micro-batches, then the optimizers

def lr_multiplier(step, num_steps, warmup_steps=0):
    """Linear warmup over warmup_steps, then linear decay to zero at num_steps (nanochat's
    SFT decay is 1 - step/num_steps from the first step)."""
    decay = max(0.0, 1.0 - step / num_steps)
    if warmup_steps and step < warmup_steps:
        return min((step + 1) / warmup_steps, decay)
    return decay


def autocast_for(device, dtype_setting):
    dtype = dtype_setting
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate_gradients(train_model, batches, num_supervised, autocast=None, world_size=1, no_sync=None):
    """Forward/backward over one step's micro-batches (this rank's). Each loss is the sum
    over its supervised tokens divided by the step's total over all ranks (times
    world_size, since DDP averages gradients over ranks). Returns the summed loss of these
    micro-batches (a detached tensor). no_sync: DDP's no_sync, so gradients are all-reduced
    once, after the last micro-batch."""
    scale = world_size / max(1, num_supervised)
    total = None
    for k, batch in enumerate(batches):
        last = k == len(batches) - 1
        sync_ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with sync_ctx:
            with autocast if autocast is not None else contextlib.nullcontext():
                loss_sum = train_model(batch["inputs"], batch["targets"], loss_reduction="sum",
                                       doc_ids=batch["doc_ids"])
            (loss_sum * scale).backward()
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
            loss_sum = model(batch["inputs"], batch["targets"], loss_reduction="sum", doc_ids=batch["doc_ids"])
        totals[0] += loss_sum.double()
        totals[1] += batch["num_supervised"]
    if distributed:
        import torch.distributed as dist
        dist.all_reduce(totals)
    model.train(was_training)
    return (totals[0] / totals[1]).item() if totals[1] > 0 else float("nan")


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


@contextlib.contextmanager
def defer_interrupt():
    """Hold Ctrl-C until the block is done, so an interrupt never leaves the weights and the
    optimizer state half-updated (a resume point must be a consistent state)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


# -----------------------------------------------------------------------------
# Files

def _atomic_torch_save(obj, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(path, data):
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class BestCheckpointWriter:
    """Writes the best checkpoint in a background thread, then removes the previous best.

    A d20 checkpoint is 2.2 GB and validation improves at most evaluations (30 of them in
    the ScienceQA run), which would otherwise stall the GPU for minutes in total. The weights
    are copied to CPU memory first (training goes on changing the live ones); one write is
    in flight at a time, and wait() re-raises a failed write."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.thread = None
        self.error = None

    def save(self, step, model, meta, previous_step):
        from nanochat.checkpoint import save_checkpoint
        self.wait()
        state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        def write():
            try:
                save_checkpoint(self.run_dir, step, state_dict, meta)
                if previous_step is not None and previous_step != step:
                    _remove_checkpoint(self.run_dir, previous_step)
            except BaseException as e:  # reported by wait(), in the training thread
                self.error = e

        self.thread = threading.Thread(target=write, name="best-checkpoint-writer")
        self.thread.start()

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise TrainError(f"writing the best checkpoint to {self.run_dir} failed: {error}") from error


def _remove_checkpoint(run_dir, step):
    for name in (f"model_{step:06d}.pt", f"meta_{step:06d}.json", f"optim_{step:06d}.pt"):
        (run_dir / name).unlink(missing_ok=True)


def _clear_previous_run(run_dir):
    """A fresh run in a folder that holds an older run's files starts clean, so exactly one
    best checkpoint (this run's) is left in it. The old resume point is kept until this run
    writes its own: starting without --resume by mistake must not destroy it."""
    removed = []
    for pattern in ("model_*.pt", "meta_*.json", "optim_*.pt", "metrics.jsonl", "loss_curve.png", "run_summary.json"):
        for path in run_dir.glob(pattern):
            path.unlink()
            removed.append(path.name)
    return removed


def _plot(run_dir, log):
    try:
        from sciassist.plots import plot_loss_curve
    except ImportError:
        return
    try:
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    except Exception as e:  # a plot must never stop training
        log(f"note: loss_curve.png not updated ({type(e).__name__}: {e})")


def _run_evaluation_after(run_dir, settings, log):
    """The optional --eval_after stage: sciassist.eval.run.evaluate_after_training(run_dir, ...)."""
    try:
        import sciassist.eval.run as evaluate
    except ImportError as e:
        log(f"note: --eval_after skipped: sciassist.eval.run cannot be imported ({e})")
        return None
    run = getattr(evaluate, "evaluate_after_training", None)
    if run is None:
        log("note: --eval_after skipped: sciassist.eval.run has no evaluate_after_training()")
        return None
    if settings.data_path == "scienceqa":
        where = {"data_path": settings.val_path, "data_dir": settings.data_dir}
    elif settings.val_path:  # held-out multiple-choice questions (with "meta": choices, answer)
        where = {"data_path": settings.val_path}
    else:
        log("note: --eval_after skipped: with your own --data_path it needs --val_path (held-out questions in "
            "the ScienceQA JSONL shape); run sciassist_evaluate.py yourself")
        return None
    log(f"evaluating {run_dir} (--eval_after)")
    try:
        return run(run_dir, split="val", device=settings.device, **where)
    except Exception as e:  # the fine-tuned model is saved; a failed evaluation must not hide that
        log(f"note: --eval_after failed ({type(e).__name__}: {e}); run sciassist_evaluate.py on {run_dir} instead")
        return {"error": f"{type(e).__name__}: {e}"}


# -----------------------------------------------------------------------------
# The loop

def train(settings, on_step=None):
    """Fine-tune as `settings` say; returns the run summary (also in run_summary.json).

    on_step(record): called after every optimizer step with that step's metrics record
    (a notebook can plot live; tests stop runs with it). A KeyboardInterrupt, from Ctrl-C
    or from on_step, saves a resume point and returns a summary with status "interrupted".
    """
    check_settings(settings)
    runtime = setup_runtime(settings)
    finished = False
    try:
        summary = _train(settings, runtime, on_step)
        finished = True
        return summary
    finally:
        if runtime.started_process_group:
            import torch.distributed as dist
            if finished:
                # Leave together: a rank that tears its process group down while another
                # still talks to it (rank 0 writing files) can abort at exit.
                dist.barrier()
            dist.destroy_process_group()


def _train(settings, runtime, on_step):
    from tqdm import tqdm

    device, is_main = runtime.device, runtime.is_main
    bar = None

    def log(message):
        if is_main:
            (bar.write if bar is not None else print)(message)

    torch.manual_seed(settings.seed)
    run_dir = settings.run_dir()
    resume_path = run_dir / RESUME_DIR / RESUME_FILE
    if settings.resume and not resume_path.is_file():
        raise TrainError(f"--resume: no resume point at {resume_path}; run without --resume to start fresh "
                         f"(or check --output_dir / --output_tag)")

    model, tokenizer, source = load_source_model(settings, device)
    model = model.float()  # fp32 master weights (the published wte is bf16); autocast does bf16 math on CUDA
    model.train()
    max_seq_len = settings.max_seq_len
    if max_seq_len > model.config.sequence_len:
        log(f"note: --max_seq_len {max_seq_len} is longer than the model's sequence_len "
            f"{model.config.sequence_len}; using {model.config.sequence_len}")
        max_seq_len = model.config.sequence_len

    train_records, val_records, data_description = load_conversation_sets(settings)
    from sciassist.data.scienceqa import detect_answer_format
    # kept in every checkpoint's meta: how to read this model's multiple-choice answers (chat, web page)
    source = dict(source, answer_format=detect_answer_format(train_records))
    train_set = tokenize_conversations(tokenizer, train_records, max_seq_len)
    val_set = tokenize_conversations(tokenizer, val_records, max_seq_len)
    if len(train_set) == 0:
        raise TrainError(f"{data_description}: no training conversation has an assistant token within "
                         f"max_seq_len={max_seq_len}")
    per_epoch = steps_per_epoch(len(train_set), settings.target_examples_per_step)
    num_steps = settings.num_iterations if settings.num_iterations > 0 else per_epoch * settings.num_epochs
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    world, rank = runtime.world_size, runtime.rank

    def plan(dataset, examples):
        return plan_step(dataset, examples, settings.device_batch_size, world, rank,
                         packed=settings.packing, pack_len=settings.pack_len)

    # The validation set is fixed: the same conversations (file order) at every evaluation.
    val_examples = list(range(min(len(val_set), settings.eval_steps * settings.device_batch_size)))
    val_batches = step_batches(val_set, plan(val_set, val_examples), pad_id, device) if val_examples else []

    optimizers = model.setup_optimizers(unembedding_lr=settings.unembedding_lr, embedding_lr=settings.embedding_lr,
                                        matrix_lr=settings.matrix_lr, weight_decay=settings.weight_decay)
    for opt in optimizers:  # nanochat's SFT: every lr starts at lr * init_lr_frac, the peak of the schedule
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * settings.init_lr_frac

    train_model, no_sync = model, None
    if runtime.distributed:
        import inspect

        from torch.nn.parallel import DistributedDataParallel
        # No buffer sync in forward: the only buffers are the rotary tables, the same on every
        # rank (torch >= 2.13 names this forward_sync_buffers, older ones broadcast_buffers).
        sync_flag = ("forward_sync_buffers" if "forward_sync_buffers" in
                     inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      **{sync_flag: False})
        train_model, no_sync = ddp, ddp.no_sync
    if settings.compile:
        train_model = torch.compile(train_model)
    autocast = autocast_for(device, settings.dtype)
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)  # MFU is against the dense bf16 peak, the number GPUs are sold by

    # --- state: fresh or resumed
    fingerprint = data_fingerprint(train_set, val_set)
    step, metrics, pending, last_eval_step = 0, [], None, None
    best = {"step": None, "val_loss": None}
    elapsed_before = 0.0
    totals = {"positions": 0, "tokens": 0, "supervised": 0}
    if settings.resume:
        state = torch.load(resume_path, map_location=device, weights_only=True)
        _check_resume_compatible(state, settings, fingerprint, resume_path)
        model.load_state_dict(state["model"])
        for opt, opt_state in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(opt_state)
        _set_rng_state(state["rng"])
        step, metrics, pending = state["step"], list(state["metrics"]), state["pending"]
        last_eval_step, best, elapsed_before = state["last_eval_step"], dict(state["best"]), state["elapsed_s"]
        totals = dict(state["totals"])
        if best["step"] is not None and not (run_dir / f"model_{best['step']:06d}.pt").is_file():
            # removed meanwhile (e.g. by a fresh run started in the same folder): the next
            # evaluation writes a new best
            log(f"note: the best checkpoint of step {best['step']} is gone from {run_dir}; the next evaluation "
                f"saves a new one")
            best = {"step": None, "val_loss": None}
        log(f"resuming {run_dir} at step {step}/{num_steps}")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not settings.resume:
            removed = _clear_previous_run(run_dir)
            if removed:
                log(f"note: {run_dir} held an earlier run; removed its {', '.join(sorted(set(removed)))}")
            if resume_path.is_file():
                log(f"note: {resume_path} (an earlier run's resume point) is kept until this run saves its own; "
                    f"to continue that run instead, stop now and add --resume")
        tokenizer.save(run_dir / "tokenizer")
        with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:  # a resumed run rewrites what it kept
            f.writelines(json.dumps(r) + "\n" for r in metrics)

    def resume_state():
        return {"model": model.state_dict(), "optimizers": [opt.state_dict() for opt in optimizers],
                "rng": _rng_state(), "step": step, "metrics": metrics, "pending": pending,
                # the data position: step s is batch s % per_epoch of epoch s // per_epoch, whose
                # order is a function of (seed, epoch); kept for readers, resuming needs only step
                "epoch": step // per_epoch, "step_in_epoch": step % per_epoch,
                "last_eval_step": last_eval_step, "best": best, "elapsed_s": elapsed(),
                "totals": totals, "settings": dataclasses.asdict(settings), "data_fingerprint": fingerprint,
                "num_steps": num_steps}

    def save_resume():
        if is_main:
            _atomic_torch_save(resume_state(), resume_path)

    def finalize(record):
        metrics.append(record)
        if is_main:
            with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def is_eval_step(s):
        periodic = settings.eval_every and s % settings.eval_every == 0
        return bool(val_batches) and (s == 0 or s == num_steps or bool(periodic))

    start_time = time.time()

    def elapsed():
        return elapsed_before + time.time() - start_time

    if is_main:
        c = model.config
        log(f"model: {source['model_file']} (d{c.n_layer}, {model.num_params():,} params)")
        log(f"data: {data_description}")
        log(f"  train: {train_set.describe()}")
        log(f"  val:   {val_set.describe()}; evaluating on {len(val_examples)} of them")
        log(f"schedule: {num_steps} steps ({per_epoch} per epoch, {settings.target_examples_per_step} conversations "
            f"each), {world} process(es) on {device}, {'packed rows' if settings.packing else 'padded batches'}")

    status, error = "completed", None
    start_step = step
    writer = BestCheckpointWriter(run_dir)
    bar = tqdm(total=num_steps, initial=step, disable=not is_main, dynamic_ncols=True, mininterval=1.0,
               desc="fine-tuning", file=sys.stderr)
    try:
        while True:
            # evaluate (and keep the best checkpoint), then the record of this step is final
            if is_eval_step(step) and last_eval_step != step:
                val_loss = evaluate_loss(model, val_batches, autocast, runtime.distributed)
                last_eval_step = step
                if pending is None:
                    pending = {"step": step, "elapsed_s": round(elapsed(), 3)}
                pending["val_loss"] = val_loss
                if not math.isfinite(val_loss):
                    raise _Diverged(f"validation loss is {val_loss} at step {step}")
                if best["val_loss"] is None or val_loss < best["val_loss"]:
                    previous = best["step"]
                    best = {"step": step, "val_loss": val_loss}
                    if is_main:
                        writer.save(step, model, _checkpoint_meta(model, settings, source, step, val_loss, best,
                                                                  max_seq_len), previous)
                pending["best_val_loss"] = best["val_loss"]
                log(f"step {step}/{num_steps}: val loss {val_loss:.4f} "
                    f"(best {best['val_loss']:.4f} at step {best['step']})")
            if pending is not None:
                record, pending = pending, None
                finalize(record)
                if is_main and "val_loss" in record:
                    _plot(run_dir, log)
                if on_step is not None and "train_loss" in record:
                    on_step(record)
            if settings.save_every and step % settings.save_every == 0 and step != start_step and step < num_steps:
                save_resume()
            if step >= num_steps:
                break

            # one optimizer step
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.time()  # from here: batching, forward/backward, update (what a step costs)
            epoch, examples = step_examples(len(train_set), step, settings.target_examples_per_step, settings.seed)
            step_plan = plan(train_set, examples)
            batches = step_batches(train_set, step_plan, pad_id, device)
            loss_sum = accumulate_gradients(train_model, batches, step_plan.num_supervised, autocast, world, no_sync)
            counts = torch.tensor([sum(b["num_positions"] for b in batches), sum(b["num_tokens"] for b in batches)],
                                  dtype=torch.float64, device=device)
            loss_and_counts = torch.cat([loss_sum.double().view(1), counts])
            if runtime.distributed:
                import torch.distributed as dist
                dist.all_reduce(loss_and_counts)
            train_loss = loss_and_counts[0].item() / max(1, step_plan.num_supervised)
            if not math.isfinite(train_loss):
                raise _Diverged(f"training loss is {train_loss} at step {step + 1}")
            multiplier = lr_multiplier(step, num_steps, settings.warmup_steps)
            with defer_interrupt():
                set_learning_rates(optimizers, multiplier)
                grad_norm = None
                if settings.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip).item()
                for opt in optimizers:
                    opt.step()
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = max(time.time() - t0, 1e-9)
                positions, tokens = loss_and_counts[1].item(), loss_and_counts[2].item()
                totals["positions"] += int(positions)
                totals["tokens"] += int(tokens)
                totals["supervised"] += step_plan.num_supervised
                step += 1
                pending = {
                    "step": step, "epoch": epoch, "train_loss": train_loss, "lr_multiplier": multiplier,
                    "tokens_per_s": positions / dt,  # processed positions, padding included
                    "real_tokens_per_s": tokens / dt,
                    "supervised_tokens_per_s": step_plan.num_supervised / dt,
                    "token_efficiency": tokens / positions if positions else 0.0,
                    "micro_batches": len(batches), "row_len": step_plan.row_len,
                    "mfu": flops_per_token * positions / dt / (peak * world) if peak else None,
                    "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30
                                       if device.type == "cuda" else None),
                    "step_time_s": dt, "elapsed_s": round(elapsed(), 3),
                }
                if grad_norm is not None:
                    pending["grad_norm"] = grad_norm
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{multiplier:.3f}", tok_s=f"{positions / dt:,.0f}",
                            refresh=False)
    except KeyboardInterrupt:
        status = "interrupted"
        save_resume()
        log(f"\ninterrupted at step {step}/{num_steps}; resume point saved in {resume_path}.\n"
            f"Continue with the same flags plus --resume, e.g.: python sciassist_train.py "
            f"{_flags_text(settings)} --resume")
    except _Diverged as e:
        status, error = "diverged", str(e)
    finally:
        bar.close()
        bar = None
        writer.wait()

    if status == "completed":
        save_resume()
        if not val_batches and is_main:  # nothing to choose the best by: the final weights are the result
            best = {"step": step, "val_loss": None}
            writer.save(step, model, _checkpoint_meta(model, settings, source, step, None, best, max_seq_len), None)
            writer.wait()
    summary = _summary(settings, runtime, status, error, run_dir, resume_path, source, step, num_steps, per_epoch,
                       metrics, best, train_set, val_set, len(val_examples), totals, elapsed())
    evaluation = None
    if status == "completed" and settings.eval_after and is_main and best["step"] is not None:
        evaluation = _run_evaluation_after(run_dir, settings, log)
        summary["evaluation"] = evaluation
    if is_main:
        _write_json(run_dir / "run_summary.json", summary)
        if best["val_loss"] is not None:
            log(f"best checkpoint: {summary['best_checkpoint']} "
                f"(val loss {best['val_loss']:.4f} at step {best['step']})")
        elif best["step"] is not None:
            log(f"checkpoint (no validation set): {summary['best_checkpoint']}")
    if status == "diverged":
        kept = (f"the best checkpoint so far is kept at {summary['best_checkpoint']}" if best["step"] is not None
                else "no checkpoint was written")
        raise TrainError(f"{error}: training stopped before applying that update; {kept}"
                         f"{' and the last resume point at ' + str(resume_path) if resume_path.is_file() else ''}. "
                         f"Try lower learning rates (e.g. --matrix_lr {settings.matrix_lr / 2:g}) or --grad_clip 1.0")
    return summary


class _Diverged(Exception):
    pass


def _checkpoint_meta(model, settings, source, step, val_loss, best, max_seq_len):
    return {
        "model_config": dataclasses.asdict(model.config),
        "step": step,
        "val_loss": val_loss,
        "best_val_loss": best["val_loss"],
        "source_model": source["model_file"],
        "source_step": source["step"],
        "answer_format": source.get("answer_format", "letter_first"),
        "max_seq_len": max_seq_len,
        "device_batch_size": settings.device_batch_size,
        "training_settings": dataclasses.asdict(settings),
    }


def _check_resume_compatible(state, settings, fingerprint, path):
    saved = state.get("settings", {})
    different = [f"--{name} {saved.get(name)!r} there, {getattr(settings, name)!r} now"
                 for name in TRAJECTORY_FIELDS if saved.get(name) != getattr(settings, name)]
    if different:
        raise TrainError(f"{path} was made with other settings ({'; '.join(different)}); resume with the same flags, "
                         f"or start a new run (another --output_tag)")
    if state.get("data_fingerprint") != fingerprint:
        raise TrainError(f"{path} was made with different training/validation data (or a different tokenizer); "
                         f"resume needs exactly the same data")


def _flags_text(settings):
    defaults = TrainSettings()
    parts = []
    for f in dataclasses.fields(TrainSettings):
        value = getattr(settings, f.name)
        if f.name != "resume" and value != getattr(defaults, f.name):
            parts.append(f"--{f.name} {value}")
    return " ".join(parts)


def _summary(settings, runtime, status, error, run_dir, resume_path, source, step, num_steps, per_epoch, metrics, best,
             train_set, val_set, num_val_used, totals, elapsed_s):
    train_losses = [r["train_loss"] for r in metrics if "train_loss" in r]
    val_losses = [r["val_loss"] for r in metrics if "val_loss" in r]
    best_checkpoint = str(run_dir / f"model_{best['step']:06d}.pt") if best["step"] is not None else None
    return {
        "status": status,
        "error": error,
        "run_dir": str(run_dir),
        "best_checkpoint": best_checkpoint,
        "best_step": best["step"],
        "best_val_loss": best["val_loss"],
        "initial_val_loss": val_losses[0] if val_losses else None,
        "final_val_loss": val_losses[-1] if val_losses else None,
        "final_train_loss": train_losses[-1] if train_losses else None,
        "steps_done": step,
        "steps": step,
        "num_steps": num_steps,
        "steps_per_epoch": per_epoch,
        "train_conversations": len(train_set),
        "val_conversations": len(val_set),
        "val_conversations_evaluated": num_val_used,
        "truncated": {"train": train_set.num_truncated, "val": val_set.num_truncated},
        "dropped_without_supervision": {"train": train_set.num_dropped, "val": val_set.num_dropped},
        "positions_processed": totals["positions"],
        "real_tokens": totals["tokens"],
        "supervised_tokens": totals["supervised"],
        "token_efficiency": totals["tokens"] / totals["positions"] if totals["positions"] else None,
        "elapsed_s": round(elapsed_s, 3),
        "minutes": round(elapsed_s / 60, 2),
        "world_size": runtime.world_size,
        "device": str(runtime.device),
        "source_model": source,
        "resume_point": str(resume_path) if resume_path.is_file() else None,
        "settings": dataclasses.asdict(settings),
    }


def main(argv=None):
    """CLI entry point (sciassist_train.py). Returns the process exit code."""
    from nanochat.checkpoint import CheckpointError
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--preset" or a.startswith("--preset=") for a in args):
        # A preset is a whole recipe (data format, tiny base, fine-tune, evaluation), run by
        # sciassist.pipelines.recipes: `sciassist_train.py --preset cpu --scienceqa DIR --out_dir DIR`.
        from sciassist.pipelines.recipes import main as recipe_main
        return recipe_main(args)
    settings = settings_from_args(args)
    try:
        summary = train(settings)
    except (TrainError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 130 if summary["status"] == "interrupted" else 0

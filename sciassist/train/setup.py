"""Everything a run is made of before its first step: the processes and the device, the
model to fine-tune and its optimizers (the Learner), the tokenized data sets (RunData), both
together with the settings (the Run), and the fingerprint that ties a resume point to its data."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nanochat.attention import AttentionKernelError, PackedLayout
from nanochat.checkpoint import CheckpointError, default_base_dir
from sciassist.checkpoints import choose_checkpoint, load_choice
from sciassist.common import AUTO, Precision, precision_for, resolve_device
from sciassist.data.answers import detect_answer_format
from sciassist.data.batching import TokenizedDataset, step_batches, steps_per_epoch, tokenize_conversations
from sciassist.data.conversations import ConversationError, read_conversations, split_validation
from sciassist.data.mixing import mix_conversations, parse_mix
from sciassist.memory import Card, card_of
from sciassist.train import batch as device_batch
from sciassist.train.batch import DeviceBatch
from sciassist.train.lora import adapter_optimizers, add_adapters
from sciassist.train.plan import config_from_meta
from sciassist.train.settings import TrainError, TrainSettings
from sciassist.train.state import resume_path
from sciassist.train.step import arrange_for, peak_flops
from sciassist.train.tracking import Tracker


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


@contextlib.contextmanager
def distributed_runtime(settings: TrainSettings):
    """The device and, under torchrun (WORLD_SIZE > 1), the process group: NCCL on CUDA,
    gloo on CPU, each rank on its own GPU (LOCAL_RANK). The group is left together at the end."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else None
    device = resolve_device(settings.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    started = world_size > 1 and not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if world_size > 1:
        rank, world_size = dist.get_rank(), dist.get_world_size()
    finished = False
    try:
        yield Runtime(device=device, rank=rank, world_size=world_size, started_process_group=started)
        finished = True
    finally:
        if started:
            if finished:
                # Leave together: a rank that tears its process group down while another
                # still talks to it (rank 0 writing files) can abort at exit.
                dist.barrier()
            dist.destroy_process_group()


def source_choice(settings: TrainSettings):
    """The checkpoint to fine-tune (CheckpointError when there is none). Training never picks a
    fine-tuned run by itself: --checkpoint, else --source/--model_tag in --base_dir."""
    if settings.checkpoint:
        return choose_checkpoint(settings.checkpoint, model_step=settings.model_step, base_dir=settings.base_dir)
    return choose_checkpoint(source=settings.source, model_tag=settings.model_tag, model_step=settings.model_step,
                             base_dir=settings.base_dir, finetuned_dir=None)


def load_source_model(settings: TrainSettings, device):
    """(model, tokenizer, source description) of the checkpoint to fine-tune (source_choice)."""
    try:
        loaded = load_choice(source_choice(settings), device)
        choice = loaded.choice
    except CheckpointError as e:
        where = (f"--checkpoint {settings.checkpoint}" if settings.checkpoint else
                 f"--base_dir {settings.base_dir or default_base_dir()} (--source {settings.source}"
                 f"{', --model_tag ' + settings.model_tag if settings.model_tag else ''})")
        raise TrainError(f"no model to fine-tune (looked in {where}): {e}. Download one with "
                         f"`python -m sciassist.hub --model d20`, or point --base_dir / --checkpoint at one") from e
    source = {"checkpoint_dir": str(choice.checkpoint_dir), "step": choice.step, "model_file": str(choice.model_file)}
    return loaded.model, loaded.tokenizer, source


def load_conversation_sets(settings: TrainSettings):
    """(train records, val records, description) as the settings ask."""

    def read(path, flag):
        path = Path(path).expanduser()
        if path.is_dir():
            hint = f" (ScienceQA files prepared in it: --data_path scienceqa --data_dir {path})" \
                if flag == "--data_path" else ""
            raise TrainError(f"{flag}: {path} is a directory; expected a JSONL file, one conversation per line{hint}")
        if not path.is_file():
            if settings.data_path == "scienceqa":
                raise TrainError(f"{path} not found ({flag}). Prepare ScienceQA with "
                                 f"`python -m sciassist.data.prepare --out_dir {settings.data_dir}` "
                                 f"(or --data_dir DIR where the files are, or --data_path FILE.jsonl for your own "
                                 f"conversations)")
            raise TrainError(f"{flag}: {path} not found (expected a JSONL file, one conversation per line)")
        try:
            records = read_conversations(path, skip_bad=settings.skip_bad_lines)
        except ConversationError as e:
            hint = "" if settings.skip_bad_lines else " (--skip_bad_lines true skips such lines and reports them)"
            raise TrainError(f"{e}{hint}") from e
        except OSError as e:
            raise TrainError(f"{flag}: cannot read {path} ({e.strerror or e})") from e
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


@dataclass
class Learner:
    """The model being fine-tuned and what updates it."""

    model: torch.nn.Module  # the GPT itself (fp32 master weights): saved, evaluated, updated
    train_model: torch.nn.Module  # what the forward/backward calls: the model, DDP-wrapped on several processes
    no_sync: object  # DDP's no_sync (None on one process)
    optimizers: list
    precision: Precision  # what autocast is, and why
    scaler: object = None  # torch.amp.GradScaler of an fp16 run (its state is in the resume point), else None
    lora: object = None  # the peft LoraConfig of a LoRA run (--lora_rank > 0), else None
    attention_kernel: str | None = None  # the packed-row kernel that passed its check (None: padded batches)
    compiled: bool = False  # blocks and loss compiled (GPT.compile_for_training)


@dataclass
class RunData:
    """The tokenized conversations: what the steps go through and what validation measures."""

    train_set: TokenizedDataset
    val_set: TokenizedDataset
    val_batches: list  # the fixed validation micro-batches (empty: no validation)
    num_val: int  # validation conversations evaluated
    per_epoch: int  # optimizer steps per epoch
    max_seq_len: int  # --max_seq_len, capped at the model's sequence_len
    pad_id: int
    description: str
    fingerprint: str  # ties a resume point to this data (data_fingerprint)
    mix: dict | None = None  # --mix: {"sources": [...], "origins": origin of each train example}, else None


class RunPlaces:
    """What a run (fine-tuning's Run, the RL stage's RLRun) knows of itself from its settings and
    runtime: its device, its folder, its resume point, and a log line from the main process."""

    @property
    def device(self):
        return self.runtime.device

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir()

    @property
    def resume_path(self) -> Path:
        return resume_path(self.settings)

    def log(self, message):
        if self.runtime.is_main:
            tqdm.write(message)  # above the progress bar while there is one


@dataclass
class Run(RunPlaces):
    """A run ready for its first step: its settings and processes, the learner, the data, and
    where the model came from."""

    settings: TrainSettings
    runtime: Runtime
    learner: Learner
    data: RunData
    tokenizer: object
    source: dict  # the checkpoint started from (+ the data's answer_format)
    num_steps: int
    flops_per_token: float
    peak: float | None  # dense bf16 peak FLOP/s of the GPU (None: no MFU)
    batch: DeviceBatch | None = None  # the micro-batch (sciassist.train.batch)
    card: Card | None = None  # the GPU the run is on, as sized before loading (None: CPU, mps)
    tracker: Tracker = field(default_factory=Tracker)  # --report_to (set once the start step is known)

    def is_eval_step(self, step):
        periodic = self.settings.eval_every and step % self.settings.eval_every == 0
        return bool(self.data.val_batches) and (step == 0 or step == self.num_steps or bool(periodic))


def prepare_run(settings: TrainSettings, runtime: Runtime, say=None) -> Run:
    """Load the model and the data, build the optimizers and choose the device batch, as the
    settings say (a card that cannot hold the model stops the run before its weights load)."""
    say = say or (lambda line: tqdm.write(line) if runtime.is_main else None)
    torch.manual_seed(settings.seed)
    device = runtime.device
    precision = precision_for(device, settings.dtype)
    card = card_of(device)
    recorded = recorded_batch(settings)
    if card is not None and settings.device_batch_size == AUTO and not recorded:
        check_fixed_memory(settings, card, precision)
    model, tokenizer, source = load_source_model(settings, device)
    # fp32 master weights (the published wte is bf16); autocast does the bf16/fp16 math (precision_for)
    model = model.float()
    model.train()
    # LoRA: adapters injected into the model (the same object, so everything below is unchanged),
    # the base frozen; after the seed, so A's random init is a function of it
    lora = add_adapters(model, settings) if settings.lora_rank > 0 else None
    max_seq_len = settings.max_seq_len
    if max_seq_len > model.config.sequence_len:
        if runtime.is_main:
            tqdm.write(f"note: --max_seq_len {max_seq_len} is longer than the model's sequence_len "
                       f"{model.config.sequence_len}; using {model.config.sequence_len}")
        max_seq_len = model.config.sequence_len
    data, answer_format = prepare_data(settings, runtime, tokenizer, max_seq_len)
    # kept in every checkpoint's meta: how to read this model's multiple-choice answers (chat, web page)
    source = dict(source, answer_format=answer_format)
    optimizers = adapter_optimizers(model, settings) if lora is not None else build_optimizers(model, settings)
    kernel = choose_attention_kernel(model, settings, precision) if settings.packing else None
    compiled = compile_model(model, settings, device, precision)
    batch = device_batch.choose(settings, runtime, model, data.train_set, precision, card, recorded, say)
    data.val_batches = validation_batches(settings, runtime, data, batch)
    train_model, no_sync = _wrap_for_training(model, runtime)
    learner = Learner(model=model, train_model=train_model, no_sync=no_sync, optimizers=optimizers,
                      precision=precision, scaler=precision.grad_scaler(), lora=lora, attention_kernel=kernel,
                      compiled=compiled)
    num_steps = settings.num_iterations if settings.num_iterations > 0 else data.per_epoch * settings.num_epochs
    return Run(settings=settings, runtime=runtime, learner=learner, data=data, tokenizer=tokenizer, source=source,
               num_steps=num_steps, flops_per_token=model.estimate_flops(), batch=batch, card=card,
               peak=peak_flops(device))  # MFU is against the dense bf16 peak, the number GPUs are sold by


def recorded_batch(settings: TrainSettings) -> dict | None:
    """The device batch a --resume run recorded (None: not resuming, or none recorded). Read
    lazily (mmap) so the weights in the file are not loaded twice; a damaged file is left for
    the resume itself to report."""
    if not settings.resume or settings.device_batch_size != AUTO or not resume_path(settings).is_file():
        return None
    try:
        data = torch.load(resume_path(settings), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - start_or_resume says what is wrong with it
        return None
    recorded = data.get("device_batch") if isinstance(data, dict) else None
    return dict(recorded) if isinstance(recorded, dict) and recorded.get("positions") else None


def check_fixed_memory(settings: TrainSettings, card, precision) -> None:
    """Stop before loading the weights when the card cannot hold the model (its meta file says
    its shape); a checkpoint without one is loaded and sized afterwards."""
    try:
        choice = source_choice(settings)
        config = config_from_meta(choice.checkpoint_dir, choice.step)
    except (CheckpointError, OSError, KeyError, TypeError, ValueError):
        return  # load_source_model reports a missing checkpoint with its own message
    device_batch.fixed_memory_check(settings, config, card, precision.dtype is not None)


def validation_batches(settings: TrainSettings, runtime: Runtime, data: RunData, batch) -> list:
    """The fixed validation micro-batches: the first conversations (file order), the same at every
    evaluation, arranged as the training steps are."""
    val_examples = list(range(data.num_val))
    if not val_examples:
        return []
    return step_batches(data.val_set, arrange_for(settings, runtime, data.val_set, val_examples, batch), data.pad_id,
                        runtime.device)


def prepare_data(settings: TrainSettings, runtime: Runtime, tokenizer, max_seq_len: int) -> tuple[RunData, str]:
    """(the run's data, tokenized, its validation batches still to arrange: validation_batches;
    the answer format of its training conversations)."""
    train_records, val_records, description = load_conversation_sets(settings)
    train_records, origins, mix_sources = mix_sources_in(settings, train_records)
    if mix_sources:
        description += "; mixed in: " + ", ".join(f"{m['name']} {m['share']:.0%} ({m['conversations']:,} "
                                                  f"conversations from {m['available']:,})"
                                                  for m in mix_sources[1:])
    train_set = tokenize_conversations(tokenizer, train_records, max_seq_len)
    val_set = tokenize_conversations(tokenizer, val_records, max_seq_len)
    if len(train_set) == 0:
        raise TrainError(f"{description}: no training conversation has an assistant token within "
                         f"max_seq_len={max_seq_len}")
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    mix = ({"sources": mix_sources, "origins": [origins[i] for i in train_set.record_indices]}
           if mix_sources else None)
    data = RunData(train_set=train_set, val_set=val_set, val_batches=[],
                   num_val=min(len(val_set), device_batch.val_conversations(settings)),
                   per_epoch=steps_per_epoch(len(train_set), settings.target_examples_per_step),
                   max_seq_len=max_seq_len, pad_id=pad_id, description=description,
                   fingerprint=data_fingerprint(train_set, val_set), mix=mix)
    return data, detect_answer_format(train_records)


def mix_sources_in(settings: TrainSettings, train_records):
    """(records, origin of each, [source description]) with --mix's files mixed into the
    training records; the records unchanged and no sources without --mix."""
    try:
        sources = parse_mix(settings.mix)
    except ValueError as e:
        raise TrainError(f"--mix {settings.mix}: {e}") from None
    if not sources:
        return train_records, None, None
    extras = []
    for source in sources:
        path = Path(source.path).expanduser()
        if not path.is_file():
            raise TrainError(f"--mix: {path} not found (expected a JSONL file, one conversation per line)")
        try:
            records = read_conversations(path, skip_bad=settings.skip_bad_lines)
        except ConversationError as e:
            raise TrainError(f"--mix: {e}") from e
        if not records:
            raise TrainError(f"--mix: {path} has no conversations")
        extras.append((records, source.share))
    mixed, origins, counts = mix_conversations(train_records, extras, settings.seed)
    described = [{"name": "main", "share": 1 - sum(s.share for s in sources), "conversations": counts[0],
                  "available": len(train_records)}]
    described += [{"name": s.path, "share": s.share, "conversations": n, "available": len(records)}
                  for s, n, (records, _) in zip(sources, counts[1:], extras, strict=True)]
    return mixed, origins, described


def choose_attention_kernel(model, settings: TrainSettings, precision) -> str:
    """The packed-row kernel (--attention_kernel), checked on the run's device and compute dtype
    before the first step (and before torch.compile sees the model)."""
    model.attention_kernel = None if settings.attention_kernel == "auto" else settings.attention_kernel
    try:
        with precision.autocast():
            return model.attention_kernel
    except AttentionKernelError as e:
        raise TrainError(f"--attention_kernel {settings.attention_kernel}: {e}") from None


def build_optimizers(model, settings):
    """Muon for the transformer matrices, AdamW for wte and lm_head, at the settings' learning rates
    x init_lr_frac (fine-tuning and the RL stage: any settings with those fields and muon_torch_dtype)."""
    optimizers = model.setup_optimizers(unembedding_lr=settings.unembedding_lr, embedding_lr=settings.embedding_lr,
                                        matrix_lr=settings.matrix_lr, weight_decay=settings.weight_decay,
                                        muon_dtype=settings.muon_torch_dtype())
    for opt in optimizers:  # nanochat's SFT: every lr starts at lr * init_lr_frac, the peak of the schedule
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] = group["lr"] * settings.init_lr_frac
    return optimizers


def compile_model(model, settings: TrainSettings, device, precision) -> bool:
    """--compile (default: on CUDA only): the model's blocks and loss compiled in place
    (GPT.compile_for_training), every graph compiled by a warm-up before the run starts. When
    that fails, the default falls back to eager with one line; a --compile the user asked for
    is an error with the reason."""
    wanted = settings.compile if settings.compile is not None else compile_by_default(device)
    if not wanted:
        return False
    model.compile_for_training()
    try:
        _compile_warm_up(model, device, precision)
    except Exception as e:  # any failure of the compiler stack (no C++ compiler, no Triton, a bug)
        model.uncompile()
        cause = getattr(e, "inner_exception", None) or e  # the backend's own error, not dynamo's wrapper
        lines = str(cause).strip().splitlines()
        reason = f"{type(cause).__name__}: {lines[0] if lines else ''}"
        where = f"on {device} (torch {torch.__version__})"
        if settings.compile:
            raise TrainError(f"--compile: torch.compile failed {where}: {reason}") from None
        print(f"note: torch.compile failed {where}: {reason}; training without it (--no_compile skips the attempt)",
              file=sys.stderr)
        return False
    finally:
        model.zero_grad(set_to_none=True)
    return True


def compile_by_default(device) -> bool:
    """CUDA only: on CPU inductor needs a C++ compiler, and its 9% per step at the recipe's sizes
    does not repay its minute of compiling on a short run (bench/RESULTS.md)."""
    return device.type == "cuda"


def _compile_warm_up(model, device, precision):
    """Every graph a run compiles, compiled here, where a failure can still fall back: forward and
    backward of packed rows, then the validation forward (eval mode, no gradients), each for two
    rows and for one (torch specialises a size of 1)."""
    T = min(64, model.config.sequence_len)
    generator = torch.Generator().manual_seed(0)
    try:
        for training in (True, False):
            model.train(training)
            for rows in ([[T // 2, T // 2 - 5], [T - 7, 3]], [[T - 9, 9]]):
                layout = PackedLayout.from_row_lengths(rows, T)
                inputs = torch.randint(0, model.config.vocab_size, (len(rows), T), generator=generator).to(device)
                supervised = torch.arange(0, len(rows) * T, 2).to(device)
                with torch.set_grad_enabled(training), precision.autocast():
                    loss = model(inputs, inputs.roll(-1, 1), loss_reduction="sum", layout=layout.to(device),
                                 supervised_index=supervised)
                if training:
                    loss.backward()
    finally:
        model.train()


def _wrap_for_training(model, runtime: Runtime):
    """(the module the forward/backward calls, DDP's no_sync or None)."""
    train_model, no_sync = model, None
    if runtime.distributed:
        # No buffer sync in forward: the only buffers are the rotary tables, the same on every
        # rank (torch >= 2.13 names this forward_sync_buffers, older ones broadcast_buffers).
        sync_flag = ("forward_sync_buffers" if "forward_sync_buffers" in
                     inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")
        device = runtime.device
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      **{sync_flag: False})
        train_model, no_sync = ddp, ddp.no_sync
    return train_model, no_sync

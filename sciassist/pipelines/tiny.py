"""
A tiny base model trained offline: a stand-in for the published d20/d32, not a replacement.

    python -m sciassist.pipelines.tiny --out_dir DIR [--scienceqa sample|DIR|hf] [--vocab_size V]
                             [--depth 4] [--n_embd C --n_head H] [--steps N | --max_epochs 4]

It trains a small BPE tokenizer (rustbpe) and pretrains a small nanochat GPT with a plain
language-model loss on the TRAINING split's text only (captions, hints, questions, choices,
solutions, lectures), and saves both in nanochat's layout:

    DIR/tokenizer/{tokenizer.pkl, token_bytes.pt}
    DIR/base_checkpoints/d<depth>/model_<step>.pt + meta_<step>.json   (val_bpb on val text)
    DIR/tiny_base.json                                                  (what was done)

so that `nanochat.checkpoint.load_model_from(DIR, "base")` loads it and the fine-tuning,
evaluation and chat code can run end to end with no network and no GPU (`make demo`, the
tests). A few minutes of CPU on a few hundred thousand tokens gives a model that has
learned ScienceQA's words and layout and nothing else: it knows no science, and
fine-tuning results on it say nothing about d20/d32. For real results download those
(`make download`).

Choices, and why:
- Validation and test text never reach the tokenizer or the model, so a fine-tune evaluated
  on them is not flattered by the base having read them.
- Lectures repeat across questions (232 distinct ones over 12,726 training questions), so
  each is used once; otherwise they would be a third of the text, memorised many times over.
- Vocabulary: --vocab_size is used as given. Left out, it is 4,096 capped at about one
  token per 64 bytes of training text (a power of two, at least 512; smaller only if the
  text cannot fill 512): the bundled sample is too small for 4,096 tokens to each be seen
  often enough to learn an embedding. The full training split gets 4,096.
- Documents start with <|bos|> and are concatenated into rows (nanochat's base training
  layout); the learning rate is constant, then decays linearly to 0 over the last
  `warmdown_ratio` of the steps.
- At most --max_epochs (4) passes over the training text: on the bundled sample (7k tokens)
  val_bpb is lowest after 3-4 passes and then rises as the model memorises the 40
  questions, so a longer run only makes a worse stand-in. On the full training split
  (0.9M tokens) the time budget ends the run long before.
- Deterministic, and the same on every machine: everything is seeded and the budget is in
  steps. --steps N trains exactly N steps (it ignores --max_epochs); without it the run
  takes the steps of --max_epochs passes over the training text. A time limit is opt-in
  (--max_minutes): the steps are then estimated from the speed of the steps so far and fixed
  when the warmdown starts, so the run equals `--steps N` for the N it reports (in the meta),
  but N depends on the machine. A run whose limit ends before the warmdown could start keeps
  the schedule it actually used in the meta (user_config.steps, user_config.warmdown_from).
"""

import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, config_for_depth
from sciassist.common import (
    THREADS_HELP,
    autocast,
    check_fields,
    precision_for,
    print_error,
    resolve_device,
    setting,
    settings_from_namespace,
    settings_parser,
)
from sciassist.data.scienceqa import ScienceQAError, load_scienceqa
from sciassist.pipelines.tiny_corpus import (
    TinyError,
    batches,
    bits_per_byte,
    choose_vocab_size,
    corpus_documents,
    eval_rows,
    train_tokenizer,
    training_corpus,
)
from sciassist.train.step import apply_update

MARKER_FILE = "tiny_base.json"  # marks a base dir written by this module (safe to overwrite)


@dataclass
class TinySettings:
    out_dir: str = setting(None, "nanochat base dir to write (tokenizer/, base_checkpoints/)", required=True)
    scienceqa: str = setting("sample", "ScienceQA source of the training text: sample | DIR (lupantech layout) | hf")
    vocab_size: int | None = setting(None, "default: 4096 capped at one token per 64 bytes of training text (>= 512)")
    depth: int = setting(4, "transformer layers", at_least=1)
    n_embd: int | None = setting(None, "width (default: nanochat's 64 * depth)", at_least=1)
    n_head: int | None = setting(None, "attention heads (default: heads of 128 channels)", at_least=1)
    sequence_len: int = setting(512, "positions per row", at_least=2)
    device_batch_size: int = setting(8, "rows per step", at_least=1)
    steps: int | None = setting(None, "exact number of optimizer steps (deterministic weights; ignores "
                                      "--max_epochs and --max_minutes)", at_least=1)
    max_epochs: float | None = setting(4.0, "at most this many passes over the training text (see the module "
                                            "docstring)", above=0)
    max_minutes: float | None = setting(None, "opt-in time limit up to the final evaluation, when --steps is not "
                                              "given: the step count then depends on the machine's speed",
                                        above=0)
    warmdown_ratio: float = setting(0.2, "fraction of the steps over which the learning rate decays to 0",
                                    at_least=0, at_most=1)
    matrix_lr: float = setting(0.02, "Muon learning rate (nanochat's base training)", above=0)
    embedding_lr: float = setting(0.2, "AdamW learning rate of the embedding", above=0)
    unembedding_lr: float = setting(0.004, "AdamW learning rate of lm_head", above=0)
    val_rows: int = setting(16, "rows of sequence_len tokens of val text for val_bpb", at_least=1)
    seed: int = setting(42, "seed of the data order and the initial weights", at_least=0)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int | None = setting(1, THREADS_HELP, at_least=1, at_most=4096)
    overwrite: bool = setting(False, "replace tokenizer/ and base_checkpoints/ not written by this module")
    progress: bool = setting(True, "show a progress bar")


# ----------------------------------------------------------------------------- schedule

def warmdown_start(num_steps, warmdown_ratio):
    """The step at which a run of num_steps starts to decay its learning rate."""
    return int(round((1 - warmdown_ratio) * num_steps))


def warmdown_lr_multiplier(step, num_steps, warmdown_from):
    """1 before step `warmdown_from`, then linear down to 0 at num_steps."""
    if step < warmdown_from:
        return 1.0
    return max(0.0, (num_steps - step) / max(1, num_steps - warmdown_from))


# ----------------------------------------------------------------------------- output dir

def _prepare_out_dir(base_dir, overwrite):
    """Refuse to overwrite a tokenizer that is not ours (e.g. a published model's, which its
    checkpoints need), and clear our own earlier output: an older model_<step> with a larger
    step, or a deeper d<N>, would otherwise be picked by load_model_from instead of the new one."""
    base_dir = Path(base_dir)
    ours = (base_dir / MARKER_FILE).is_file()
    if (base_dir / "tokenizer").exists() and not ours and not overwrite:
        raise TinyError(f"{base_dir / 'tokenizer'} already exists and was not written by sciassist.pipelines.tiny "
                        f"(it may belong to a published model); use an empty --out_dir or pass --overwrite")
    if ours or overwrite:
        for name in ("tokenizer", "base_checkpoints", MARKER_FILE):
            path = base_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    base_dir.mkdir(parents=True, exist_ok=True)


def _model_config(settings, vocab_size):
    config = config_for_depth(settings.depth, vocab_size=vocab_size, sequence_len=settings.sequence_len)
    if settings.n_embd is not None:
        config.n_embd = settings.n_embd
    if settings.n_head is not None:
        config.n_head = config.n_kv_head = settings.n_head
    elif settings.n_embd is not None:
        config.n_head = config.n_kv_head = max(1, math.ceil(config.n_embd / 128))
    if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
        raise TinyError(f"n_embd {config.n_embd} must split into {config.n_head} heads of an even size "
                        f"(rotary embeddings rotate pairs of channels)")
    return config


# ----------------------------------------------------------------------------- training

def train_tiny(settings):
    """Train the tokenizer and the model, save them under settings.out_dir. Returns a
    summary dict (also written to <out_dir>/tiny_base.json, without the loss list).

    settings.threads sets torch's CPU threads for the run only. On a machine whose cores are
    already busy, fewer threads are faster: on 2 shared cores under a load of ~6, a depth-4
    step took 3 s with 1 thread and 5.5-6 s with 2 (which spin waiting for each other)."""
    previous_threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _train_tiny(settings)
    finally:
        torch.set_num_threads(previous_threads)


def _check(s):
    if s.steps is None and s.max_epochs is None and s.max_minutes is None:
        raise TinyError("give --steps N, --max_epochs E or --max_minutes M: the run needs a budget")
    check_fields(s, TinyError)


def _texts(source):
    """(train documents, val documents) of a ScienceQA source."""
    try:
        train_docs = training_corpus(source)
    except ScienceQAError as e:
        raise TinyError(str(e)) from e
    if not train_docs:
        raise TinyError(f"ScienceQA source {source!r} has no training text")
    try:
        val_docs = corpus_documents(load_scienceqa(source, "val"))
    except ScienceQAError:
        val_docs = []  # a directory without a val split: no val_bpb, not an error
    return train_docs, val_docs


@dataclass
class Schedule:
    """How many steps the run takes and where its warmdown starts; with --steps both are
    known at once, otherwise they are fixed during the run from the measured speed."""

    num_steps: int | None
    warmdown_from: int | None
    epoch_cap: int | None
    deadline: float
    first_step_done_at: float | None = None

    def update(self, step, warmdown_ratio, bar):
        if self.num_steps is not None:
            return
        # Estimate the total from the speed so far (the first step is left out: it carries
        # one-off start-up costs) and fix it when the warmdown would begin. The learning
        # rate is constant until then, so normally the run equals `--steps num_steps`.
        now = time.time()
        if now >= self.deadline and step >= 1:  # at least one step: a checkpoint is always a trained one
            self.num_steps = self.warmdown_from = step  # budget spent before any warmdown (tiny budgets)
        elif step >= 2:
            estimate = step + int((self.deadline - now) * (step - 1) / max(1e-9, now - self.first_step_done_at))
            estimate = min(estimate, self.epoch_cap) if self.epoch_cap else estimate
            bar.total = estimate
            if step >= warmdown_start(estimate, warmdown_ratio):
                self.num_steps, self.warmdown_from = estimate, step
        elif self.epoch_cap is not None and step >= warmdown_start(self.epoch_cap, warmdown_ratio):
            self.num_steps, self.warmdown_from = self.epoch_cap, step  # a cap of 1-2 steps: no speed known yet

    def multiplier(self, step):
        return warmdown_lr_multiplier(step, self.num_steps, self.warmdown_from) if self.num_steps else 1.0


def _pretrain(s, model, optimizers, train_tokens, schedule, device):
    """The language-model loop; returns the per-step losses. Precision and the update as
    fine-tuning has them (sciassist.common.precision_for, sciassist.train.step.apply_update):
    bf16 autocast on GPUs with native bf16, fp16 with loss scaling on older ones (a step whose
    gradients overflow is skipped whole), fp32 on CPU."""
    precision = precision_for(device)
    scaler = precision.grad_scaler()
    losses = []
    data = batches(train_tokens, s.device_batch_size, s.sequence_len, s.seed)
    bar = tqdm(total=schedule.num_steps or schedule.epoch_cap, desc="pretraining", unit="step",
               disable=not s.progress, dynamic_ncols=True)
    step = 0
    model.train()
    while True:
        schedule.update(step, s.warmdown_ratio, bar)
        if schedule.num_steps is not None and step >= schedule.num_steps:
            break
        multiplier = schedule.multiplier(step)
        inputs, targets, epoch = next(data)
        with precision.autocast():
            loss = model(inputs.to(device), targets.to(device))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        apply_update(model, optimizers, multiplier, scaler=scaler)
        losses.append(loss.item())
        step += 1
        if step == 1:
            schedule.first_step_done_at = time.time()
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", epoch=epoch, lr=f"{multiplier:.2f}")
    bar.close()
    return losses


def _schedule(s, n_train_tokens, tokens_per_step, t_start):
    """The pretraining schedule: --steps, or the epoch cap when no time limit is given (steps
    known up front), else until the time limit or the cap."""
    epoch_cap = max(1, math.ceil(s.max_epochs * n_train_tokens / tokens_per_step)) if s.max_epochs else None
    fixed = s.steps if s.steps is not None else (epoch_cap if s.max_minutes is None else None)
    return Schedule(
        num_steps=fixed, warmdown_from=warmdown_start(fixed, s.warmdown_ratio) if fixed else None,
        epoch_cap=epoch_cap, deadline=t_start + 60 * s.max_minutes if s.max_minutes is not None else math.inf)


def _train_tiny(settings):
    t_start = time.time()
    s = settings
    _check(s)
    base_dir = Path(s.out_dir).expanduser()
    device = resolve_device(s.device)
    train_docs, val_docs = _texts(s.scienceqa)
    _prepare_out_dir(base_dir, s.overwrite)

    tokenizer = train_tokenizer(train_docs, choose_vocab_size(train_docs, s.vocab_size), exact=s.vocab_size is not None)
    vocab_size = tokenizer.get_vocab_size()
    bos = tokenizer.get_bos_token_id()
    train_tokens = tokenizer.encode(train_docs, prepend=bos)
    val_rows = eval_rows(tokenizer.encode(val_docs, prepend=bos), s.sequence_len, s.val_rows) if val_docs else None
    n_train_tokens = sum(len(t) for t in train_tokens)

    torch.manual_seed(s.seed)
    config = _model_config(s, vocab_size)
    model = GPT(config).to(device)
    model.init_weights()
    optimizers = model.setup_optimizers(unembedding_lr=s.unembedding_lr, embedding_lr=s.embedding_lr,
                                        matrix_lr=s.matrix_lr, weight_decay=0.0)
    tokens_per_step = s.device_batch_size * s.sequence_len
    print(f"tiny base: {len(train_docs)} training documents, {n_train_tokens:,} tokens, vocab {vocab_size}; "
          f"GPT depth {config.n_layer}, width {config.n_embd}, {config.n_head} heads, "
          f"{model.num_params():,} params; {tokens_per_step:,} tokens per step on {device}")
    schedule = _schedule(s, n_train_tokens, tokens_per_step, t_start)
    t_loop = time.time()
    losses = _pretrain(s, model, optimizers, train_tokens, schedule, device)
    loop_seconds = time.time() - t_loop
    train_seconds = time.time() - t_start
    step = len(losses)

    model.eval()
    val_bpb = None
    if val_rows is not None:
        with autocast(device):
            val_bpb = bits_per_byte(model, val_rows, tokenizer.token_bytes())
    # the mean over the last tenth of the steps: less noisy than the last batch alone, and
    # short runs (the sample takes 8 steps) are not averaged back to their start
    tail = losses[-max(1, len(losses) // 10):]
    final_loss = sum(tail) / len(tail) if tail else float("nan")

    tokenizer.save(base_dir / "tokenizer")
    checkpoint_dir = base_dir / "base_checkpoints" / f"d{config.n_layer}"
    user_config = dataclasses.asdict(s)
    user_config.update(vocab_size=vocab_size, steps=step, warmdown_from=schedule.warmdown_from)
    save_checkpoint(checkpoint_dir, step, model, {
        "model_config": dataclasses.asdict(config), "step": step, "val_bpb": val_bpb, "user_config": user_config,
        "device_batch_size": s.device_batch_size, "max_seq_len": s.sequence_len, "train_loss": final_loss,
        "source": "sciassist.pipelines.tiny (a stand-in for a published base model)"})
    summary = {
        "base_dir": str(base_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "step": step,
        "epochs": round(step * tokens_per_step / n_train_tokens, 2),
        "model_config": dataclasses.asdict(config),
        "num_params": model.num_params(),
        "vocab_size": vocab_size,
        "train_documents": len(train_docs),
        "train_tokens": n_train_tokens,
        "tokens_per_step": tokens_per_step,
        "final_loss": final_loss,
        "val_bpb": val_bpb,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": round(step * tokens_per_step / loop_seconds) if loop_seconds > 0 else None,
        "settings": dataclasses.asdict(s),
    }
    (base_dir / MARKER_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    summary["losses"] = losses
    return summary


def build_parser():
    return settings_parser(TinySettings, "python -m sciassist.pipelines.tiny",
                           "Train a tiny stand-in base model (tokenizer + GPT) on ScienceQA training text, saved in "
                           "nanochat's layout. Not a replacement for d20/d32.",
                           renamed={"--out_base_dir": "--out_dir"})


def main(argv=None):
    settings = settings_from_namespace(TinySettings, build_parser().parse_args(argv))
    try:
        summary = train_tiny(settings)
    except TinyError as e:
        return print_error(e)  # one `error:` line, exit code 2
    bpb = f"{summary['val_bpb']:.3f}" if summary["val_bpb"] is not None else "n/a"
    print(f"tiny base model (a stand-in, not d20/d32): {summary['checkpoint_dir']}/model_{summary['step']:06d}.pt, "
          f"{summary['num_params']:,} params, {summary['step']} steps in {summary['train_seconds']:.0f} s, "
          f"final loss {summary['final_loss']:.3f}, val_bpb {bpb}; tokenizer in {summary['base_dir']}/tokenizer. "
          f"Load it with load_model_from({summary['base_dir']!r}, 'base').")
    return 0


if __name__ == "__main__":
    sys.exit(main())

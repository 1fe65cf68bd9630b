"""What a fine-tuning run can be told: TrainSettings (each field is a sciassist_train.py flag
of the same name), the checks of their values, and the command line built from them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.attention import KERNELS as ATTENTION_KERNELS
from nanochat.checkpoint import CONFIG_LIMITS
from sciassist.checkpoints import DEFAULT_FINETUNED_DIR, SOURCES, SPEC_HELP
from sciassist.common import (
    DTYPES,
    THREADS_HELP,
    UserError,
    field_problems,
    resolve_device,
    setting,
)

# Settings that shape the run's trajectory: a resume point made with other values would
# silently turn into a different run, so resuming refuses it.
TRAJECTORY_FIELDS = (
    "data_path", "data_dir", "val_path", "val_split", "max_seq_len", "source", "model_tag", "model_step",
    "checkpoint", "num_epochs", "num_iterations", "target_examples_per_step", "matrix_lr", "embedding_lr",
    "unembedding_lr", "weight_decay", "init_lr_frac", "warmup_steps", "grad_clip", "packing", "pack_len",
    "eval_every", "eval_steps", "seed", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_lr", "mix",
)
# Old flag names that still work (the parser says what they are now).
RENAMED_FLAGS = {"--checkpoint_dir": "--checkpoint", "--output_dir": "--out_dir"}
# The upper ends of the number flags' ranges (each far beyond any sensible run, so a typo fails
# when the flag is parsed rather than after loading the model): positions as nanochat.checkpoint
# bounds a model's sequence_len; steps; conversations per step or micro-batch; learning rates.
MAX_POSITIONS = CONFIG_LIMITS["sequence_len"]
MAX_STEPS = 10**9
MAX_EPOCHS = 100_000
MAX_BATCH = 1_000_000
MAX_LR = 100.0


REPORT_TO = ("none", "tensorboard", "wandb")
# The projections of a transformer block that LoRA can adapt (nanochat.gpt: attention c_q, c_k,
# c_v, c_proj; MLP c_fc, c_proj; a name selects it in every block, c_proj in both places).
LORA_TARGETS = ("c_q", "c_k", "c_v", "c_proj", "c_fc")
MAX_LORA_RANK = 65_536


def lora_target_names(text: str) -> list[str]:
    """The module names of --lora_targets (comma-separated, blanks ignored)."""
    return [name.strip() for name in str(text).split(",") if name.strip()]


def lora_targets_problem(text: str) -> str | None:
    """--lora_targets' rule: one or more of LORA_TARGETS, comma-separated."""
    targets = lora_target_names(text)
    unknown = [name for name in targets if name not in LORA_TARGETS]
    if unknown or not targets:
        return (f"names unknown module name(s) {', '.join(unknown) or '(none given)'}; the valid names are "
                f"{', '.join(LORA_TARGETS)} (comma-separated)")
    return None


# The LoRA flags of fine-tuning and RL (sciassist.train.lora): (default, help, rules) of each,
# declared once; lora_setting makes a class's field of one.
LORA_FLAGS = {
    "lora_rank": (0, "LoRA rank r of the adapters (0: every weight trains); with r > 0 only the adapters train, "
                     "Muon at --lora_lr, and the run saves the merged model plus <run>/adapter/",
                  dict(at_least=0, at_most=MAX_LORA_RANK)),
    "lora_alpha": (None, "LoRA scaling alpha (the update is alpha/r x B A; default: 2 x --lora_rank)",
                   dict(above=0, at_most=1e6)),
    "lora_dropout": (0.0, "dropout on the adapters' input, a fraction in [0, 1)", dict(at_least=0, below=1)),
    "lora_targets": (",".join(LORA_TARGETS), f"comma-separated block projections to adapt, of "
                                             f"{', '.join(LORA_TARGETS)} (c_proj: attention and MLP)",
                     dict(check=lora_targets_problem)),
    "lora_lr": (0.1, "Muon learning rate of the LoRA adapters (x --init_lr_frac, like every lr; --matrix_lr, "
                     "--embedding_lr and --unembedding_lr do not apply with LoRA)", dict(above=0, at_most=MAX_LR)),
}


def lora_setting(name: str):
    """A new dataclass field of the LoRA flag `name` (LORA_FLAGS), for a settings class."""
    default, help_text, rules = LORA_FLAGS[name]
    return setting(default, help_text, **rules)


def _steps_problem(value) -> str | None:
    return "must be -1 (from epochs) or > 0" if value == 0 else None


def _folder_name_problem(text) -> str | None:
    return None if text and "/" not in text and text not in (".", "..") else "must be a plain folder name"


class TrainError(UserError):
    """A problem the user can fix (bad flag, missing file, diverged run); the message says how."""


class RunFields:
    """What fine-tuning and the RL stage derive alike from their muon_dtype, out_dir and output_tag
    fields (a mixin of their settings dataclasses)."""

    def muon_torch_dtype(self):
        """--muon_dtype as a torch dtype (None: auto, the device decides)."""
        return None if self.muon_dtype == "auto" else getattr(torch, self.muon_dtype)

    def run_dir(self) -> Path:
        return Path(self.out_dir).expanduser() / self.output_tag


@dataclass
class TrainSettings(RunFields):
    """Every knob of a fine-tuning run; the one source of defaults for the CLI (each field
    is a --flag of the same name), the notebook and the tests. The defaults reproduce the
    ScienceQA fine-tune: 4 epochs, 64 examples per step, lrs 2e-3 / 1e-1 / 1e-2 scaled by
    init_lr_frac 0.02 and decayed linearly to zero, validation every 25 steps."""

    # data
    data_path: str = setting("scienceqa", "conversations to train on: a JSONL file ({\"messages\": [...]} or a "
                                          "bare message array per line), or 'scienceqa' for "
                                          "<data_dir>/scienceqa_train.jsonl and scienceqa_val.jsonl (made by "
                                          "`python -m sciassist.data.prepare`)")
    data_dir: str = setting("data", "folder of the prepared scienceqa_{train,val}.jsonl files")
    val_path: str | None = setting(None, "validation JSONL (default: scienceqa_val.jsonl for 'scienceqa', "
                                         "else the last --val_split of --data_path)")
    val_split: float = setting(0.1, "fraction of --data_path held out for validation when there is no --val_path "
                                    "(the last lines of the file; 0 = no validation)", at_least=0, below=1)
    mix: str = setting("", "more conversations mixed into the training set, each as a share of it: "
                           "FILE.jsonl:SHARE[,FILE:SHARE...], e.g. general.jsonl:0.2 (20% of the training "
                           "conversations; validation stays the main data's)")
    skip_bad_lines: bool = setting(False, "skip malformed JSONL lines (each reported with file:line) instead of "
                                          "stopping at the first")
    max_seq_len: int = setting(2048, "longest conversation in positions; longer ones are truncated (and counted)",
                               at_least=16, at_most=MAX_POSITIONS)
    # model
    source: str = setting("sft", f"checkpoint kind in --base_dir to start from: {' | '.join(SOURCES)}",
                          choices=list(SOURCES))
    model_tag: str | None = setting(None, "model folder, e.g. d20 (default: the largest d<N> present)")
    model_step: int | None = setting(None, "checkpoint step (default: the latest)", at_least=0)
    base_dir: str | None = setting(None, "nanochat base dir (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    checkpoint: str | None = setting(None, f"the model to start from instead of --source/--model_tag: {SPEC_HELP} "
                                           f"(the tokenizer is looked for beside it)")
    # optimisation
    num_epochs: int = setting(4, "passes over the training set", at_least=0, at_most=MAX_EPOCHS)
    num_iterations: int = setting(-1, "total optimizer steps; -1 = num_epochs x (train examples // "
                                      "target_examples_per_step)", at_least=-1, at_most=MAX_STEPS,
                                  check=_steps_problem)
    device_batch_size: int | str = setting(
        "auto", "micro-batch size per GPU, in rows of max_seq_len positions (packed rows are often shorter, then "
                "more of them fit); conversations when not packed. auto: on a GPU the memory planner's largest for "
                "the card's free memory at this data's widest row, proven by one forward and backward before step 0 "
                "(halved on out-of-memory); on a CPU the fastest measured (2,048 positions); a resumed run keeps "
                "its recorded batch", auto=True, at_least=1, at_most=MAX_BATCH)
    target_examples_per_step: int = setting(64, "conversations per optimizer step over all GPUs (effective batch)",
                                            at_least=1, at_most=MAX_BATCH)
    matrix_lr: float = setting(0.01, "Muon learning rate for the transformer matrices", above=0, at_most=MAX_LR)
    embedding_lr: float = setting(0.1, "AdamW learning rate for the token embedding (x (n_embd/768)^-0.5)",
                                  above=0, at_most=MAX_LR)
    unembedding_lr: float = setting(0.002, "AdamW learning rate for lm_head (x (n_embd/768)^-0.5)", above=0,
                                    at_most=MAX_LR)
    weight_decay: float = setting(0.0, "Muon weight decay", at_least=0, at_most=MAX_LR)
    init_lr_frac: float = setting(0.02, "every learning rate is multiplied by this (nanochat's SFT convention)",
                                  above=0, at_most=1)
    warmup_steps: int = setting(0, "linear warmup steps before the linear decay to zero", at_least=0,
                                at_most=MAX_STEPS)
    grad_clip: float = setting(0.0, "clip the gradient norm to this (0 = off)", at_least=0, at_most=1e6)
    packing: bool = setting(True, "pack several conversations per row (false: pad each micro-batch to its "
                                  "longest conversation, as nanochat did)")
    pack_len: int = setting(1024, "row width packing aims for (rows widen for longer conversations, up to "
                                  "max_seq_len): attention is dense over a row, so shorter rows cost less",
                            at_least=1, at_most=MAX_POSITIONS)
    # LoRA (sciassist.train.lora, built on peft): only low-rank adapters train, the base weights are frozen
    lora_rank: int = lora_setting("lora_rank")
    lora_alpha: float | None = lora_setting("lora_alpha")
    lora_dropout: float = lora_setting("lora_dropout")
    lora_targets: str = lora_setting("lora_targets")
    lora_lr: float = lora_setting("lora_lr")
    # evaluation
    eval_every: int = setting(25, "validation loss every N steps (and at step 0 and the end; 0 = only those)",
                              at_least=0, at_most=MAX_STEPS)
    eval_steps: int = setting(100, "validation uses the first eval_steps x device_batch_size validation "
                                   "conversations (x 8 with device_batch_size auto), the same ones at every "
                                   "evaluation", at_least=1, at_most=MAX_STEPS)
    eval_after: bool = setting(False, "evaluate the best checkpoint with sciassist.eval.run when training ends "
                                      "(sciassist_train.py / sciassist.pipelines.finetune)")
    # output
    out_dir: str = setting(DEFAULT_FINETUNED_DIR, "where runs are written")
    output_tag: str = setting("finetuned", "run name: files go to <out_dir>/<output_tag>/",
                              check=_folder_name_problem)
    save_every: int = setting(250, "write a resume point every N steps (0 = only at the end / on Ctrl-C)",
                              at_least=0, at_most=MAX_STEPS)
    resume: bool = setting(False, "continue the run in <out_dir>/<output_tag>/resume/ (same flags)")
    report_to: str = setting("none", "where metrics also go: none | tensorboard | wandb (metrics.jsonl and "
                                     "loss_curve.png are always written)", choices=list(REPORT_TO))
    wandb_project: str = setting("sciassist", "the Weights & Biases project of --report_to wandb")
    # runtime
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)")
    threads: int | None = setting(None, THREADS_HELP, at_least=1, at_most=4096)
    dtype: str = setting("auto", "auto | bfloat16 | float16 | float32 (auto: bfloat16 autocast on CUDA GPUs with "
                                 "native bf16, compute capability >= 8.0, and on CPUs with AVX512-BF16 or AMX; "
                                 "float16 autocast + loss scaling on older GPUs, e.g. T4, V100; float32 on other "
                                 "CPUs and mps)", choices=list(DTYPES))
    compile: bool | None = setting(None, "torch.compile the blocks and the loss (dynamic shapes, packed attention "
                                         "left eager, so packed rows compile a few graphs, not one per step), all "
                                         "compiled by a warm-up before the run; default: on CUDA (falling back to "
                                         "eager with one line if that fails), off on CPU and mps")
    muon_dtype: str = setting("auto", "dtype of Muon's Newton-Schulz iteration: auto | bfloat16 | float32 (auto: "
                                      "bfloat16 where the device has it natively, CUDA >= 8.0 or a CPU with "
                                      "AVX512-BF16/AMX; float32 elsewhere, where bf16 is emulated and many times "
                                      "slower; torch.optim.Muon and nanochat always use bfloat16)",
                              choices=["auto", "bfloat16", "float32"])
    attention_kernel: str = setting("auto", "attention over packed rows: auto | varlen | flex | dense | loop. Every "
                                            "kernel is checked against a reference on this device before it trains; "
                                            "auto takes the first that passes (varlen, flex, dense on CUDA; loop "
                                            "elsewhere), a named one that fails is an error",
                                    choices=["auto", *ATTENTION_KERNELS])
    seed: int = setting(42, "seed of the data order (reshuffled every epoch) and torch", at_least=0,
                        at_most=2**63 - 1)


def check_settings(s: TrainSettings) -> None:
    """Raise TrainError naming the flag for any value that cannot work: each field's own rules
    (declared on it, as the command line checks them), then the rules between fields and the
    device this machine has."""
    problems = field_problems(s)
    if not problems and s.num_epochs < 1 and s.num_iterations <= 0:
        problems.append(f"--num_epochs must be >= 1 (or --num_iterations > 0), got {s.num_epochs!r}")
    try:
        resolve_device(s.device)
    except UserError as e:
        problems.append(str(e))
    if problems:
        raise TrainError("invalid settings: " + "; ".join(problems))

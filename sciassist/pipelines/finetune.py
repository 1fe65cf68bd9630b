"""The fine-tuning command (sciassist_train.py): training, then with --eval_after the
evaluation of the best checkpoint on held-out questions.

    python sciassist_train.py --help
    torchrun --nproc_per_node=8 sciassist_train.py ...

Training itself is sciassist.train.loop.train; this stage adds what comes after it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint import CheckpointError
from sciassist.common import (
    AUTO,
    precision_for,
    print_error,
    resolve_device,
    setting,
    settings_from_namespace,
    settings_parser,
    write_json,
)
from sciassist.eval.run import evaluate_after_training
from sciassist.train import plan
from sciassist.train.batch import CPU_POSITIONS, MPS_ROWS
from sciassist.train.loop import train
from sciassist.train.settings import RENAMED_FLAGS, TrainError, TrainSettings, check_settings
from sciassist.train.setup import source_choice
from sciassist.train.step import command_exit

RECIPES_HINT = "recipes are their own command: python -m sciassist.pipelines.recipes --preset NAME ..."


@dataclass
class FinetuneCommand(TrainSettings):
    """sciassist_train.py's flags: every TrainSettings field, plus what only the command does."""

    dry_run: bool = setting(False, "print the memory plan of this run (parameters, gradients, optimizer states, "
                                   "activations, the total, whether it fits the visible GPU, the largest "
                                   "--device_batch_size that does) and exit, loading no weights and no data")

    def train_settings(self) -> TrainSettings:
        return TrainSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainSettings)})


def build_parser():
    return settings_parser(FinetuneCommand, prog="sciassist_train.py", renamed=RENAMED_FLAGS,
                           description="Fine-tune a nanochat checkpoint on chat conversations (ScienceQA by default).")


def command_from_args(argv=None) -> FinetuneCommand:
    return settings_from_namespace(FinetuneCommand, build_parser().parse_args(argv))


def settings_from_args(argv=None) -> TrainSettings:
    """The TrainSettings of sciassist_train.py's command line (for library callers and tests)."""
    return command_from_args(argv).train_settings()


def dry_run(settings: TrainSettings) -> dict:
    """The memory plan of `settings` (sciassist.train.plan; with --lora_rank > 0 the LoRA one),
    printed; only the checkpoint's meta_<step>.json is read (the model is built on the meta device)."""
    check_settings(settings)
    try:
        choice = source_choice(settings)
        config = plan.config_from_meta(choice.checkpoint_dir, choice.step)
    except CheckpointError as e:
        raise TrainError(f"--dry_run: no model to plan for: {e}") from e
    device = resolve_device(settings.device)
    bf16 = precision_for(device, settings.dtype).dtype is not None
    seq = min(settings.max_seq_len, config.sequence_len)
    free = plan.gpu_free_bytes(device) if device.type == "cuda" else None
    lora = plan.LoraShape.of(settings)
    batch, auto = settings.device_batch_size, ""
    if batch == AUTO and free is not None:  # the planner's pick at full rows
        batch = max(1, plan.max_batch(config, seq, free, bf16=bf16, lora=lora))
        auto = (" (--device_batch_size auto: the largest that fits, at full rows; the run sizes it at its data's "
                "widest row and proves it before step 0)")
    elif batch == AUTO:
        batch = max(1, CPU_POSITIONS // seq) if device.type == "cpu" else MPS_ROWS
        auto = f" (--device_batch_size auto on {device.type}: {batch} row(s) of {seq} positions)"
    # with --lora_rank > 0 the LoRA plan (format_plan names it, with the rank and trainable parameters)
    result = plan.memory_plan(config, batch, seq, bf16=bf16, free=free, lora=lora)
    print(plan.format_plan(result, title=f"memory plan for {choice.describe()} on {device} (--dry_run){auto}\n"))
    return result


def finetune(settings: TrainSettings, on_step=None) -> dict:
    """train(settings, on_step); then, with settings.eval_after, the evaluation of the run's
    best checkpoint (as summary["evaluation"], also in run_summary.json). Returns the summary."""
    summary = train(settings, on_step)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 evaluates
    if settings.eval_after and main_process and summary["status"] == "completed" and summary["best_step"] is not None:
        summary["evaluation"] = _evaluate_after(Path(summary["run_dir"]), settings)
        write_json(Path(summary["run_dir"]) / "run_summary.json", summary)
    return summary


def _evaluate_after(run_dir: Path, settings: TrainSettings):
    """sciassist.eval.run.evaluate_after_training(run_dir, ...) on the validation questions;
    None when there are none to ask, {"error": ...} when the evaluation failed."""
    if settings.data_path == "scienceqa":
        where = {"data_path": settings.val_path, "data_dir": settings.data_dir}
    elif settings.val_path:  # held-out multiple-choice questions (with "meta": choices, answer)
        where = {"data_path": settings.val_path}
    else:
        print("note: --eval_after skipped: with your own --data_path it needs --val_path (held-out questions in "
              "the ScienceQA JSONL shape); run sciassist_evaluate.py yourself")
        return None
    print(f"evaluating {run_dir} (--eval_after)")
    try:
        return evaluate_after_training(run_dir, split="val", device=settings.device, **where)
    except Exception as e:  # the fine-tuned model is saved; a failed evaluation must not hide that
        print(f"note: --eval_after failed ({type(e).__name__}: {e}); run sciassist_evaluate.py on {run_dir} instead")
        return {"error": f"{type(e).__name__}: {e}"}


def main(argv=None) -> int:
    """sciassist_train.py: 0 when the run completed, 130 when interrupted (Ctrl-C), 143 when
    terminated (SIGTERM), each with a resume point saved; 3 when the device ran out of memory
    (one `error:` line: what was saved, the flag to change); 2 on a problem the user can fix (one
    `error:` line)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--preset" or a.startswith("--preset=") for a in args):
        return print_error(TrainError(RECIPES_HINT))
    command = command_from_args(args)
    settings = command.train_settings()

    def run():
        if command.dry_run:
            dry_run(settings)
            return None
        return finetune(settings)
    return command_exit(run)


if __name__ == "__main__":
    sys.exit(main())

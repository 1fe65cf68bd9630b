"""The fine-tuning command (sciassist_train.py): training, then with --eval_after the
evaluation of the best checkpoint on held-out questions.

    python sciassist_train.py --help
    torchrun --nproc_per_node=8 sciassist_train.py ...

Training itself is sciassist.train.loop.train; this stage adds what comes after it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nanochat.checkpoint import CheckpointError
from sciassist.common import UserError, print_error, write_json
from sciassist.eval.run import evaluate_after_training
from sciassist.train.loop import train
from sciassist.train.settings import TrainError, TrainSettings, settings_from_args
from sciassist.train.step import Terminated

RECIPES_HINT = "recipes are their own command: python -m sciassist.pipelines.recipes --preset NAME ..."
# the exit codes of a run stopped by Ctrl-C (SIGINT) or SIGTERM, as a shell reports a process killed by them
EXIT_CODES = {"completed": 0, "interrupted": 130, "terminated": 143}


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
    terminated (SIGTERM), each with a resume point saved; 2 on a problem the user can fix (one
    `error:` line)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a == "--preset" or a.startswith("--preset=") for a in args):
        return print_error(TrainError(RECIPES_HINT))
    settings = settings_from_args(args)
    try:
        summary = finetune(settings)
    except (UserError, CheckpointError) as e:
        return print_error(e)
    except KeyboardInterrupt as e:  # before the first step or after the last: nothing more to save
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{how} while the run was starting or finishing; nothing more was saved", file=sys.stderr)
        return EXIT_CODES["terminated" if isinstance(e, Terminated) else "interrupted"]
    return EXIT_CODES.get(summary["status"], 0)


if __name__ == "__main__":
    sys.exit(main())

"""Where a run's metrics go besides metrics.jsonl and loss_curve.png (always written):
--report_to none | tensorboard | wandb.

  tensorboard  event files in <run>/tensorboard/ (`tensorboard --logdir <run>/tensorboard`);
               a resumed run drops events after its resume step and continues the same files
  wandb        a Weights & Biases run named after --output_tag in --wandb_project; its id is kept
               in <run>/wandb_run_id.txt, so a resumed run continues the same wandb run. Offline:
               WANDB_MODE=offline (then `wandb sync`), as wandb itself documents

Every number of a step's record is logged under train/ (val_loss and best_val_loss under val/),
at the record's step. Only the main process reports.
"""

from __future__ import annotations

import dataclasses
import secrets
import string
from pathlib import Path

from sciassist.train.settings import TrainError

VAL_KEYS = ("val_loss", "best_val_loss")
WANDB_ID_FILE = "wandb_run_id.txt"


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, named as the trackers show them."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"{'val' if key in VAL_KEYS else 'train'}/{key}"] = float(value)
    return out


class Tracker:
    """No tracker (--report_to none)."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, run_dir: Path, start_step: int):
        # deferred: tensorboard is only needed by runs that report to it
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events a killed run wrote after its resume point are dropped
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step
                                    else None)

    def log(self, record: dict) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"])

    def close(self) -> None:
        self.writer.close()


def _new_run_id() -> str:
    """A wandb run id: 8 lowercase letters and digits, as wandb makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbTracker(Tracker):
    def __init__(self, settings, run_dir: Path, resumed: bool):
        import wandb  # deferred: wandb is only needed by runs that report to it

        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else _new_run_id()
        self.run = wandb.init(project=settings.wandb_project, name=settings.output_tag, id=run_id, resume="allow",
                              dir=str(run_dir), config=dataclasses.asdict(settings))
        id_file.write_text(self.run.id + "\n")

    def log(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def open_tracker(settings, run_dir: Path, start_step: int, is_main: bool) -> Tracker:
    if not is_main or settings.report_to == "none":
        return Tracker()
    try:
        if settings.report_to == "tensorboard":
            return TensorBoardTracker(run_dir, start_step)
        return WandbTracker(settings, run_dir, resumed=settings.resume)
    except ImportError as e:
        raise TrainError(f"--report_to {settings.report_to} needs the {settings.report_to} package: "
                         f"pip install {settings.report_to} ({e})") from e

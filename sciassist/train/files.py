"""The run folder, <out_dir>/<output_tag>/ (rank 0 writes it):

  model_<step>.pt, meta_<step>.json  the best checkpoint by validation loss (nanochat's
                                     layout, loadable by nanochat.checkpoint.load_model)
  tokenizer/                         a copy of the tokenizer, so the folder is self-contained
  metrics.jsonl                      one line per step (+ step 0): losses, lr, throughput
  loss_curve.png                     redrawn at every evaluation
  run_summary.json                   written at the end
  resume/state.pt                    everything --resume needs (sciassist.train.state)
  adapter/                           LoRA runs: the best checkpoint's adapter in peft's format
                                     (model_<step>.pt is then the merged model; sciassist.train.lora)

A run starting in the folder first removes what writes that were killed midway left there
(remove_leftovers), with a note.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

from nanochat.checkpoint import meta_path, model_path, optim_path, save_checkpoint
from nanochat.files import remove_partial_files
from sciassist.plots import plot_loss_curve
from sciassist.train.lora import ADAPTER_DIR, lora_meta, save_lora_checkpoint
from sciassist.train.settings import TrainError
from sciassist.train.state import RESUME_DIR, temp_path

METRICS_FILE = "metrics.jsonl"
# what a fresh run removes from a folder an earlier run wrote (the resume point excepted)
EARLIER_RUN_FILES = ("model_*.pt", "meta_*.json", "optim_*.pt", METRICS_FILE, "loss_curve.png", "run_summary.json")


class BestCheckpointWriter:
    """Writes the best checkpoint in a background thread, then removes the previous best.

    A d20 checkpoint is 2.2 GB and validation improves at most evaluations (30 of them in
    the ScienceQA run), which would otherwise stall the GPU for minutes in total. The weights
    are copied to CPU memory first (training goes on changing the live ones); one write is
    in flight at a time, and wait() re-raises a failed write.

    lora (a peft LoraConfig): the run trains LoRA adapters; the thread merges them into the CPU
    copy (never the live model) and writes the merged model, and the adapter to <run>/adapter/."""

    def __init__(self, run_dir, lora=None):
        self.run_dir = Path(run_dir)
        self.lora = lora
        self.thread = None
        self.error = None

    def save(self, step, model, meta, previous_step):
        self.wait()
        state_dict = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

        def write():
            try:
                if self.lora is not None:
                    save_lora_checkpoint(self.run_dir, step, model, state_dict, self.lora, meta)
                else:
                    save_checkpoint(self.run_dir, step, state_dict, meta)
                if previous_step is not None and previous_step != step:
                    remove_checkpoint(self.run_dir, previous_step)
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


def checkpoint_meta(run, step, val_loss, best) -> dict:
    """meta_<step>.json of a checkpoint of this run: nanochat's keys and the run's."""
    return {
        "model_config": dataclasses.asdict(run.learner.model.config),
        "step": step,
        "val_loss": val_loss,
        "best_val_loss": best["val_loss"],
        "source_model": run.source["model_file"],
        "source_step": run.source["step"],
        "answer_format": run.source.get("answer_format", "letter_first"),
        "max_seq_len": run.data.max_seq_len,
        "device_batch_size": run.batch.rows if run.batch is not None else run.settings.device_batch_size,
        "device_batch": run.batch.record() if run.batch is not None else None,
        "training_settings": dataclasses.asdict(run.settings),
        **({"lora": lora_meta(run.settings)} if run.learner.lora is not None else {}),
    }


def remove_checkpoint(run_dir, step):
    for path in (model_path(run_dir, step), meta_path(run_dir, step), optim_path(run_dir, step)):
        path.unlink(missing_ok=True)


def remove_leftovers(run) -> None:
    """Remove what killed writes left in the run folder: checkpoint temp files (as large as the
    model), meta/optim files without their model, a model without its meta (from an older
    version, which wrote the model first) and the resume point's temp file; a note names them."""
    if not run.runtime.is_main:
        return
    removed = remove_partial_files(run.run_dir)
    resume_tmp = temp_path(run.resume_path)
    if resume_tmp.is_file():
        resume_tmp.unlink()
        removed.append(f"{RESUME_DIR}/{resume_tmp.name}")
    if removed:
        run.log(f"note: removed what an interrupted save left in {run.run_dir}: {', '.join(removed)}")


def open_run_dir(run, metrics) -> None:
    """Make the run folder ready: a fresh run removes an earlier run's outputs (so exactly
    one best checkpoint, this run's, is left in it) but keeps its resume point until this
    run writes its own, since starting without --resume by mistake must not destroy it.
    metrics.jsonl is rewritten with `metrics`, the records a resumed run keeps."""
    if not run.runtime.is_main:
        return
    run_dir = run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.settings.resume:
        removed = []
        for pattern in EARLIER_RUN_FILES:
            for path in run_dir.glob(pattern):
                path.unlink()
                removed.append(path.name)
        if (run_dir / ADAPTER_DIR).is_dir():  # an earlier LoRA run's adapter
            shutil.rmtree(run_dir / ADAPTER_DIR)
            removed.append(f"{ADAPTER_DIR}/")
        if removed:
            run.log(f"note: {run_dir} held an earlier run; removed its {', '.join(sorted(set(removed)))}")
        if run.resume_path.is_file():
            run.log(f"note: {run.resume_path} (an earlier run's resume point) is kept until this run saves its "
                    f"own; to continue that run instead, stop now and add --resume")
    run.tokenizer.save(run_dir / "tokenizer")
    with open(run_dir / METRICS_FILE, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in metrics)


def append_record(run, record) -> None:
    """One more line of metrics.jsonl; the loss curve is redrawn when it has a validation loss."""
    if not run.runtime.is_main:
        return
    with open(run.run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if "val_loss" in record:
        try:
            plot_loss_curve(run.run_dir / METRICS_FILE, run.run_dir / "loss_curve.png")
        except Exception as e:  # a plot must never stop training
            run.log(f"note: loss_curve.png not updated ({type(e).__name__}: {e})")

"""
The whole pipeline in miniature, offline, on a CPU (`make demo`):

    1. data      ScienceQA as chat JSONL (the bundled sample, or --scienceqa DIR)
    2. base      a tiny tokenizer + base model trained here (a stand-in for d20/d32)
    3. finetune  SFT of that base on the training conversations (Muon + AdamW, packed)
    4. evaluate  base vs fine-tuned on the same validation questions: the ScienceQA table,
                 plots, side-by-side answers and a report

    python -m sciassist.pipelines.demo [--scienceqa sample|DIR] [--out demo_output] [--base_minutes 1.5]

Everything lands under --out; the last lines printed say where. The sample has 12
validation questions, so its accuracies only show that the pipeline runs; point
--scienceqa at a full local copy (e.g. ../shared/scienceqa) for numbers that mean
something, and download d20/d32 (`make download`) for a real tutor.
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from nanochat.checkpoint import CheckpointError
from sciassist.data import scienceqa as sqa
from sciassist.eval.run import EvaluationError, evaluate_after_training
from sciassist.pipelines.tiny import TinyError, TinySettings, train_tiny
from sciassist.train.loop import TrainError, TrainSettings, train


@dataclasses.dataclass
class DemoSettings:
    scienceqa: str = "sample"
    out: str = "demo_output"
    # the tiny base: depth 4, at most 4 epochs of its training text within base_minutes
    base_minutes: float = 1.5
    base_steps: int | None = None  # exact steps instead of minutes (deterministic; tests use it)
    depth: int = 4
    # data sizes (None: the sample whole; a full copy cut to 2,000 / 500 to stay within minutes)
    train_size: str | None = None
    val_size: str | None = None
    # fine-tuning: small steps so the sample's 40-odd questions give several steps per epoch
    num_epochs: int = 4
    target_examples_per_step: int = 8
    init_lr_frac: float = 0.5
    eval_limit: int | None = None
    device: str = "auto"


def run_demo(s):
    started = time.time()
    out = Path(s.out)
    data_dir, base_dir, runs_dir = out / "data", out / "base", out / "runs"

    print(f"\n== 1/4 data: ScienceQA from {s.scienceqa!r} -> {data_dir}")
    small = s.scienceqa == "sample"
    sizes = {"train": s.train_size or ("all" if small else "2000"), "val": s.val_size or ("all" if small else "500"),
             "test": "all" if small else "500"}
    report = sqa.prepare(s.scienceqa, data_dir, sizes={k: sqa.parse_size(v) for k, v in sizes.items()})
    print(report.format())

    print(f"\n== 2/4 tiny base model -> {base_dir}")
    tiny = TinySettings(out_base_dir=str(base_dir), scienceqa=s.scienceqa, depth=s.depth,
                        max_minutes=s.base_minutes, steps=s.base_steps, overwrite=True,
                        device=None if s.device == "auto" else s.device)
    train_tiny(tiny)

    print(f"\n== 3/4 fine-tune -> {runs_dir / 'demo'}")
    settings = TrainSettings(
        data_path=str(data_dir / "scienceqa_train.jsonl"), val_path=str(data_dir / "scienceqa_val.jsonl"),
        base_dir=str(base_dir), source="base", output_dir=str(runs_dir), output_tag="demo",
        num_epochs=s.num_epochs, target_examples_per_step=s.target_examples_per_step,
        init_lr_frac=s.init_lr_frac, eval_every=5, max_seq_len=512, save_every=0, device=s.device,
    )
    summary = train(settings)

    print("\n== 4/4 evaluate base vs fine-tuned on the validation split")
    run_dir = runs_dir / "demo"
    evaluation = evaluate_after_training(run_dir, data_path=str(data_dir / "scienceqa_val.jsonl"), split="val",
                                         limit=s.eval_limit, out_dir=str(out / "eval"), device=s.device)
    minutes = (time.time() - started) / 60
    print(f"\nDemo finished in {minutes:.1f} min. Files:")
    print(f"  data        {data_dir}/scienceqa_{{train,val,test}}.jsonl")
    print(f"  tiny base   {base_dir}/ (tokenizer/, base_checkpoints/)")
    print(f"  fine-tuned  {run_dir}/ (model_*.pt, meta_*.json, metrics.jsonl, loss_curve.png)")
    print(f"  evaluation  {out / 'eval'}/report.md, accuracy_by_category.png, samples.md")
    print(f"  chat with it: python -m sciassist.serve.chat_cli --checkpoint {run_dir}")
    return {"train": summary, "evaluation": evaluation, "minutes": minutes}


def main(argv=None):
    d = DemoSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scienceqa", default=d.scienceqa, help="sample | DIR (lupantech layout) | hf")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--base_minutes", type=float, default=d.base_minutes, help="pretraining budget of the tiny base")
    p.add_argument("--base_steps", type=int, default=None, help="exact pretraining steps instead of minutes")
    p.add_argument("--depth", type=int, default=d.depth, help="depth of the tiny base")
    p.add_argument("--train_size", default=d.train_size,
                   help="training questions (a number or all; default: all of the sample, 2000 of a full copy)")
    p.add_argument("--val_size", default=d.val_size,
                   help="validation questions (default: all of the sample, 500 of a full copy)")
    p.add_argument("--num_epochs", type=int, default=d.num_epochs)
    p.add_argument("--target_examples_per_step", type=int, default=d.target_examples_per_step)
    p.add_argument("--init_lr_frac", type=float, default=d.init_lr_frac)
    p.add_argument("--eval_limit", type=int, default=None, help="evaluate at most this many questions")
    p.add_argument("--device", default=d.device)
    args = p.parse_args(argv)
    try:
        run_demo(DemoSettings(**vars(args)))
    except (sqa.ScienceQAError, TinyError, TrainError, EvaluationError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)  # each stage's message says what to do
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
The whole pipeline in miniature, offline, on a CPU (`make demo`):

    1. data      ScienceQA as chat JSONL (the bundled sample, or --scienceqa DIR)
    2. base      a tiny tokenizer + base model trained here (a stand-in for d20/d32)
    3. finetune  SFT of that base on the training conversations (Muon + AdamW, packed)
    4. evaluate  base vs fine-tuned on the same validation questions: the ScienceQA table,
                 plots, side-by-side answers and a report

    python -m sciassist.pipelines.demo [--scienceqa sample|DIR] [--out_dir demo_output] [--base_steps N]

Everything lands under --out_dir; the last lines printed say where. The sample has 12
validation questions, so its accuracies only show that the pipeline runs; point
--scienceqa at a full local copy (e.g. ../shared/scienceqa) for numbers that mean
something, and download d20/d32 (`make download`) for a real tutor.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint import CheckpointError
from sciassist.common import (
    THREADS_HELP,
    UserError,
    announce_threads,
    check_fields,
    print_error,
    setting,
    settings_from_namespace,
    settings_parser,
)
from sciassist.data import scienceqa as sqa
from sciassist.data.prepare import prepare
from sciassist.eval.run import evaluate_after_training
from sciassist.pipelines.tiny import TinySettings, train_tiny
from sciassist.train.loop import train
from sciassist.train.settings import TrainSettings


@dataclass
class DemoSettings:
    scienceqa: str = setting("sample", "ScienceQA source: sample | DIR (lupantech layout) | hf")
    out_dir: str = setting("demo_output", "output folder")
    base_steps: int | None = setting(None, "pretraining steps of the tiny base (default: 4 passes over its text)",
                                     at_least=1)
    base_minutes: float | None = setting(None, "opt-in time limit of the tiny base instead (the steps then "
                                               "depend on the machine)", above=0)
    depth: int = setting(4, "depth of the tiny base")
    train_size: str | None = setting(None, "training questions, a number or all (default: all of the sample, "
                                           "2000 of a full copy)")
    val_size: str | None = setting(None, "validation questions (default: all of the sample, 500 of a full copy)")
    # fine-tuning: small steps so the sample's 40-odd questions give several steps per epoch
    num_epochs: int = setting(4, "fine-tuning passes over the training questions")
    target_examples_per_step: int = setting(8, "conversations per fine-tuning step")
    init_lr_frac: float = setting(0.5, "fine-tuning learning rates x this")
    eval_limit: int | None = setting(None, "evaluate at most this many questions")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int = setting(1, THREADS_HELP, at_least=1, at_most=4096)


def run_demo(s):
    check_fields(s)
    started = time.time()
    announce_threads(s.threads)
    out = Path(s.out_dir)
    data_dir, base_dir, runs_dir = out / "data", out / "base", out / "runs"

    print(f"\n== 1/4 data: ScienceQA from {s.scienceqa!r} -> {data_dir}")
    small = s.scienceqa == "sample"
    sizes = {"train": s.train_size or ("all" if small else "2000"), "val": s.val_size or ("all" if small else "500"),
             "test": "all" if small else "500"}
    report = prepare(s.scienceqa, data_dir, sizes={k: sqa.parse_size(v) for k, v in sizes.items()})
    print(report.format())

    print(f"\n== 2/4 tiny base model -> {base_dir}")
    tiny = TinySettings(out_dir=str(base_dir), scienceqa=s.scienceqa, depth=s.depth,
                        max_minutes=s.base_minutes, steps=s.base_steps, overwrite=True, device=s.device,
                        threads=s.threads)
    train_tiny(tiny)

    print(f"\n== 3/4 fine-tune -> {runs_dir / 'demo'}")
    settings = TrainSettings(
        data_path=str(data_dir / "scienceqa_train.jsonl"), val_path=str(data_dir / "scienceqa_val.jsonl"),
        base_dir=str(base_dir), source="base", out_dir=str(runs_dir), output_tag="demo",
        num_epochs=s.num_epochs, target_examples_per_step=s.target_examples_per_step,
        init_lr_frac=s.init_lr_frac, eval_every=5, max_seq_len=512, save_every=0, device=s.device,
        threads=s.threads,
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
    print(what_the_numbers_mean(s, report, evaluation))
    return {"train": summary, "evaluation": evaluation, "minutes": minutes}


def what_the_numbers_mean(s, report, evaluation):
    """The demo's last lines: where its numbers come from, why the generated row can be 0, and
    where real numbers come from."""
    count = evaluation["data"]["count"]
    trained = report.splits["train"].kept
    source = ("the bundled toy sample (66 questions in all)" if s.scienceqa == "sample"
              else f"a {trained}-question subset of {s.scienceqa}")
    return (f"\nThese numbers come from {source}: {trained} training questions, {count} evaluated, on a tiny "
            f"base trained for seconds. They show that every stage runs, not how good a model gets.\n"
            f"A generated answer counts only when the reply parses strictly as \"The correct answer is X. "
            f"<option>\"; a model this small, fine-tuned on a few dozen questions, rarely writes that line whole, "
            f"so the generated rows can be 0.00 while scored accuracy (the answer the model finds likeliest) "
            f"is not.\nFor real numbers: make recipe-cpu SCIENCEQA=DIR (the CPU recipe: about 45 minutes on 2 "
            f"AVX2 cores, it prints its own estimate; README, \"Results\").")


def main(argv=None):
    parser = settings_parser(DemoSettings, "python -m sciassist.pipelines.demo", __doc__,
                             renamed={"--out": "--out_dir"})
    try:
        run_demo(settings_from_namespace(DemoSettings, parser.parse_args(argv)))
    except (UserError, CheckpointError) as e:
        return print_error(e)  # one `error:` line, exit code 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
LoRA (--lora_rank) vs full fine-tuning: what one step costs, which optimizer the adapters get,
and what a short fine-tune of the same small base reaches.

    python bench/bench_lora.py memory [--depth 20] [--rank 16] [--seq 256]
    python bench/bench_lora.py optimizers --base_dir B --data_dir D [--steps 24]
    python bench/bench_lora.py accuracy --base_dir B --data_dir D [--steps 24] [--limit 300]

memory: a random nanochat model of config_for_depth(depth) (vocab 65,536), one training step
(forward + backward + the optimizers' first step, which allocates their state) on one row of
--seq random tokens, full fine-tuning (Muon + AdamW, nanochat.optim) vs LoRA (sciassist.train.lora:
peft adapters on every block projection, Muon on them). Each case runs in its own process;
memory is the process's resident set (RSS): "model" is RSS once the model (and adapters) exist,
"step peak" is the peak RSS (getrusage ru_maxrss) after the step, and the step's memory is the
difference, i.e. what training adds on top of holding the model: gradients, optimizer state and
activations.

optimizers / accuracy: sciassist.train.loop.train on prepared ScienceQA files (<data_dir>/scienceqa_
{train,val}.jsonl, made by sciassist.data.prepare) from the base in <base_dir> (made by
`python -m sciassist.pipelines.tiny`), every run the same steps and data. "optimizers" trains
LoRA adapters with AdamW and with Muon (torch.optim.Muon as nanochat.optim sets it up) at a few
learning rates each and prints the best validation loss each reached; "accuracy" compares a full
fine-tune with a LoRA one: validation loss, and the accuracy of sciassist.eval.run.evaluate
(choice scoring: the option whose whole text is likeliest) on the first --limit validation questions.
"""

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from nanochat.gpt import GPT, config_for_depth  # noqa: E402
from nanochat.optim import ADAMW_BETAS, ADAMW_EPS  # noqa: E402
from sciassist.train import lora, setup  # noqa: E402
from sciassist.train.settings import TrainSettings  # noqa: E402


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_step_case(depth, rank, seq, threads):
    """Runs in a child process; prints one JSON line."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(config_for_depth(depth))
    model.init_weights()
    with torch.no_grad():  # non-zero output projections, as in a trained model (every matrix gets a gradient)
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    if rank:
        settings = TrainSettings(lora_rank=rank)
        lora.add_adapters(model, settings)
        optimizers = lora.adapter_optimizers(model, settings)
    else:
        optimizers = model.setup_optimizers()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    idx = torch.randint(0, model.config.vocab_size, (1, seq + 1))
    before = rss_bytes()
    t0 = time.perf_counter()
    loss = model(idx[:, :-1], idx[:, 1:], loss_reduction="sum")
    loss.backward()
    for opt in optimizers:
        opt.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"rank": rank, "trainable": trainable, "total": total, "model_rss": before,
                      "peak_rss": peak, "step_s": seconds}))


def memory(args):
    rows = []
    for rank in (0, args.rank):
        out = subprocess.run([sys.executable, __file__, "_case", str(args.depth), str(rank), str(args.seq),
                              str(args.threads)], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    gib = 2**30
    print(f"\nd{args.depth} (config_for_depth({args.depth}), vocab 65,536), one step on 1 x {args.seq} tokens, CPU, "
          f"{args.threads} thread(s); memory = process RSS\n")
    print("| | trainable params | all params | RSS with model | peak RSS in step | step adds | step time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "full (Muon + AdamW)" if r["rank"] == 0 else f"LoRA r={r['rank']} (Muon)"
        print(f"| {name} | {r['trainable']:,} | {r['total']:,} | {r['model_rss'] / gib:.2f} GiB | "
              f"{r['peak_rss'] / gib:.2f} GiB | {(r['peak_rss'] - r['model_rss']) / gib:.2f} GiB | "
              f"{r['step_s']:.1f} s |")
    full, low = rows
    print(f"| LoRA / full | {low['trainable'] / full['trainable']:.4f} | | | {low['peak_rss'] / full['peak_rss']:.2f} "
          f"| {(low['peak_rss'] - low['model_rss']) / (full['peak_rss'] - full['model_rss']):.2f} | "
          f"{low['step_s'] / full['step_s']:.2f} |")


def short_run(args, out_dir, tag, **overrides):
    from sciassist.train.loop import train
    settings = TrainSettings(
        data_path=str(Path(args.data_dir) / "scienceqa_train.jsonl"),
        val_path=str(Path(args.data_dir) / "scienceqa_val.jsonl"), base_dir=args.base_dir, source="base",
        out_dir=str(out_dir), output_tag=tag, num_iterations=args.steps, target_examples_per_step=args.batch,
        device_batch_size=args.batch, eval_every=max(1, args.steps // 4), eval_steps=max(1, args.val // args.batch),
        max_seq_len=512, save_every=0, device="cpu", **overrides)
    summary = train(settings)
    return settings, summary


def adamw_adapter_optimizers(model, settings):
    """The alternative measured against Muon: AdamW (nanochat's betas and eps) on the adapters."""
    params = [p for _, p in lora.adapter_parameters(model)]
    opt = torch.optim.AdamW(params, lr=settings.lora_lr * settings.init_lr_frac, betas=ADAMW_BETAS, eps=ADAMW_EPS,
                            weight_decay=0.0, fused=params[0].device.type == "cuda")
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return [opt]


def optimizers(args):
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, lrs in (("adamw", args.adamw_lrs), ("muon", args.muon_lrs)):
            # the training run builds its adapters' optimizers with setup.adapter_optimizers
            setup.adapter_optimizers = adamw_adapter_optimizers if kind == "adamw" else lora.adapter_optimizers
            for lr in lrs:
                _, s = short_run(args, tmp, f"{kind}_{lr}", lora_rank=args.rank, lora_lr=lr,
                                 init_lr_frac=args.init_lr_frac)
                results.append((kind, lr, s["initial_val_loss"], s["best_val_loss"], s["final_val_loss"]))
        setup.adapter_optimizers = lora.adapter_optimizers
    print(f"\nLoRA r={args.rank} adapters, {args.steps} steps of {args.batch} conversations, lr = lora_lr x "
          f"init_lr_frac {args.init_lr_frac} (linear decay), val loss on {args.val} conversations\n")
    print("| optimizer | lora_lr | val loss at start | best val loss | final val loss |")
    print("|---|---:|---:|---:|---:|")
    for kind, lr, v0, best, final in results:
        print(f"| {kind} | {lr:g} | {v0:.4f} | {best:.4f} | {final:.4f} |")


def accuracy(args):
    from sciassist.eval.run import EvalSettings, evaluate
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("full", dict(init_lr_frac=args.full_init_lr_frac)),
                                (f"LoRA r={args.rank}", dict(lora_rank=args.rank, lora_lr=args.lora_lr,
                                                             init_lr_frac=args.init_lr_frac))):
            tag = "full" if "lora_rank" not in overrides else "lora"
            t0 = time.perf_counter()
            _, s = short_run(args, tmp, tag, **overrides)
            train_s = time.perf_counter() - t0
            result = evaluate(EvalSettings(finetuned=str(Path(tmp) / tag), base=None,
                                           data_path=str(Path(args.data_dir) / "scienceqa_val.jsonl"), split="val",
                                           limit=args.limit, scoring="choice", generate=False, num_samples=0,
                                           out_dir=str(Path(tmp) / f"eval_{tag}"), device="cpu"))
            rows.append((name, s, train_s, result))
    print(f"\n{args.steps} steps of {args.batch} conversations from the same base; accuracy: choice scoring on "
          f"the first {args.limit} validation questions\n")
    print("| fine-tune | val loss start | best val loss | val accuracy | train time |")
    print("|---|---:|---:|---:|---:|")
    for name, s, train_s, result in rows:
        print(f"| {name} | {s['initial_val_loss']:.4f} | {s['best_val_loss']:.4f} | {_accuracy(result)} | "
              f"{train_s:.0f} s |")


def _accuracy(result):
    """The fine-tuned model's overall accuracy from evaluate()'s summary, as text."""
    for key in ("finetuned", "models"):
        part = result.get(key)
        if isinstance(part, dict):
            part = part.get("finetuned", part)
            for k in ("accuracy", "choice_accuracy", "overall"):
                if isinstance(part.get(k), (int, float)):
                    return f"{part[k]:.1%}"
    return "see the table printed above"


def main():
    if sys.argv[1:2] == ["_case"]:
        depth, rank, seq, threads = map(int, sys.argv[2:6])
        return one_step_case(depth, rank, seq, threads)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--depth", type=int, default=20)
    m.add_argument("--rank", type=int, default=16)
    m.add_argument("--seq", type=int, default=256)
    m.add_argument("--threads", type=int, default=2)
    for name in ("optimizers", "accuracy"):
        p = sub.add_parser(name)
        p.add_argument("--base_dir", required=True)
        p.add_argument("--data_dir", required=True)
        p.add_argument("--steps", type=int, default=24)
        p.add_argument("--batch", type=int, default=16)
        p.add_argument("--val", type=int, default=96, help="validation conversations for the loss")
        p.add_argument("--rank", type=int, default=16)
        p.add_argument("--init_lr_frac", type=float, default=0.5)
        if name == "optimizers":
            p.add_argument("--adamw_lrs", type=float, nargs="+", default=[0.005, 0.02, 0.08])
            p.add_argument("--muon_lrs", type=float, nargs="+", default=[0.005, 0.02, 0.08])
        else:
            p.add_argument("--lora_lr", type=float, default=lora_lr_default())
            p.add_argument("--full_init_lr_frac", type=float, default=0.5)
            p.add_argument("--limit", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    {"memory": memory, "optimizers": optimizers, "accuracy": accuracy}[args.what](args)


def lora_lr_default():
    return next(f.default for f in dataclasses.fields(TrainSettings) if f.name == "lora_lr")


if __name__ == "__main__":
    main()

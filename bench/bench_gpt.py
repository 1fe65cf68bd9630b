"""
Forward+backward throughput and MFU of a random-init nanochat GPT.

    python bench/bench_gpt.py                              # CPU: depths 2 and 4, short rows
    python bench/bench_gpt.py --device cuda --depths 20 --batch 8 --seq_len 2048 --compile

Prints one table row per depth: parameters, tokens/s, MFU (against the GPU's dense bf16
peak; n/a on CPU) and peak memory.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nanochat.gpt import GPT, config_for_depth  # noqa: E402
from sciassist.common import autocast  # noqa: E402
from sciassist.train.step import peak_flops  # noqa: E402


def bench_depth(depth, args, device):
    config = config_for_depth(depth, vocab_size=args.vocab_size, sequence_len=args.seq_len)
    model = GPT(config).to(device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    step_model = torch.compile(model) if args.compile else model
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device)
    def step():
        with autocast(device):
            loss = step_model(idx, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    tokens_per_s = args.batch * args.seq_len * args.steps / seconds
    peak = peak_flops(device)
    mfu = model.estimate_flops() * tokens_per_s / peak if peak else None
    memory_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return model.num_params(), tokens_per_s, mfu, memory_gb


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; batch {args.batch} x {args.seq_len} tokens, vocab {args.vocab_size}, "
          f"compile={args.compile}, torch {torch.__version__}")
    print("| depth | params | tokens/s | MFU | peak memory (GB) |")
    print("|---|---|---|---|---|")
    for depth in args.depths:
        params, tps, mfu, mem = bench_depth(depth, args, device)
        mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a"
        mem_s = f"{mem:.1f}" if mem is not None else "n/a"
        print(f"| {depth} | {params / 1e6:.1f}M | {tps:,.0f} | {mfu_s} | {mem_s} |")


if __name__ == "__main__":
    main()

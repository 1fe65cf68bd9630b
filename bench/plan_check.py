"""
The memory planner's activation model (sciassist.train.plan.activation_bytes) against measured
peaks on CPU (fp32, as training runs there).

    python bench/plan_check.py [--threads 2] [--append]

Each configuration runs in its own process: a random GPT (bench/random_model.py) whose gradients
are already allocated (zeros, as after the first step), rows packed with 4 conversations each,
every position supervised. "measured" is the process's peak resident set (VmHWM, reset just before
the step through /proc/self/clear_refs) during one forward + backward, minus the resident set just
before it: what the step's activations and their backward transients take. --append adds the table
to bench/RESULTS.md.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from random_model import random_gpt  # noqa: E402

from nanochat.gpt import config_for_depth  # noqa: E402
from sciassist.train.plan import activation_bytes  # noqa: E402

# (depth, vocab, batch, row length): depth 4-8, vocab 4,096-65,536, rows 256-1024; the last one
# has more than 2^27 supervised logits, so the chunked loss is in play.
CONFIGS = [(4, 4096, 1, 256), (4, 4096, 2, 1024), (4, 65536, 1, 512), (6, 16384, 2, 512), (8, 32768, 1, 1024),
           (6, 65536, 4, 1024)]


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak():
    """Reset VmHWM (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def packed_batch(vocab, batch, seq, docs_per_row=4):
    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (batch, seq))
    targets = torch.randint(0, vocab, (batch, seq))
    doc_ids = (torch.arange(seq) * docs_per_row // seq).expand(batch, seq).contiguous()
    return idx, targets, doc_ids


def measure_case(depth, vocab, batch, seq, threads):
    """In a child process: one JSON line {measured, step_s, reset}."""
    torch.set_num_threads(threads)
    model = random_gpt(config_for_depth(depth, vocab_size=vocab, sequence_len=max(seq, 256)), "cpu")
    model.train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    idx, targets, doc_ids = packed_batch(vocab, batch, seq)
    reset = reset_peak()
    before = rss_bytes()
    t0 = time.perf_counter()
    loss = model(idx, targets, loss_reduction="sum", doc_ids=doc_ids)
    loss.backward()
    seconds = time.perf_counter() - t0
    print(json.dumps({"measured": peak_rss() - before, "step_s": seconds, "reset": reset}))


def run_case(depth, vocab, batch, seq, threads):
    out = subprocess.run([sys.executable, __file__, "_case", str(depth), str(vocab), str(batch), str(seq),
                          str(threads)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def check(configs=CONFIGS, threads=2):
    rows = []
    for depth, vocab, batch, seq in configs:
        config = config_for_depth(depth, vocab_size=vocab, sequence_len=max(seq, 256))
        estimate = activation_bytes(config, batch, seq, bf16=False, chunked=True)["total"]
        got = run_case(depth, vocab, batch, seq, threads)
        rows.append({"depth": depth, "n_embd": config.n_embd, "vocab": vocab, "batch": batch, "seq": seq,
                     "estimate": estimate, "measured": got["measured"], "step_s": got["step_s"],
                     "ratio": estimate / got["measured"], "peak_reset": got["reset"]})
    return rows


def table(rows, threads):
    mib = 2**20
    lines = [f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads), "
             "fp32, one forward + backward of packed rows (4 conversations each, every position "
             "supervised), gradients pre-allocated; measured = peak RSS in the step - RSS before it", "",
             "| depth | n_embd | vocab | batch x row | estimate | measured | estimate / measured | step |",
             "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['n_embd']} | {r['vocab']:,} | {r['batch']} x {r['seq']} | "
                     f"{r['estimate'] / mib:.0f} MiB | {r['measured'] / mib:.0f} MiB | {r['ratio']:.2f} | "
                     f"{r['step_s']:.1f} s |")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    lines += ["", f"largest deviation: {worst:.0%} (goal: within 20%)"]
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["_case"]:
        return measure_case(*map(int, sys.argv[2:7]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--append", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    text = table(check(threads=args.threads), args.threads)
    print(text)
    if args.append:
        with open(REPO_ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write("\n## Memory planner vs measured: `python bench/plan_check.py` (CPU)\n\n" + text + "\n")


if __name__ == "__main__":
    main()

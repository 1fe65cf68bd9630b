"""
The memory planner's activation model (sciassist.train.plan.activation_bytes) against measured
peaks on CPU (fp32, as training runs there), for full fine-tuning and for LoRA.

    python bench/plan_check.py [--threads 2] [--only full|lora|rl|all] [--append]
    python bench/plan_check.py --d20          the planner beside bench_lora.py's measured d20 step

Each configuration runs in its own process: a random GPT (bench/random_model.py) whose gradients
are already allocated (zeros, as after the first step), rows packed with 4 conversations each,
every position supervised. "measured" is the process's peak resident set (VmHWM, reset just before
the step through /proc/self/clear_refs) during one forward + backward, minus the resident set just
before it: what the step's activations and their backward transients take. The LoRA cases add the
adapters of sciassist.train.lora.add_adapters (rank, targets, dropout as listed; their gradients
pre-allocated, the frozen base has none) to the same random model, and each is measured twice: with
glibc's default malloc, and with MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB so that every freed tensor's
pages go back at once and the peak is that of live tensors (by default glibc raises the threshold
after the first large free and keeps freed forward transients resident: peft's forward makes more
of them, the base output and the adapter's path per Linear). --append adds the tables to
bench/RESULTS.md. --d20 runs nothing heavy: it prints the planner's figures for the d20 step that
`bench_lora.py memory --depth 20 --rank 16` measured (quoted from bench/RESULTS.md, minutes to re-run).

--only rl checks the RL stage's plan (sciassist.train.plan.rl_plan) the same way, each case in its own
process on a random GPT: the update (one forward + backward of the policy gradient, sciassist.train.rl_step's
objective: rows of prompt + reply, targets -1 on the prompt, loss_reduction="none" weighted by an advantage
per row; gradients pre-allocated) against activation_bytes of those rows, and the rollout (one
Engine.generate_multi call in fp32 of `rows` prompts, each distinct one given for k rows, decoding
every one of max_new_tokens tokens, the stop tokens outside the vocabulary) against rollout_bytes
(KV cache + prefill transient).
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
from sciassist.train.plan import LoraShape, activation_bytes, memory_plan, rollout_bytes  # noqa: E402
from sciassist.train.settings import LORA_TARGETS  # noqa: E402

# (depth, vocab, batch, row length): depth 4-8, vocab 4,096-65,536, rows 256-1024; the last one
# has more than 2^27 supervised logits, so the chunked loss is in play.
CONFIGS = [(4, 4096, 1, 256), (4, 4096, 2, 1024), (4, 65536, 1, 512), (6, 16384, 2, 512), (8, 32768, 1, 1024),
           (6, 65536, 4, 1024)]
ALL_TARGETS = ",".join(LORA_TARGETS)
# (depth, vocab, batch, row length, rank, targets, dropout): depth 4 (n_embd 256), LoRA r=16 on every
# projection, on two of them, and with dropout; rank 0 is the same shape's full fine-tune, for reference.
LORA_CONFIGS = [(4, 4096, 2, 1024, 0, "", 0.0), (4, 4096, 2, 1024, 16, ALL_TARGETS, 0.0),
                (4, 4096, 2, 1024, 16, "c_q,c_v", 0.0), (4, 4096, 2, 1024, 16, ALL_TARGETS, 0.1),
                (4, 65536, 1, 512, 16, ALL_TARGETS, 0.0)]
# bench_lora.py memory --depth 20 --rank 16 (bench/RESULTS.md "LoRA vs full fine-tuning"): fp32, 1 x 256
# tokens, one step with the optimizers' step, ru_maxrss; the LoRA row's adapters had AdamW then.
# (depth, vocab, rows, k, prompt, reply): the RL stage's rows; rollout rows are a generation batch of
# rows / k distinct prompts, k rows each (k = 1: all different, then the update is measured too: a
# device batch of those rows).
RL_CONFIGS = [(4, 4096, 8, 1, 256, 128), (4, 16384, 4, 1, 384, 128), (6, 32768, 8, 1, 256, 64),
              (6, 65536, 2, 1, 512, 256), (4, 16384, 16, 8, 384, 128), (6, 65536, 8, 4, 512, 128)]
LIVE_TENSORS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # no dynamic threshold: frees return pages
D20_MEASURED_GIB = {"full": {"model": 2.40, "peak": 7.78, "step": 5.37},
                    "lora": {"model": 2.47, "peak": 3.71, "step": 1.24}}


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


def measure_case(depth, vocab, batch, seq, threads, rank=0, targets="", dropout=0.0):
    """In a child process: one JSON line {measured, step_s, reset}; rank > 0: with LoRA adapters."""
    torch.set_num_threads(threads)
    model = random_gpt(config_for_depth(depth, vocab_size=vocab, sequence_len=max(seq, 256)), "cpu")
    model.train()
    if rank:
        from sciassist.train.lora import add_adapters
        from sciassist.train.settings import TrainSettings
        add_adapters(model, TrainSettings(lora_rank=rank, lora_targets=targets, lora_dropout=dropout))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    idx, targets, doc_ids = packed_batch(vocab, batch, seq)
    reset = reset_peak()
    before = rss_bytes()
    t0 = time.perf_counter()
    loss = model(idx, targets, loss_reduction="sum", doc_ids=doc_ids)
    loss.backward()
    seconds = time.perf_counter() - t0
    print(json.dumps({"measured": peak_rss() - before, "step_s": seconds, "reset": reset}))


class StopOutsideVocab:
    """What Engine needs of a tokenizer, its stop tokens outside the vocabulary (never sampled)."""

    def __init__(self, vocab):
        self.vocab = vocab

    def encode_special(self, name):
        return self.vocab + 1

    def get_bos_token_id(self):
        return self.vocab + 2


def measure_rl_case(part, depth, vocab, rows, k, prompt, reply, threads):
    """In a child process: one JSON line {measured, step_s, reset} of the RL update or rollout."""
    from nanochat.engine import Engine
    torch.set_num_threads(threads)
    model = random_gpt(config_for_depth(depth, vocab_size=vocab, sequence_len=max(prompt + reply, 256)), "cpu")
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (rows, prompt + reply))
    if part == "update":
        model.train()
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        inputs, targets = ids[:, :-1], ids[:, 1:].clone()
        targets[:, :prompt - 1] = -1
        advantages = torch.linspace(-1, 1, rows)
    else:
        model.eval()
        engine = Engine(model, StopOutsideVocab(vocab), torch.float32)
        prompts = [p for p in ids[:rows // k, :prompt].tolist() for _ in range(k)]
    reset = reset_peak()
    before = rss_bytes()
    t0 = time.perf_counter()
    if part == "update":
        neg_logp = model(inputs, targets, loss_reduction="none")
        (neg_logp * advantages.unsqueeze(1)).sum().backward()
    else:
        replies = engine.generate_multi(prompts, max_tokens=reply, temperature=1.0, top_k=50)
        assert all(len(r) == reply for r in replies)
    seconds = time.perf_counter() - t0
    print(json.dumps({"measured": peak_rss() - before, "step_s": seconds, "reset": reset}))


def check_rl(configs=RL_CONFIGS, threads=2):
    """The RL cases: update and rollout, estimate vs measured."""
    rows_out = []
    for depth, vocab, rows, k, prompt, reply in configs:
        config = config_for_depth(depth, vocab_size=vocab, sequence_len=max(prompt + reply, 256))
        estimates = {}
        if k == 1:
            estimates["update"] = activation_bytes(config, rows, prompt + reply - 1, bf16=False)["total"]
        estimates["rollout"] = rollout_bytes(config, rows, prompt, reply, bf16=False, distinct=rows // k)["total"]
        for part, estimate in estimates.items():
            out = subprocess.run([sys.executable, __file__, "_rl_case", part, str(depth), str(vocab), str(rows),
                                  str(k), str(prompt), str(reply), str(threads)],
                                 check=True, capture_output=True, text=True).stdout
            got = json.loads(out.strip().splitlines()[-1])
            rows_out.append({"part": part, "depth": depth, "n_embd": config.n_embd, "vocab": vocab, "rows": rows,
                             "k": k, "prompt": prompt, "reply": reply, "estimate": estimate,
                             "measured": got["measured"], "step_s": got["step_s"], "ratio": estimate / got["measured"]})
    return rows_out


def rl_check_table(rows, threads):
    mib = 2**20
    lines = [f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads), "
             "fp32, random GPTs; update = one forward + backward of the policy gradient (targets -1 on the "
             "prompt, loss_reduction none x an advantage per row, gradients pre-allocated) vs activation_bytes; "
             "rollout = one generate_multi call (every row decodes all its tokens) vs rollout_bytes (KV cache + "
             "prefill); measured = peak RSS in it - RSS before it", "",
             "| part | depth | n_embd | vocab | rows x (prompt + reply) | rows per prompt | estimate | measured | "
             "estimate / measured | time |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['part']} | {r['depth']} | {r['n_embd']} | {r['vocab']:,} | {r['rows']} x ({r['prompt']} "
                     f"+ {r['reply']}) | {r['k']} | {r['estimate'] / mib:.0f} MiB | {r['measured'] / mib:.0f} MiB | "
                     f"{r['ratio']:.2f} | {r['step_s']:.1f} s |")
    worst = {part: max(abs(r["ratio"] - 1) for r in rows if r["part"] == part) for part in ("update", "rollout")}
    lines += ["", f"largest deviation: update {worst['update']:.0%}, rollout {worst['rollout']:.0%} (goal: within "
                  "20-30%)"]
    return "\n".join(lines)


def run_case(depth, vocab, batch, seq, threads, rank=0, targets="", dropout=0.0, env=None):
    out = subprocess.run([sys.executable, __file__, "_case", str(depth), str(vocab), str(batch), str(seq),
                          str(threads), str(rank), targets or "-", str(dropout)],
                         check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}).stdout
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


def check_lora(configs=LORA_CONFIGS, threads=2):
    """The LoRA cases: estimate (activation_bytes with the LoRA shape) vs the measured step."""
    rows = []
    for depth, vocab, batch, seq, rank, targets, dropout in configs:
        config = config_for_depth(depth, vocab_size=vocab, sequence_len=max(seq, 256))
        shape = LoraShape(rank, tuple(targets.split(",")), dropout) if rank else None
        estimate = activation_bytes(config, batch, seq, bf16=False, chunked=True, lora=shape)["total"]
        got = run_case(depth, vocab, batch, seq, threads, rank, targets, dropout)
        live = run_case(depth, vocab, batch, seq, threads, rank, targets, dropout, env=LIVE_TENSORS_ENV)
        rows.append({"depth": depth, "n_embd": config.n_embd, "vocab": vocab, "batch": batch, "seq": seq,
                     "rank": rank, "targets": targets, "dropout": dropout, "estimate": estimate,
                     "measured": got["measured"], "step_s": got["step_s"], "ratio": estimate / got["measured"],
                     "live": live["measured"], "live_ratio": estimate / live["measured"]})
    return rows


def lora_table(rows, threads):
    mib = 2**20
    lines = [f"CPU ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads), "
             "fp32, LoRA (sciassist.train.lora.add_adapters) on the same random models, adapter gradients "
             "pre-allocated; rank 0 = full fine-tuning of the same shape", "",
             "| depth | n_embd | vocab | batch x row | LoRA | estimate | measured | estimate / measured | "
             "measured, live tensors | estimate / live | step |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        what = (f"r={r['rank']} on {r['targets'].replace(',', ', ')}"
                + (f", dropout {r['dropout']:g}" if r["dropout"] else "")) if r["rank"] else "none (full)"
        lines.append(f"| {r['depth']} | {r['n_embd']} | {r['vocab']:,} | {r['batch']} x {r['seq']} | {what} | "
                     f"{r['estimate'] / mib:.0f} MiB | {r['measured'] / mib:.0f} MiB | {r['ratio']:.2f} | "
                     f"{r['live'] / mib:.0f} MiB | {r['live_ratio']:.2f} | {r['step_s']:.1f} s |")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    live = max(abs(r["live_ratio"] - 1) for r in rows)
    lines += ["", f"largest deviation: {worst:.0%} against glibc's default, {live:.0%} against live tensors "
                  "(goal: within 20%)"]
    return "\n".join(lines)


def d20_table():
    """The planner (fp32, 1 x 256, r=16 on every projection) beside bench_lora.py's measured d20 step;
    the LoRA estimate with AdamW on the adapters, as that measurement had."""
    gib = 2**30
    plans = {"full": memory_plan(config_for_depth(20), 1, 256, bf16=False),
             "lora": memory_plan(config_for_depth(20), 1, 256, bf16=False, lora=LoraShape(16, optimizer="adamw"))}
    lines = ["| d20, 1 x 256, fp32 | planned weights | measured RSS with model | planned grads + optimizer + "
             "activations | measured step adds | planned total | measured peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, p in plans.items():
        m = D20_MEASURED_GIB[name]
        step = p["grads"] + p["optimizer"] + p["activations"]
        label = "full (Muon + AdamW)" if name == "full" else "LoRA r=16, all 6 projections (AdamW)"
        lines.append(f"| {label} | {p['params'] / gib:.2f} GiB | {m['model']:.2f} GiB | {step / gib:.2f} GiB | "
                     f"{m['step']:.2f} GiB | {p['total'] / gib:.2f} GiB | {m['peak']:.2f} GiB |")
    return "\n".join(lines)


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
    if sys.argv[1:2] == ["_rl_case"]:
        return measure_rl_case(sys.argv[2], *map(int, sys.argv[3:10]))
    if sys.argv[1:2] == ["_case"]:
        ints, (targets, dropout) = list(map(int, sys.argv[2:8])), sys.argv[8:10]
        return measure_case(*ints, targets="" if targets == "-" else targets, dropout=float(dropout))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", choices=("full", "lora", "rl", "all"), default="all")
    parser.add_argument("--d20", action="store_true", help="only the planner beside the quoted d20 measurement")
    parser.add_argument("--append", action="store_true", help="append the tables to bench/RESULTS.md")
    args = parser.parse_args()
    if args.d20:
        return print(d20_table())
    texts = []
    if args.only in ("full", "all"):
        texts.append(("", table(check(threads=args.threads), args.threads)))
    if args.only in ("lora", "all"):
        texts.append((" with LoRA", lora_table(check_lora(threads=args.threads), args.threads)))
    if args.only in ("rl", "all"):
        texts.append((", the RL stage", rl_check_table(check_rl(threads=args.threads), args.threads)))
    for heading, text in texts:
        print(text + "\n")
        if args.append:
            with open(REPO_ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
                f.write(f"\n## Memory planner vs measured{heading}: `python bench/plan_check.py` (CPU)\n\n{text}\n")


if __name__ == "__main__":
    main()

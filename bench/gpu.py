"""
The GPU benchmark, in one call: for a random-init d20 (and d32 when memory allows), training
tokens/s and MFU per attention kernel and device batch, the peak memory of each beside the memory
planner's estimate, then letter-scoring questions/s and generation tokens/s.

    python bench/gpu.py --out DIR [--depths 20 32] [--budget_s 420]      on a CUDA machine
    python bench/gpu.py --smoke --out DIR                                  the same code, tiny, on CPU

Training: the real step (sciassist.train.step.accumulate_gradients + the Muon/AdamW update of
nanochat.optim, bf16 autocast) on packed rows of --seq positions: conversations of 64..seq/2
tokens, each supervised on its second half, the row's tail padded. Tokens/s and MFU count only
real tokens (not the padding); MFU = estimate_flops() x real tokens/s / sciassist.train.step.
peak_flops. Every kernel of nanochat.attention ("varlen", "flex", "dense"; "loop" and "dense" on
CPU) is tried at device batch 1, 2, 4, 8, 16 until the card runs out of memory. Peak memory is
torch.cuda.max_memory_allocated over the timed steps; the planner's estimate
(sciassist.train.plan.memory_plan) is given for the same supervised fraction and for every
position supervised (its worst case, what --dry_run prints).

On CUDA the first kernel's largest batch (at most 8) runs once more compiled as training
compiles it (--compile, on by default on CUDA), beside its eager row.

--device_batch_size auto, first for each model: the batch the planner gives this card's free memory
(rows of --seq positions, bf16), the batch proven by sciassist.train.batch.prove (a forward and
backward of that shape with the optimizer states held aside, halved on out-of-memory), and the
peak memory of one real step (forward, backward, update) at the proven batch beside the plan's
figure for it. (--smoke: a simulated 64 MB card on the CPU, no peak.)

Kernel checks, first: every kernel's self-check (nanochat.attention.check_kernel: forward and
backward on a small random packed batch against the written-out reference) for the compute
dtype the precision policy gives this GPU and for fp32, with nanochat's head shape and with
grouped-query heads, the kernel --attention_kernel auto picks, and how many device-to-host
synchronisations one training forward makes (torch.cuda.set_sync_debug_mode; CUDA only).

Evaluation: sciassist.eval.scoring.letter_scores over the bundled sample questions (repeated),
and greedy batched generation (nanochat.engine.Engine.generate_multi) of --gen_tokens tokens.
The tokenizer is a small one trained on those questions (its ids index the model's 65,536-row
embedding; with it prompts are longer than with the published tokenizer, so questions/s is a
lower bound).

Writes DIR/gpu_bench.json and DIR/gpu_bench.md; prints the markdown.
"""

import argparse
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from random_model import random_gpt  # noqa: E402

from nanochat import attention  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.gpt import GPTConfig, config_for_depth  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from sciassist.common import autocast, precision_for, synchronize  # noqa: E402
from sciassist.eval.scoring import letter_scores  # noqa: E402
from sciassist.memory import Card, OutOfMemory, card_of, is_out_of_memory  # noqa: E402
from sciassist.train import batch as device_batch  # noqa: E402
from sciassist.train import plan  # noqa: E402
from sciassist.train.settings import TrainSettings  # noqa: E402
from sciassist.train.step import accumulate_gradients, apply_update, peak_flops  # noqa: E402

BATCHES = (1, 2, 4, 8, 16)
GPU_KERNELS = ("varlen", "flex", "dense")
CPU_KERNELS = ("dense", "loop")
SAMPLE = REPO_ROOT / "sciassist" / "data" / "sample" / "questions.jsonl"


def sample_questions():
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts, counts = [], []
    for r in records:
        if not r.get("choices"):
            continue
        options = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(r["choices"]))
        prompts.append([{"role": "user", "content": f"{r['question']}\n{options}"}])
        counts.append(len(r["choices"]))
    return prompts, counts


def small_tokenizer(prompts, vocab_size):
    texts = [m[0]["content"] for m in prompts] + ["The correct answer is A. Explanation: because."]
    return Tokenizer.train_from_iterator(texts * 4, vocab_size=vocab_size)


def packed_rows(batch, seq, vocab, device, seed=0):
    """inputs/targets/layout/supervised_index of `batch` packed rows, as the collator gives
    them, and (real tokens, supervised tokens)."""
    g = torch.Generator().manual_seed(seed)
    inputs = torch.zeros(batch, seq, dtype=torch.long)
    targets = torch.full((batch, seq), -1, dtype=torch.long)
    rows = []
    real = supervised = 0
    low, high = min(64, max(2, seq // 4)), max(min(64, seq // 4) + 1, seq // 2)
    for b in range(batch):
        pos = 0
        rows.append([])
        while True:
            n = int(torch.randint(low, high, (1,), generator=g))
            if pos + n > seq:
                break
            tokens = torch.randint(0, vocab, (n + 1,), generator=g)
            inputs[b, pos:pos + n] = tokens[:-1]
            half = n // 2
            targets[b, pos + half:pos + n] = tokens[half + 1:]
            rows[-1].append(n)
            pos, real, supervised = pos + n, real + n, supervised + n - half
    batch_dict = {"inputs": inputs.to(device), "targets": targets.to(device),
                  "layout": attention.PackedLayout.from_row_lengths(rows, seq).to(device),
                  "supervised_index": (targets.reshape(-1) != -1).nonzero().squeeze(1).to(device)}
    return batch_dict, real, supervised


def train_case(model, optimizers, kernel, batch, seq, steps, device, peak):
    model.attention_kernel = kernel
    rows, real, supervised = packed_rows(batch, seq, model.config.vocab_size, device)
    ctx = autocast(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def one_step():
        accumulate_gradients(model, [rows], supervised, ctx)
        apply_update(model, optimizers, 1.0)

    one_step()  # warm-up: optimizer states, kernels (flex compiles here)
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    bf16 = device.type == "cuda"
    estimate = plan.memory_plan(model.config, batch, seq, bf16=bf16, supervised_fraction=supervised / (batch * seq))
    worst = plan.memory_plan(model.config, batch, seq, bf16=bf16)
    tokens_per_s = real / seconds
    return {
        "kernel": kernel, "batch": batch, "seq": seq, "real_tokens": real, "supervised_tokens": supervised,
        "step_s": seconds, "tokens_per_s": tokens_per_s,
        "mfu": model.estimate_flops() * tokens_per_s / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / plan.GB if device.type == "cuda" else None,
        "planned_gb": estimate["total"] / plan.GB, "planned_worst_case_gb": worst["total"] / plan.GB,
    }


def kernel_checks(config, device):
    """Each kernel's check for the policy's dtype and fp32, nanochat's heads and grouped-query
    heads: [{"dtype", "heads", "auto", "results": {kernel: None | reason}}]."""
    head_dim = config.n_embd // config.n_head
    dtypes = [precision_for(device).dtype or torch.float32]
    dtypes += [torch.float32] if dtypes[0] != torch.float32 else [torch.bfloat16]
    checks = []
    for dtype in dtypes:
        for n_kv_head in (config.n_head, max(1, config.n_head // 2)):
            results = dict(attention.kernel_report(device, dtype, config.n_head, n_kv_head, head_dim))
            try:
                auto = attention.choose_kernel(device, dtype, config.n_head, n_kv_head, head_dim)
            except attention.AttentionKernelError as e:
                auto = f"none ({e})"
            heads = f"{config.n_head}/{n_kv_head}x{head_dim}"
            name = str(dtype).removeprefix("torch.")
            checks.append({"dtype": name, "heads": heads, "auto": auto, "results": results})
    return checks


def forward_syncs(model, device):
    """Device-to-host synchronisations in one training forward+loss on packed rows (CUDA's
    sync debug mode warns on each); None on CPU, where there is nothing to count."""
    if device.type != "cuda":
        return None
    rows, _, _ = packed_rows(2, 256, model.config.vocab_size, device, seed=1)
    with autocast(device):
        model(rows["inputs"], rows["targets"], loss_reduction="sum", layout=rows["layout"],
              supervised_index=rows["supervised_index"])  # warm-up: the kernel's check runs here
        synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model(rows["inputs"], rows["targets"], loss_reduction="sum", layout=rows["layout"],
                      supervised_index=rows["supervised_index"])
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def compiled_case(model, optimizers, rows, seq, steps, device, peak, skipped):
    """The first kernel's largest measured batch (at most 8) again with the blocks and loss
    compiled as training compiles them (GPT.compile_for_training): compiled vs eager."""
    measured = [r for r in rows if not r.get("oom") and r["batch"] <= 8]
    if not measured:
        return []
    best = max((r for r in measured if r["kernel"] == measured[0]["kernel"]), key=lambda r: r["batch"])
    model.compile_for_training()
    try:
        row = train_case(model, optimizers, best["kernel"], best["batch"], seq, steps, device, peak)
        row["kernel"] += " + compile"
        print(f"  d{model.config.n_layer} {row['kernel']} batch {row['batch']}: {row['tokens_per_s']:,.0f} tok/s "
              f"(eager {best['tokens_per_s']:,.0f})", flush=True)
        return [row]
    except Exception as e:  # a compiler failure is a result too
        model.zero_grad(set_to_none=True)
        skipped.append(f"{best['kernel']} + compile batch {best['batch']}: {type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
        return []
    finally:
        model.uncompile()


SMOKE_CARD = Card("simulated 64 MB card (smoke)", 64 * 2**20, 64 * 2**20)


def auto_batch_case(config, device, seq):
    """--device_batch_size auto on this card (module docstring): planned and proven rows of `seq`
    positions, and the measured peak of one step at the proven batch."""
    model = random_gpt(config, device)
    model.train()
    optimizers = model.setup_optimizers()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    card = card_of(device) or SMOKE_CARD
    precision = precision_for(device)
    bf16 = precision.dtype is not None
    planned = device_batch.planned_positions(config, card, bf16)
    row = {"card": card.describe(), "seq": seq, "planned_rows": planned // seq, "proven_rows": 0, "halvings": [],
           "peak_memory_gb": None, "planned_gb": None}
    if planned >= seq:
        try:
            proven = device_batch.prove(model, planned, seq, precision, True,
                                        device_batch.optimizer_state_bytes(config, TrainSettings()), device,
                                        say=row["halvings"].append)
        except OutOfMemory:
            proven = 0
        row["proven_rows"] = proven // seq
    if row["proven_rows"]:
        rows = row["proven_rows"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch, _, supervised = packed_rows(rows, seq, config.vocab_size, device)
        accumulate_gradients(model, [batch], supervised, precision.autocast())
        apply_update(model, optimizers, 1.0)
        synchronize(device)
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / plan.GB
        row["planned_gb"] = plan.memory_plan(config, rows, seq, bf16=bf16)["total"] / plan.GB
    del model, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def train_bench(config, kernels, batches, seq, steps, device, deadline):
    model = random_gpt(config, device)
    model.train()
    syncs = forward_syncs(model, device)
    optimizers = model.setup_optimizers()
    peak = peak_flops(device)
    rows, skipped = [], []
    for kernel in kernels:
        for batch in batches:
            if time.monotonic() > deadline:
                skipped.append(f"{kernel} batch {batch}: out of time")
                continue
            try:
                rows.append(train_case(model, optimizers, kernel, batch, seq, steps, device, peak))
                print(f"  d{config.n_layer} {kernel} batch {batch}: {rows[-1]['tokens_per_s']:,.0f} tok/s", flush=True)
            except Exception as e:  # OOM ends this kernel's batches; a kernel that cannot run here is skipped
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if is_out_of_memory(e):
                    rows.append({"kernel": kernel, "batch": batch, "seq": seq, "oom": True,
                                 "planned_worst_case_gb": plan.memory_plan(config, batch, seq)["total"] / plan.GB})
                else:
                    skipped.append(f"{kernel} batch {batch}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
                break
    if device.type == "cuda" and time.monotonic() < deadline:
        rows += compiled_case(model, optimizers, rows, seq, steps, device, peak, skipped)
    del model, optimizers
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, skipped, syncs


@torch.no_grad()
def eval_bench(config, device, tokenizer, prompts, counts, questions, gen_tokens, batch_size):
    model = random_gpt(config, device)
    model.eval()
    reps = math.ceil(questions / len(prompts))
    qs, ns = (prompts * reps)[:questions], (counts * reps)[:questions]
    with autocast(device):
        letter_scores(model, tokenizer, qs[:batch_size], ns[:batch_size], batch_size=batch_size)  # warm-up
        synchronize(device)
        t0 = time.perf_counter()
        letter_scores(model, tokenizer, qs, ns, batch_size=batch_size)
        synchronize(device)
        letter_s = time.perf_counter() - t0
        engine = Engine(model, tokenizer)
        ids = [tokenizer.render_for_completion(p) for p in qs[:batch_size]]
        synchronize(device)
        t0 = time.perf_counter()
        outputs = engine.generate_multi(ids, max_tokens=gen_tokens, temperature=0.0)
        synchronize(device)
        gen_s = time.perf_counter() - t0
    generated = sum(len(o) for o in outputs)
    del model
    return {"questions": len(qs), "letter_questions_per_s": len(qs) / letter_s, "letter_s": letter_s,
            "generation_batch": len(ids), "generated_tokens": generated, "generation_tokens_per_s": generated / gen_s,
            "generation_s": gen_s}


def markdown(result):
    smoke = " (smoke: tiny sizes on CPU)" if result["smoke"] else ""
    lines = [f"{result['device']}, torch {result['torch']}{smoke}", "",
             "| kernel check | heads (q/kv x dim) | " + " | ".join(attention.KERNELS) + " | auto picks |",
             "|---|---|" + "---|" * len(attention.KERNELS) + "---|"]
    for c in result["kernel_checks"]:
        cells = ["pass" if c["results"][k] is None else "FAIL" for k in attention.KERNELS]
        lines.append(f"| {c['dtype']} | {c['heads']} | " + " | ".join(cells) + f" | {c['auto']} |")
    for c in result["kernel_checks"]:
        for k, reason in c["results"].items():
            if reason is not None:
                lines.append(f"\n{k} ({c['dtype']}, {c['heads']}): {reason}")
    lines += ["", "| model | --device_batch_size auto on | planned rows x seq | proven rows | measured peak (one "
              "step) | plan at the proven batch |", "|---|---|---:|---:|---:|---:|"]
    for m in result["models"]:
        a = m.get("auto_batch")
        if a:
            peak = f"{a['peak_memory_gb']:.2f} GB" if a["peak_memory_gb"] is not None else "-"
            planned_gb = f"{a['planned_gb']:.2f} GB" if a["planned_gb"] is not None else "-"
            lines.append(f"| {m['name']} | {a['card']} | {a['planned_rows']} x {a['seq']} | {a['proven_rows']} | "
                         f"{peak} | {planned_gb} |")
    lines += ["", "| model | kernel | device batch x row | real tokens/s | MFU | peak memory | planned (same "
             "supervision / worst case) | step |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for m in result["models"]:
        for r in m["train"]:
            name = f"{m['name']} ({m['params'] / 1e6:.0f}M)"
            if r.get("oom"):
                lines.append(f"| {name} | {r['kernel']} | {r['batch']} x {r['seq']} | out of memory | | | "
                             f"- / {r['planned_worst_case_gb']:.1f} GB | |")
                continue
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
            peak = f"{r['peak_memory_gb']:.2f} GB" if r["peak_memory_gb"] is not None else "-"
            lines.append(f"| {name} | {r['kernel']} | {r['batch']} x {r['seq']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                         f"{peak} | {r['planned_gb']:.2f} / {r['planned_worst_case_gb']:.2f} GB | "
                         f"{r['step_s'] * 1000:.0f} ms |")
    for m in result["models"]:
        if m.get("forward_syncs") is not None:
            lines.append(f"\n{m['name']}: {m['forward_syncs']} device-to-host synchronisations in a training forward")
    lines += ["", "| model | letter scoring | generation |", "|---|---:|---:|"]
    for m in result["models"]:
        e = m.get("eval")
        if e:
            lines.append(f"| {m['name']} | {e['letter_questions_per_s']:,.1f} questions/s ({e['questions']}) | "
                         f"{e['generation_tokens_per_s']:,.1f} tokens/s (batch {e['generation_batch']}) |")
    for m in result["models"]:
        for s in m["skipped"]:
            lines.append(f"\nskipped ({m['name']}): {s}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (the test suite runs this)")
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 32])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument("--budget_s", type=float, default=420, help="stop starting new cases after this long")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--gen_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        configs = [("tiny", GPTConfig(sequence_len=128, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2,
                                      n_embd=64))]
        kernels, batches, seq, steps = CPU_KERNELS, (1, 2), 128, 1
        questions, gen_tokens, vocab = 8, 8, 300
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke for the CPU check")
        device = torch.device("cuda")
        configs = [(f"d{d}", config_for_depth(d)) for d in args.depths]
        kernels, batches, seq, steps = GPU_KERNELS, BATCHES, args.seq, args.steps
        questions, gen_tokens, vocab = args.questions, args.gen_tokens, 1024
    prompts, counts = sample_questions()
    tokenizer = small_tokenizer(prompts, vocab)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    result = {"device": device_name, "torch": torch.__version__, "smoke": args.smoke, "seq": seq,
              "free_memory_gb": (plan.gpu_free_bytes(device) or 0) / plan.GB, "models": [],
              "kernel_checks": kernel_checks(configs[0][1], device)}
    print(markdown({**result, "models": []}).split("\n\n| model")[0], flush=True)
    for name, config in configs:
        if time.monotonic() > deadline:
            result["models"].append({"name": name, "params": plan.count_params(config).total, "train": [],
                                     "skipped": ["out of time"]})
            continue
        static = plan.memory_plan(config, 1, seq)
        if device.type == "cuda" and plan.gpu_free_bytes(device) < static["total"]:
            result["models"].append({"name": name, "params": static["params_count"], "train": [],
                                     "skipped": [f"does not fit: planned {static['total'] / plan.GB:.1f} GB at "
                                                 "batch 1"]})
            continue
        print(f"{name}: --device_batch_size auto", flush=True)
        auto = auto_batch_case(config, device, seq)
        print(f"  planned {auto['planned_rows']} x {seq}, proven {auto['proven_rows']}", flush=True)
        print(f"{name}: training", flush=True)
        train, skipped, syncs = train_bench(config, kernels, batches, seq, steps, device, deadline)
        entry = {"name": name, "params": static["params_count"], "train": train, "skipped": skipped,
                 "forward_syncs": syncs, "auto_batch": auto}
        if time.monotonic() < deadline + 60:
            print(f"{name}: evaluation", flush=True)
            entry["eval"] = eval_bench(config, device, tokenizer, prompts, counts, questions, gen_tokens,
                                       batch_size=8 if args.smoke else 32)
        result["models"].append(entry)
    result["elapsed_s"] = time.monotonic() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "gpu_bench.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Fine-tuning throughput: padding-free packed batches vs nanochat's padded batches.

    python bench/bench_train.py                               # CPU, tiny model, ~2 min
    python bench/bench_train.py --device cuda --depth 20      # random-init d20 on a GPU

Both loops are the real training step (sciassist.train.step.accumulate_gradients + the Muon and
AdamW steps) on the same optimizer steps of the ScienceQA train set (64 conversations
each): "padded" is nanochat's batching (device_batch_size conversations right-padded to
the longest), "packed" is sciassist.data.batching's. The steps are timed alternately, one of each
in turn, so load from other processes on a shared machine falls on both alike; the epoch
time is the mean step time x steps per epoch. Token efficiency (real positions / processed
positions) is computed over the whole epoch's plan.

On CPU the packed loop also runs at --device_batch_size auto's CPU micro-batch
(sciassist.train.batch.CPU_POSITIONS, 2,048 positions: 1 row of the default max_seq_len): a CPU
has no memory limit to fill, and elementwise work on a smaller micro-batch's logits stays in
cache (the loss over the vocabulary is memory-bound), which makes it faster per position. One CPU thread by
default: the ratio between the loops is the figure, and one thread is the least disturbed
by other load on a shared machine; for the same reason a one-thread CPU run is timed in
CPU seconds of the process (time.process_time), which excludes the time other processes
hold the core, rather than in wall-clock seconds.

The conversations come from a lupantech-layout ScienceQA copy (default ../shared/scienceqa
beside the checkout; 12,000 train questions as the prepared data picks them), else
data/scienceqa_train.jsonl, else the bundled sample; --data FILE.jsonl for any other. The
tokenizer is trained on their text (rustbpe, --vocab_size) unless --tokenizer_dir gives a
real one. On CUDA the model vocabulary is 65,536 as in d20 and one extra row reports the
worst case the memory must fit: full 8 x 2048 rows.

    python bench/bench_train.py --levers --n_layer 4 --n_embd 256 --vocab_size 4096 --steps 4

--levers times each speed lever on and off in the same alternating run: Muon's Newton-Schulz
iteration in bf16 (torch.optim.Muon's, emulated on CPUs without native bf16) or in the device's
fast dtype, and the CPU attention loop indexing the row per document (the former kernel,
written out here) or splitting it once. Two stand-ins of the peers run beside them on the same
steps and model: nanochat's SFT batching (right-padded micro-batches of --device_batch_size
conversations, Muon in bf16 as nanochat's own, which is torch's math) and a transformers
Trainer-style loop (the same padded batches, AdamW on every parameter).
"""

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from baselines import padded_batches  # noqa: E402
from random_model import random_gpt  # noqa: E402

from nanochat import attention  # noqa: E402
from nanochat.attention import PackedLayout  # noqa: E402
from nanochat.gpt import GPTConfig, config_for_depth  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from sciassist.common import autocast as autocast_for  # noqa: E402
from sciassist.data.batching import (  # noqa: E402
    arrange_step,
    step_batches,
    step_examples,
    steps_per_epoch,
    tokenize_conversations,
)
from sciassist.train.batch import CPU_POSITIONS  # noqa: E402
from sciassist.train.step import accumulate_gradients, peak_flops, set_learning_rates  # noqa: E402

SHARED_SCIENCEQA = REPO_ROOT.parent / "shared" / "scienceqa"


def load_records(data):
    """Formatted conversations and where they came from."""
    from sciassist.data import scienceqa as sqa
    from sciassist.data.conversations import read_conversations
    if data:
        return read_conversations(data), data
    prepared = REPO_ROOT / "data" / "scienceqa_train.jsonl"
    if (SHARED_SCIENCEQA / "problems.json").is_file():
        source = str(SHARED_SCIENCEQA)
    elif prepared.is_file():
        return read_conversations(prepared), str(prepared)
    else:
        source = "sample"
    raw = sqa.select_subset(sqa.load_scienceqa(source, "train"), sqa.DEFAULT_SIZES["train"])
    options = sqa.FormatOptions()
    records = [sqa.format_record(r, options) for r in raw if sqa.skip_reason(r, options) is None]
    return records, f"ScienceQA train ({source})"


def build_tokenizer(args, records):
    if args.tokenizer_dir:
        return Tokenizer.from_directory(args.tokenizer_dir)
    texts = [m["content"] for r in records for m in r["messages"]]
    return Tokenizer.train_from_iterator(texts, args.vocab_size)


def build_model(args, tokenizer, device):
    if args.depth is not None:
        vocab = max(65536 if device.type == "cuda" else 0, tokenizer.get_vocab_size())
        config = config_for_depth(args.depth, vocab_size=vocab, sequence_len=args.max_seq_len)
    else:
        heads = max(1, args.n_embd // 128)
        config = GPTConfig(sequence_len=args.max_seq_len, vocab_size=tokenizer.get_vocab_size(), n_layer=args.n_layer,
                           n_head=heads, n_kv_head=heads, n_embd=args.n_embd)
    return random_gpt(config, device)


def indexed_loop(q, k, v, packed):
    """The CPU attention loop before it split the row once: per segment, the row is indexed
    for the input and written by index for the output (the backward zero-fills a row-sized
    gradient per segment)."""
    query, key, value = (attention.flatten(x) for x in (q, k, v))
    key, value = attention.repeat_kv(key, value, query.size(1), dim=1)
    y = torch.empty_like(query)
    for s, e in itertools.pairwise(itertools.accumulate(packed.lengths, initial=0)):
        y[s:e] = F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1)[None] for x in (query, key, value)),
                                                is_causal=True)[0].transpose(0, 1)
    return y.view(q.shape)


@contextlib.contextmanager
def attention_loop(kind):
    """Run with the CPU attention loop `kind`: "split" (the kernel) or "indexed" (the former one)."""
    kernel = attention._loop
    if kind == "indexed":
        attention._loop = indexed_loop
    try:
        yield
    finally:
        attention._loop = kernel


class Loop:
    """One batching method run through the real training step."""

    def __init__(self, name, make_batches, model, optimizers, autocast, device, clock, loop_kind="split"):
        self.name, self.make_batches, self.clock, self.loop_kind = name, make_batches, clock, loop_kind
        self.model, self.optimizers, self.autocast, self.device = model, optimizers, autocast, device
        self.seconds, self.positions, self.tokens, self.micro, self.peak_memory = [], 0, 0, [], 0

    def step(self, examples, timed=True):
        batches, num_supervised = self.make_batches(examples)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = self.clock()
        with attention_loop(self.loop_kind):
            accumulate_gradients(self.model, batches, num_supervised, self.autocast)
        set_learning_rates(self.optimizers, 1.0)
        for opt in self.optimizers:
            opt.step()
        self.model.zero_grad(set_to_none=True)
        sync()
        if timed:
            self.seconds.append(self.clock() - t0)
            if self.device.type == "cuda":
                self.peak_memory = max(self.peak_memory, torch.cuda.max_memory_allocated(self.device) / 2**30)
            self.positions += sum(b["num_positions"] for b in batches)
            self.tokens += sum(b["num_tokens"] for b in batches)
            self.micro.append(len(batches))


def epoch_efficiency(dataset, args, pad_id, packed):
    """Token efficiency over every step of epoch 0 (no model needed: shapes only; the same
    for any packed device batch, since rows do not depend on it)."""
    real = positions = 0
    for step in range(steps_per_epoch(len(dataset), args.examples_per_step)):
        _, examples = step_examples(len(dataset), step, args.examples_per_step, args.seed)
        if packed:
            plan = arrange_step(dataset, examples, args.device_batch_size, pack_len=args.pack_len)
            real += sum(dataset.lengths[i] for mb in plan.micro_batches for row in mb for i in row)
            positions += sum(len(mb) * plan.row_len for mb in plan.micro_batches)
        else:
            batches = padded_batches(dataset, examples, args.device_batch_size, pad_id)
            real += sum(b["num_tokens"] for b in batches)
            positions += sum(b["num_positions"] for b in batches)
    return real / positions


def worst_case_memory(model, optimizers, autocast, device, args):
    """Peak memory of one step on device_batch_size full rows of max_seq_len positions (4
    documents per row, every target supervised): what a GPU must hold at most."""
    B, T = args.device_batch_size, args.max_seq_len
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch = {"inputs": torch.randint(0, 1000, (B, T), generator=gen).to(device),
             "targets": torch.randint(0, 1000, (B, T), generator=gen).to(device),
             "layout": PackedLayout.from_row_lengths([[T // 4] * 4] * B, T).to(device),
             "supervised_index": torch.arange(B * T, device=device)}
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        accumulate_gradients(model, [batch], B * T, autocast)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def lever_loops(model, step_model, padded, packed, packed_sizes, autocast, device, clock, args):
    """The peers' stand-ins, then each packed device batch with the levers added one at a time.
    The peers compute as they do by default on this device: nanochat's chat_sft.py autocasts to
    bf16 on CUDA only (fp32 on CPU), and so does a transformers Trainer left at its defaults on a
    CPU (bf16=False); SciAssist follows its precision policy (--dtype)."""
    peer_autocast = autocast_for(device, "bfloat16" if device.type == "cuda" else "float32")
    def muon_run(dtype):
        optimizers = model.setup_optimizers(muon_dtype=dtype)
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] *= 0.02
        return optimizers

    adamw = [torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)]
    for group in adamw[0].param_groups:
        group["initial_lr"] = group["lr"]
    b = args.device_batch_size
    loops = [Loop(f"nanochat SFT stand-in: padded batch {b}, Muon bf16", padded, step_model,
                  muon_run(torch.bfloat16), peer_autocast, device, clock),
             Loop(f"transformers Trainer stand-in: padded batch {b}, AdamW", padded, step_model, adamw, peer_autocast,
                  device, clock)]
    for size in packed_sizes:
        loops += [Loop(f"packed {size}: Muon bf16, indexed attention loop (before)", packed(size), step_model,
                       muon_run(torch.bfloat16), autocast, device, clock, loop_kind="indexed"),
                  Loop(f"packed {size}: + Muon in the device's dtype", packed(size), step_model, muon_run(None),
                       autocast, device, clock, loop_kind="indexed"),
                  Loop(f"packed {size}: + attention loop split once (now)", packed(size), step_model, muon_run(None),
                       autocast, device, clock)]
    return loops


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--depth", type=int, default=None, help="nanochat depth (d20 = 20); default: the tiny model")
    parser.add_argument("--n_layer", type=int, default=2, help="tiny model layers (CPU default)")
    parser.add_argument("--n_embd", type=int, default=128, help="tiny model width")
    parser.add_argument("--vocab_size", type=int, default=2048, help="tokenizer trained on the data")
    parser.add_argument("--tokenizer_dir", default=None, help="use this tokenizer instead (e.g. the published one)")
    parser.add_argument("--data", default=None, help="a conversations JSONL instead of ScienceQA")
    parser.add_argument("--examples_per_step", type=int, default=64)
    parser.add_argument("--device_batch_size", type=int, default=8, help="padded: conversations per micro-batch")
    parser.add_argument("--packed_batch_sizes", default=None,
                        help="packed device batches to run, comma-separated (default: 8,2 on CPU, 8 on CUDA)")
    parser.add_argument("--max_seq_len", type=int, default=2048)
    parser.add_argument("--pack_len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (default: 6 CPU, 10 CUDA)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0 = torch's default)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the blocks and the loss as training does (GPT.compile_for_training)")
    parser.add_argument("--levers", action="store_true",
                        help="time each speed lever on and off, and the peers' stand-ins (see above)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="the precision policy's --dtype (auto: bf16 autocast on CUDA >= 8.0 and CPUs with native "
                             "bf16, fp32 elsewhere)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    auto_rows = max(1, CPU_POSITIONS // args.max_seq_len)  # --device_batch_size auto's micro-batch on a CPU
    packed_sizes = [int(x) for x in (args.packed_batch_sizes or ("8" if device.type == "cuda" else f"8,{auto_rows}"))
                    .split(",")]
    steps = args.steps or (10 if device.type == "cuda" else 6)
    started = time.time()

    records, source = load_records(args.data)
    tokenizer = build_tokenizer(args, records)
    dataset = tokenize_conversations(tokenizer, records, args.max_seq_len)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    model = build_model(args, tokenizer, device)
    optimizers = model.setup_optimizers()
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] *= 0.02  # the fine-tuning lrs; their size does not change the timing
    if args.compile:
        model.compile_for_training()
    step_model = model
    autocast = autocast_for(device, args.dtype)

    def packed(device_batch_size):
        def make(examples):
            plan = arrange_step(dataset, examples, device_batch_size, pack_len=args.pack_len)
            return step_batches(dataset, plan, pad_id, device), plan.num_supervised
        return make

    def padded(examples):
        batches = padded_batches(dataset, examples, args.device_batch_size, pad_id)
        batches = [{**b, "inputs": b["inputs"].to(device), "targets": b["targets"].to(device)} for b in batches]
        return batches, sum(b["num_supervised"] for b in batches)

    one_thread_cpu = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.process_time if one_thread_cpu else time.perf_counter
    if args.levers:
        loops = lever_loops(model, step_model, padded, packed, packed_sizes, autocast, device, clock, args)
    else:
        loops = [Loop(f"padded (nanochat), batch {args.device_batch_size}", padded, step_model, optimizers, autocast,
                      device, clock)]
        loops += [Loop(f"packed, device batch {b}", packed(b), step_model, optimizers, autocast, device, clock)
                  for b in packed_sizes]
    per_epoch = steps_per_epoch(len(dataset), args.examples_per_step)
    for k in range(args.warmup + steps):
        _, examples = step_examples(len(dataset), k, args.examples_per_step, args.seed)
        for loop in loops:
            loop.step(examples, timed=k >= args.warmup)

    c = model.config
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"data: {source}: {dataset.describe()}")
    print(f"model: {c.n_layer} layers x {c.n_embd}, vocab {c.vocab_size}, {model.num_params() / 1e6:.1f}M params; "
          f"{where}; torch {torch.__version__}; compile={args.compile}")
    print(f"steps of {args.examples_per_step} conversations, device batch {args.device_batch_size}, max_seq_len "
          f"{args.max_seq_len}, pack_len {args.pack_len}; {steps} timed steps per method (alternating), "
          f"{per_epoch} steps per epoch; times in {'CPU' if one_thread_cpu else 'wall-clock'} seconds\n")
    peak = peak_flops(device)
    flops_per_token = model.estimate_flops()
    print("| batching | micro-batches/step | token efficiency (epoch) | s/step | epoch time | processed tok/s "
          "| real tok/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = {}
    for loop in loops:
        is_packed = loop.make_batches is not padded
        seconds = sum(loop.seconds)
        per_step = statistics.mean(loop.seconds)
        efficiency = epoch_efficiency(dataset, args, pad_id, is_packed)
        processed = loop.positions / seconds
        mfu = f"{flops_per_token * processed / peak:.1%}" if peak else "n/a"
        memory = f"{loop.peak_memory:.1f} GiB" if device.type == "cuda" else "n/a"
        rows[loop.name] = (per_step, efficiency)
        print(f"| {loop.name} | {statistics.mean(loop.micro):.1f} | {efficiency:.3f} | {per_step:.2f} | "
              f"{per_step * per_epoch / 60:.1f} min | {processed:,.0f} | {loop.tokens / seconds:,.0f} | {mfu} "
              f"| {memory} |")
    if device.type == "cuda":
        worst = worst_case_memory(step_model, optimizers, autocast, device, args)
        print(f"| full rows {args.device_batch_size} x {args.max_seq_len} (memory worst case) | 1 | - | - | - | - | - "
              f"| - | {worst:.1f} GiB |")
    print()
    if args.levers:
        peers = [loop for loop in loops if loop.make_batches is padded]
        for loop in loops:
            if loop.make_batches is not padded:
                speedups = ", ".join(f"{rows[peer.name][0] / rows[loop.name][0]:.2f}x {peer.name.split(':')[0]}"
                                     for peer in peers)
                print(f"{loop.name}: {speedups} (goal >= 2.0x each)")
    else:
        padded_s, padded_eff = rows[loops[0].name]
        for name, (packed_s, _) in list(rows.items())[1:]:
            ratio = packed_s / padded_s
            print(f"{name} / padded time: {ratio:.2f} (goal <= 0.60: {'met' if ratio <= 0.6 else 'NOT met'})")
        packed_eff = rows[loops[1].name][1]
        print(f"packed token efficiency {packed_eff:.3f} (goal >= 0.95: {'met' if packed_eff >= 0.95 else 'NOT met'});"
              f" padded {padded_eff:.3f}")
    print(f"bench wall time {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

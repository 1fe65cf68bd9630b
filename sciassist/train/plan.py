"""The memory plan of a fine-tuning run, before anything heavy is loaded: what the weights, the
gradients, the optimizer states and the activations of one micro-batch take, the total, and the
largest --device_batch_size that fits a card.

    python sciassist_train.py ... --dry_run          the plan of that run (nothing is loaded)
    python -m sciassist.train.plan --table           d20 / d32 on 16, 24, 40 and 80 GB cards (markdown)

The model (bytes; P parameters, N = device_batch_size x max_seq_len positions, C = n_embd, V = vocab):
- parameters: fp32 master weights, 4 P (the published wte is stored bf16, loaded as fp32);
- gradients: fp32, 4 P;
- optimizer states: Muon one fp32 momentum buffer per transformer matrix (4 bytes each), AdamW two
  fp32 moments for wte and lm_head (8 bytes each);
- activations, a = 2 bytes under bf16 autocast (CUDA), 4 in fp32 (CPU), per layer and position:
  what autograd keeps for the backward pass of a block, ACT_PER_LAYER x C (+ the k/v extras with
  GQA), plus the embedding and the final norm; bf16 autocast also keeps bf16 copies of the
  weights it casts (2 bytes per matrix parameter and lm_head);
- logits: only supervised positions get logits (S = supervised_fraction x N, 1 by default: the
  worst case). Without the chunked loss the whole (S, V) block lives at once, with its tanh and
  log-softmax and their gradients: LOGIT_BYTES per logit. With it (nanochat.gpt.LOSS_CHUNK_LOGITS)
  only one chunk of 2^27 logits is live at a time, recomputed in the backward pass.
The coefficients are fitted to measured CPU peaks (bench/plan_check.py, bench/RESULTS.md): within
20% on depth 4-8, vocab 4,096-65,536, rows of 256-1024 positions.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys

import torch

from nanochat import gpt
from nanochat.checkpoint import meta_path, read_meta
from nanochat.gpt import GPT, GPTConfig, config_for_depth

GB = 10**9  # cards are sold in GB; the table says GB
GIB = 2**30
# Saved activations of one block per position, in units of n_embd elements (fp32 CPU measure):
# x, norm(x), q (rotated), q (normed), attention out, x after attention, norm(x), relu(h) (4C),
# relu(h)^2 (4C), and the loop/varlen kernels' working copies.
ACT_PER_LAYER = 19.0
ACT_PER_KV = 3.0  # k rotated, k normed, v: per kv channel
ACT_OUTSIDE = 6.0  # embedding output, its norm, the final norm's input/output, the supervised rows
# The backward of one block briefly holds the gradients of its MLP hidden (2 x 4C) on top.
BACKWARD_TRANSIENT = 8.0
# Per logit: the fp32 logits, their tanh and log-softmax (kept), and two gradients in the backward.
LOGIT_BYTES = 17.0
USABLE_FRACTION = 0.92  # of a card's free memory: the allocator's fragmentation, cuBLAS/NCCL workspaces


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    matrices: int  # transformer.h: Muon
    wte: int
    lm_head: int

    @property
    def adamw(self) -> int:
        return self.wte + self.lm_head


def count_params(config: GPTConfig) -> ParamCounts:
    """Parameter counts of a GPT of `config`, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = GPT(config)
    matrices = sum(p.numel() for p in model.transformer.h.parameters())
    wte = model.transformer.wte.weight.numel()
    lm_head = model.lm_head.weight.numel()
    return ParamCounts(total=model.num_params(), matrices=matrices, wte=wte, lm_head=lm_head)


def activation_bytes(config: GPTConfig, batch: int, seq: int, bf16: bool = True, chunked: bool = True,
                     supervised_fraction: float = 1.0) -> dict:
    """Bytes of activations of one micro-batch of batch x seq positions: {"blocks", "logits",
    "weight_copies", "total"}. chunked False: as if the loss materialised all the logits."""
    a = 2 if bf16 else 4
    n = batch * seq
    c = config.n_embd
    kv = config.n_kv_head * (c // config.n_head)
    blocks = n * a * (config.n_layer * (ACT_PER_LAYER * c + ACT_PER_KV * kv) + ACT_OUTSIDE * c
                      + BACKWARD_TRANSIENT * c)
    supervised = math.ceil(n * supervised_fraction)
    rows = min(supervised, max(1, gpt.LOSS_CHUNK_LOGITS // config.vocab_size)) if chunked else supervised
    logits = rows * config.vocab_size * (LOGIT_BYTES + (2 if bf16 else 0))  # + the bf16 matmul output
    counts = count_params(config)
    weight_copies = 2 * (counts.matrices + counts.lm_head) if bf16 else 0
    return {"blocks": int(blocks), "logits": int(logits), "weight_copies": int(weight_copies),
            "total": int(blocks + logits + weight_copies)}


def memory_plan(config: GPTConfig, batch: int, seq: int, bf16: bool = True, chunked: bool = True,
                supervised_fraction: float = 1.0, free: int | None = None) -> dict:
    """Every figure of the plan in bytes, plus whether it fits `free` bytes (None: unknown) and
    the largest device batch that does."""
    counts = count_params(config)
    params = 4 * counts.total
    grads = 4 * counts.total
    optimizer = 4 * counts.matrices + 8 * counts.adamw
    acts = activation_bytes(config, batch, seq, bf16, chunked, supervised_fraction)
    unchunked = activation_bytes(config, batch, seq, bf16, False, supervised_fraction)
    static = params + grads + optimizer
    plan = {
        "n_layer": config.n_layer, "n_embd": config.n_embd, "vocab_size": config.vocab_size,
        "batch": batch, "seq": seq, "bf16": bf16, "params_count": counts.total,
        "params": params, "grads": grads, "optimizer": optimizer,
        "activations": acts["total"], "activations_blocks": acts["blocks"], "logits": acts["logits"],
        "weight_copies": acts["weight_copies"], "activations_unchunked": unchunked["total"],
        "total": static + acts["total"], "total_unchunked": static + unchunked["total"],
        "free": free, "fits": None, "max_batch": None, "max_batch_unchunked": None,
    }
    if free is not None:
        plan["fits"] = plan["total"] <= USABLE_FRACTION * free
        plan["max_batch"] = max_batch(config, seq, free, bf16, True, supervised_fraction)
        plan["max_batch_unchunked"] = max_batch(config, seq, free, bf16, False, supervised_fraction)
    return plan


def max_batch(config: GPTConfig, seq: int, free: int, bf16: bool = True, chunked: bool = True,
              supervised_fraction: float = 1.0, limit: int = 4096) -> int:
    """The largest device batch whose plan fits USABLE_FRACTION x free bytes (0: not even 1)."""
    counts = count_params(config)
    static = 4 * counts.total + 4 * counts.total + 4 * counts.matrices + 8 * counts.adamw
    budget = USABLE_FRACTION * free - static

    def fits(b):
        return activation_bytes(config, b, seq, bf16, chunked, supervised_fraction)["total"] <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gpu_free_bytes(device=None) -> int | None:
    """The visible GPU's free memory (torch.cuda.mem_get_info), None without CUDA."""
    if not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(torch.device(device) if device is not None else None)[0])


def config_from_meta(checkpoint_dir, step) -> GPTConfig:
    """The GPTConfig of model_<step>.pt from its meta_<step>.json (the weights are not read)."""
    model_config = read_meta(meta_path(checkpoint_dir, step))["model_config"]
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**{k: int(v) for k, v in model_config.items() if k in fields})


def _gb(n):
    return f"{n / GB:.2f} GB"


def format_plan(plan: dict, title: str = "") -> str:
    """The plan as a small markdown table (and its verdict)."""
    chunk = "" if plan["logits"] == 0 else " (chunked loss)"
    lines = [title] if title else []
    lines += [
        f"d{plan['n_layer']} (n_embd {plan['n_embd']}, vocab {plan['vocab_size']:,}, "
        f"{plan['params_count']:,} parameters), device batch {plan['batch']} x {plan['seq']} positions, "
        f"{'bf16 autocast' if plan['bf16'] else 'fp32'}",
        "",
        "| | memory |",
        "|---|---:|",
        f"| parameters (fp32) | {_gb(plan['params'])} |",
        f"| gradients (fp32) | {_gb(plan['grads'])} |",
        f"| optimizer states (Muon momentum, AdamW 2 moments) | {_gb(plan['optimizer'])} |",
        f"| activations{chunk} | {_gb(plan['activations'])} |",
        f"| of which logits | {_gb(plan['logits'])} |",
        f"| **total** | **{_gb(plan['total'])}** |",
        f"| activations / total without the chunked loss | {_gb(plan['activations_unchunked'])} / "
        f"{_gb(plan['total_unchunked'])} |",
    ]
    if plan["free"] is None:
        lines += ["", "no GPU visible: free memory unknown, so no verdict (use the README's table for your card)"]
    else:
        lines += [
            f"| GPU free memory | {_gb(plan['free'])} (usable {USABLE_FRACTION:.0%}) |",
            "",
            f"fits: {'yes' if plan['fits'] else 'NO'}; largest --device_batch_size that fits: {plan['max_batch']} "
            f"(without the chunked loss: {plan['max_batch_unchunked']})",
        ]
    return "\n".join(lines)


PUBLISHED = {20: config_for_depth(20), 32: config_for_depth(32)}  # nanochat's d20 / d32 shapes
CARDS_GB = (16, 24, 40, 80)


def readme_table(depths=(20, 32), cards_gb=CARDS_GB, seq: int = 2048) -> str:
    """Markdown: for each published model, the fixed memory, the activations per row of `seq`
    positions, and the largest --device_batch_size on each card (bf16 autocast, chunked loss;
    a card's memory taken as all free)."""
    header = "| model | params + grads + optimizer | activations per row | " + \
             " | ".join(f"{g} GB card" for g in cards_gb) + " |"
    lines = [f"Largest `--device_batch_size` at `--max_seq_len {seq}` (bf16 autocast, chunked loss, every "
             f"position supervised, {USABLE_FRACTION:.0%} of the card usable; `sciassist_train.py --dry_run` "
             f"prints it for your card):", "", header, "|---|---:|---:|" + "---:|" * len(cards_gb)]
    for depth in depths:
        config = PUBLISHED[depth] if depth in PUBLISHED else config_for_depth(depth)
        one = memory_plan(config, 1, seq)
        static = one["params"] + one["grads"] + one["optimizer"]
        per_row = activation_bytes(config, 2, seq)["blocks"] - activation_bytes(config, 1, seq)["blocks"]
        cells = []
        for g in cards_gb:
            b = max_batch(config, seq, g * GB)
            cells.append(str(b) if b else "does not fit")
        lines.append(f"| d{depth} ({one['params_count'] / 1e6:.0f}M) | {_gb(static)} | {_gb(per_row)} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sciassist.train.plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="d20 / d32 on 16, 24, 40, 80 GB cards (markdown)")
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args(argv)
    print(readme_table(seq=args.seq))
    if not args.table:
        print("\n" + format_plan(memory_plan(PUBLISHED[20], 8, args.seq, free=gpu_free_bytes())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

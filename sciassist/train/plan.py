"""The memory plan of a fine-tuning run, before anything heavy is loaded: what the weights, the
gradients, the optimizer states and the activations of one micro-batch take, the total, and the
largest --device_batch_size that fits a card; for full fine-tuning, or for LoRA (--lora_rank > 0).

    python sciassist_train.py ... --dry_run          the plan of that run (nothing is loaded)
    python -m sciassist.train.plan --table           d20 / d32 on 16, 24, 40 and 80 GB cards (markdown),
                                                     full fine-tuning and LoRA rows (--lora_rank, default
                                                     16 on every block projection; 0: no LoRA rows)
    python -m sciassist.train.plan --rl --table      the RL stage's plan: the same models and cards, the
                                                     largest --generation_batch_size and --device_batch_size
                                                     (--prompt_len, --max_new_tokens, --samples_per_question)

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

LoRA (sciassist.train.lora: peft adapters A (r x in) and B (out x r) on each block Linear whose name
is in --lora_targets; wte and lm_head frozen), with L = the adapter parameters (counted exactly, as
peft creates them):
- parameters: the frozen base stays fp32 (prepare_run casts the model to fp32 before the adapters
  are added), 4 P, plus 4 L for the adapters;
- gradients: 4 L, the adapters only (frozen weights get no gradient buffer);
- optimizer states: Muon's momentum, 4 L (sciassist.train.lora.OPTIMIZER; AdamW's two moments: 8 L);
- activations: those of full fine-tuning, less the input of each Linear that only its (now frozen)
  weight's gradient needed and no adapter reads (e.g. relu(h)^2 when c_proj is not adapted), plus
  per adapted Linear the adapter's r-wide intermediate (B's input); with --lora_dropout > 0 the
  adapter reads a dropped-out copy of its input, so it keeps that copy and the dropout's mask (one
  byte per element on CUDA; on CPU torch keeps a float noise tensor, 4 bytes) instead of the input
  itself. bf16 autocast also keeps bf16 copies of the adapters (2 L). The first block's savings
  (with a frozen embedding its input needs no gradient) are not counted: a slight over-estimate.
The coefficients are fitted to measured CPU peaks (bench/plan_check.py, bench/RESULTS.md): within
20% on depth 4-8, vocab 4,096-65,536, rows of 256-1024 positions, full fine-tuning and LoRA.

The RL stage (rl_plan; sciassist.train.rl) holds the weights and optimizer states of fine-tuning (full
or LoRA) throughout, and has two peaks that never overlap:
- the rollout: nanochat.engine's KV cache of generation_batch_size rows x (prompt + max_new_tokens)
  positions x n_layer x 2 (keys, values) x n_kv_head x head_dim, in the compute dtype (2 bytes under
  bf16 autocast, 4 in fp32), plus the transient of the forward that produced the newest logits: the
  prefill runs every position of each distinct prompt of the call through lm_head
  (PREFILL_LOGIT_BYTES per logit, the softcapped fp32 logits and their intermediates; a question's
  k rows share one prefill, so a call of G rows holds about G / k prompts) and keeps their own KV
  cache until it is copied to the rows; a decode step's B x V logits are the small case; the
  gradients were freed by the previous step (zero_grad(set_to_none=True)), so they do not count;
- the update: the fine-tuning plan of one micro-batch of device_batch_size rows x (prompt +
  max_new_tokens) positions, every position given logits (loss_reduction="none" computes them all),
  with the gradients.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import torch

from nanochat import gpt
from nanochat.checkpoint import meta_path, read_meta
from nanochat.gpt import GPT, Block, GPTConfig, config_for_depth
from sciassist.common import setting, settings_from_namespace, settings_parser
from sciassist.train.lora import OPTIMIZER as LORA_OPTIMIZER
from sciassist.train.settings import LORA_TARGETS, MAX_LORA_RANK, MAX_POSITIONS, lora_target_names

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
# Per logit of the generation engine's forward (no autograd): lm_head's output, /SOFTCAP, tanh and
# x SOFTCAP in fp32 (nanochat.gpt.GPT.forward without targets), at most three live at once.
PREFILL_LOGIT_BYTES = 12.0
USABLE_FRACTION = 0.92  # of a card's free memory: the allocator's fragmentation, cuBLAS/NCCL workspaces
# The tensor each block Linear reads (q, k and v read the same one): a frozen Linear's input is kept
# only when an adapter reads it, so its width comes off the full fine-tune's ACT_PER_LAYER otherwise.
LINEAR_INPUTS = {"attn.c_q": "attn_in", "attn.c_k": "attn_in", "attn.c_v": "attn_in",
                 "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_hidden"}


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    matrices: int  # transformer.h: Muon
    wte: int
    lm_head: int

    @property
    def adamw(self) -> int:
        return self.wte + self.lm_head


@dataclasses.dataclass(frozen=True)
class LoraShape:
    """What the plan needs of a LoRA run: --lora_rank, --lora_targets, --lora_dropout."""

    rank: int
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0
    optimizer: str = LORA_OPTIMIZER  # "muon": one state per adapter entry, "adamw": two

    @classmethod
    def of(cls, settings) -> LoraShape | None:
        """The LoRA shape of TrainSettings (None for full fine-tuning: lora_rank 0)."""
        if settings.lora_rank <= 0:
            return None
        return cls(settings.lora_rank, tuple(lora_target_names(settings.lora_targets)), settings.lora_dropout)

    @property
    def optimizer_bytes(self) -> int:
        return 8 if self.optimizer == "adamw" else 4


def adapted_linears(config: GPTConfig, lora: LoraShape) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every Linear peft adapts: those whose last name part is
    one of the targets (peft's matching of target_modules), on a meta-device GPT."""
    with torch.device("meta"):
        model = GPT(config)
    return [(name, m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora.targets]


def count_adapter_params(config: GPTConfig, lora: LoraShape) -> int:
    """The trainable parameters of a LoRA run: r x in (A) + out x r (B) per adapted Linear."""
    return sum(lora.rank * (fan_in + fan_out) for _, fan_in, fan_out in adapted_linears(config, lora))


def block_linears(config: GPTConfig) -> list[tuple[str, int]]:
    """(name within the block, in_features) of the Linears of one transformer block (meta device)."""
    with torch.device("meta"):
        block = Block(config, 0)
    return [(name, m.in_features) for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]


def lora_block_bytes(config: GPTConfig, lora: LoraShape, a: int, mask: int) -> float:
    """Per position and block: what a LoRA step keeps minus what a full fine-tuning step keeps
    (a bytes per activation, `mask` bytes per dropout mask element; see the module docstring)."""
    widths, read = {}, set()
    extra = 0.0
    for name, fan_in in block_linears(config):
        group = LINEAR_INPUTS[name]
        widths[group] = fan_in
        if name.rsplit(".", 1)[-1] not in lora.targets:
            continue
        extra += lora.rank * a  # A's output, B's input
        if lora.dropout > 0:
            extra += fan_in * (a + mask)  # the dropped-out input (A's input) and the mask
        else:
            read.add(group)  # A reads the very tensor the base Linear reads
    return extra - a * sum(w for group, w in widths.items() if group not in read)


def count_params(config: GPTConfig) -> ParamCounts:
    """Parameter counts of a GPT of `config`, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = GPT(config)
    matrices = sum(p.numel() for p in model.transformer.h.parameters())
    wte = model.transformer.wte.weight.numel()
    lm_head = model.lm_head.weight.numel()
    return ParamCounts(total=model.num_params(), matrices=matrices, wte=wte, lm_head=lm_head)


def activation_bytes(config: GPTConfig, batch: int, seq: int, bf16: bool = True, chunked: bool = True,
                     supervised_fraction: float = 1.0, lora: LoraShape | None = None) -> dict:
    """Bytes of activations of one micro-batch of batch x seq positions: {"blocks", "logits",
    "weight_copies", "total"}. chunked False: as if the loss materialised all the logits. lora:
    the activations of a LoRA step instead (None: full fine-tuning)."""
    a = 2 if bf16 else 4
    n = batch * seq
    c = config.n_embd
    kv = config.n_kv_head * (c // config.n_head)
    blocks = n * a * (config.n_layer * (ACT_PER_LAYER * c + ACT_PER_KV * kv) + ACT_OUTSIDE * c
                      + BACKWARD_TRANSIENT * c)
    if lora is not None:  # bf16 runs on CUDA (a bool mask), fp32 plans are CPU's (a float noise tensor)
        blocks += n * config.n_layer * lora_block_bytes(config, lora, a, 1 if bf16 else a)
    supervised = math.ceil(n * supervised_fraction)
    rows = min(supervised, max(1, gpt.LOSS_CHUNK_LOGITS // config.vocab_size)) if chunked else supervised
    logits = rows * config.vocab_size * (LOGIT_BYTES + (2 if bf16 else 0))  # + the bf16 matmul output
    counts = count_params(config)
    adapters = count_adapter_params(config, lora) if lora is not None else 0
    weight_copies = 2 * (counts.matrices + counts.lm_head + adapters) if bf16 else 0
    return {"blocks": int(blocks), "logits": int(logits), "weight_copies": int(weight_copies),
            "total": int(blocks + logits + weight_copies)}


def fixed_bytes(config: GPTConfig, lora: LoraShape | None = None) -> dict:
    """What a step holds whatever the batch: {"params", "grads", "optimizer", "trainable"} (bytes,
    and the count of trainable parameters). Full fine-tuning: fp32 weights and gradients, Muon on
    the matrices and AdamW on wte/lm_head; LoRA: the fp32 frozen base plus the adapters, gradients
    and optimizer states of the adapters only."""
    counts = count_params(config)
    if lora is None:
        return {"params": 4 * counts.total, "grads": 4 * counts.total,
                "optimizer": 4 * counts.matrices + 8 * counts.adamw, "trainable": counts.total}
    adapters = count_adapter_params(config, lora)
    return {"params": 4 * (counts.total + adapters), "grads": 4 * adapters,
            "optimizer": lora.optimizer_bytes * adapters, "trainable": adapters}


def memory_plan(config: GPTConfig, batch: int, seq: int, bf16: bool = True, chunked: bool = True,
                supervised_fraction: float = 1.0, free: int | None = None, lora: LoraShape | None = None) -> dict:
    """Every figure of the plan in bytes, plus whether it fits `free` bytes (None: unknown) and
    the largest device batch that does. lora: the plan of a LoRA run (None: full fine-tuning)."""
    counts = count_params(config)
    fixed = fixed_bytes(config, lora)
    params, grads, optimizer = fixed["params"], fixed["grads"], fixed["optimizer"]
    acts = activation_bytes(config, batch, seq, bf16, chunked, supervised_fraction, lora)
    unchunked = activation_bytes(config, batch, seq, bf16, False, supervised_fraction, lora)
    static = params + grads + optimizer
    plan = {
        "n_layer": config.n_layer, "n_embd": config.n_embd, "vocab_size": config.vocab_size,
        "batch": batch, "seq": seq, "bf16": bf16, "params_count": counts.total, "lora": lora,
        "trainable": fixed["trainable"], "params": params, "grads": grads, "optimizer": optimizer,
        "activations": acts["total"], "activations_blocks": acts["blocks"], "logits": acts["logits"],
        "weight_copies": acts["weight_copies"], "activations_unchunked": unchunked["total"],
        "total": static + acts["total"], "total_unchunked": static + unchunked["total"],
        "free": free, "fits": None, "max_batch": None, "max_batch_unchunked": None,
    }
    if free is not None:
        plan["fits"] = plan["total"] <= USABLE_FRACTION * free
        plan["max_batch"] = max_batch(config, seq, free, bf16, True, supervised_fraction, lora=lora)
        plan["max_batch_unchunked"] = max_batch(config, seq, free, bf16, False, supervised_fraction, lora=lora)
    return plan


def max_batch(config: GPTConfig, seq: int, free: int, bf16: bool = True, chunked: bool = True,
              supervised_fraction: float = 1.0, limit: int = 4096, lora: LoraShape | None = None) -> int:
    """The largest device batch whose plan fits USABLE_FRACTION x free bytes (0: not even 1)."""
    fixed = fixed_bytes(config, lora)
    budget = USABLE_FRACTION * free - (fixed["params"] + fixed["grads"] + fixed["optimizer"])

    def fits(b):
        return activation_bytes(config, b, seq, bf16, chunked, supervised_fraction, lora)["total"] <= budget

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


# ----------------------------------------------------------------------------- the RL stage

def kv_cache_bytes(config: GPTConfig, rows: int, positions: int, bf16: bool = True) -> int:
    """nanochat.engine.KVCache's tensor: (n_layer, 2, rows, n_kv_head, positions, head_dim) in the
    compute dtype (bf16 autocast: 2 bytes, fp32: 4)."""
    head_dim = config.n_embd // config.n_head
    return config.n_layer * 2 * rows * config.n_kv_head * positions * head_dim * (2 if bf16 else 4)


def prompts_per_call(rows: int, samples_per_question: int) -> int:
    """The most distinct prompts in one generate call of `rows` consecutive rows of a step, whose
    questions each fill samples_per_question rows in a row (calls start at multiples of rows)."""
    k = samples_per_question
    return min(rows, max((start + rows - 1) // k - start // k + 1 for start in range(0, math.lcm(rows, k), rows)))


def rollout_bytes(config: GPTConfig, rows: int, prompt_len: int, max_new_tokens: int, bf16: bool = True,
                  distinct: int | None = None) -> dict:
    """Bytes of generating rows replies at once (Engine.generate_multi, no autograd) to `distinct`
    different prompts (None: all different): {"kv_cache", "prefill" (the prefill's transient: the
    logits of every position of each distinct prompt, the widest block tensors, the (T, T) boolean
    attention mask of left-padded rows, and with shared prompts their own cache, copied to the rows),
    "decode_logits" (one decode step's), "total"}."""
    a = 2 if bf16 else 4
    distinct = rows if distinct is None else distinct
    kv = kv_cache_bytes(config, rows, prompt_len + max_new_tokens, bf16)
    positions = distinct * prompt_len
    prefill = positions * (config.vocab_size * PREFILL_LOGIT_BYTES + BACKWARD_TRANSIENT * config.n_embd * a
                           + prompt_len)
    if distinct < rows:
        prefill += kv_cache_bytes(config, distinct, prompt_len, bf16)
    decode_logits = rows * config.vocab_size * PREFILL_LOGIT_BYTES
    return {"kv_cache": int(kv), "prefill": int(prefill), "decode_logits": int(decode_logits),
            "total": int(kv + max(prefill, decode_logits))}


def rl_plan(config: GPTConfig, generation_batch_size: int, device_batch_size: int, prompt_len: int,
            max_new_tokens: int, samples_per_question: int = 16, bf16: bool = True, free: int | None = None,
            lora: LoraShape | None = None) -> dict:
    """The RL stage's memory (bytes): the fixed weights and optimizer states, the rollout's and the
    update's peaks (see the module docstring), the total (the larger peak), and with `free` whether
    it fits and the largest generation and device batches that do."""
    fixed = fixed_bytes(config, lora)
    resident = fixed["params"] + fixed["optimizer"]
    distinct = prompts_per_call(generation_batch_size, samples_per_question)
    rollout = rollout_bytes(config, generation_batch_size, prompt_len, max_new_tokens, bf16, distinct)
    seq = prompt_len + max_new_tokens
    update = activation_bytes(config, device_batch_size, seq, bf16, lora=lora)
    plan = {
        "n_layer": config.n_layer, "n_embd": config.n_embd, "vocab_size": config.vocab_size, "bf16": bf16,
        "params_count": count_params(config).total, "lora": lora, "trainable": fixed["trainable"],
        "generation_batch_size": generation_batch_size, "device_batch_size": device_batch_size,
        "samples_per_question": samples_per_question, "prompts_per_call": distinct,
        "prompt_len": prompt_len, "max_new_tokens": max_new_tokens,
        "params": fixed["params"], "grads": fixed["grads"], "optimizer": fixed["optimizer"],
        "kv_cache": rollout["kv_cache"], "prefill": rollout["prefill"], "decode_logits": rollout["decode_logits"],
        "rollout_total": resident + rollout["total"], "activations": update["total"],
        "update_total": resident + fixed["grads"] + update["total"],
        "free": free, "fits": None, "max_generation_batch": None, "max_device_batch": None,
    }
    plan["total"] = max(plan["rollout_total"], plan["update_total"])
    if free is not None:
        plan["fits"] = plan["total"] <= USABLE_FRACTION * free
        plan["max_generation_batch"] = max_generation_batch(config, prompt_len, max_new_tokens, free,
                                                            samples_per_question, bf16, lora=lora)
        plan["max_device_batch"] = max_batch(config, seq, free, bf16, lora=lora)
    return plan


def max_generation_batch(config: GPTConfig, prompt_len: int, max_new_tokens: int, free: int,
                         samples_per_question: int = 16, bf16: bool = True, limit: int = 4096,
                         lora: LoraShape | None = None) -> int:
    """The most rows decoded together whose rollout fits USABLE_FRACTION x free bytes (0: not one).
    Rows are scanned one by one: the distinct prompts of a call do not grow evenly with its rows."""
    fixed = fixed_bytes(config, lora)
    budget = USABLE_FRACTION * free - (fixed["params"] + fixed["optimizer"])
    cache_per_row = kv_cache_bytes(config, 1, prompt_len + max_new_tokens, bf16)
    best = 0
    for rows in range(1, min(limit, int(budget // cache_per_row)) + 1):
        distinct = prompts_per_call(rows, samples_per_question)
        if rollout_bytes(config, rows, prompt_len, max_new_tokens, bf16, distinct)["total"] <= budget:
            best = rows
    return best


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


def _lora_lines(plan: dict) -> list[str]:
    """The line that says a plan is a LoRA one (rank, targets, trainable parameters); none for full."""
    lora = plan["lora"]
    if lora is None:
        return []
    dropout = f", dropout {lora.dropout:g}" if lora.dropout > 0 else ""
    return [f"LoRA plan: rank {lora.rank} on {', '.join(lora.targets)}{dropout}; {plan['trainable']:,} trainable "
            f"parameters ({plan['trainable'] / plan['params_count']:.2%} of the model), the base frozen in fp32"]


def _static_rows(plan: dict) -> list[str]:
    """The parameters / gradients / optimizer rows of format_plan's table."""
    if plan["lora"] is None:
        return [f"| parameters (fp32) | {_gb(plan['params'])} |",
                f"| gradients (fp32) | {_gb(plan['grads'])} |",
                f"| optimizer states (Muon momentum, AdamW 2 moments) | {_gb(plan['optimizer'])} |"]
    states = "AdamW 2 moments" if plan["lora"].optimizer == "adamw" else "Muon momentum"
    return [f"| parameters (fp32: frozen base + adapters) | {_gb(plan['params'])} |",
            f"| gradients (fp32, adapters only) | {_gb(plan['grads'])} |",
            f"| optimizer states ({states}, adapters only) | {_gb(plan['optimizer'])} |"]


def format_plan(plan: dict, title: str = "") -> str:
    """The plan as a small markdown table (and its verdict)."""
    chunk = "" if plan["logits"] == 0 else " (chunked loss)"
    lines = [title] if title else []
    lines += [
        f"d{plan['n_layer']} (n_embd {plan['n_embd']}, vocab {plan['vocab_size']:,}, "
        f"{plan['params_count']:,} parameters), device batch {plan['batch']} x {plan['seq']} positions, "
        f"{'bf16 autocast' if plan['bf16'] else 'fp32'}",
        *_lora_lines(plan),
        "",
        "| | memory |",
        "|---|---:|",
        *_static_rows(plan),
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


def readme_table(depths=(20, 32), cards_gb=CARDS_GB, seq: int = 2048, lora_rank: int = 0) -> str:
    """Markdown: for each published model, the fixed memory, the activations per row of `seq`
    positions, and the largest --device_batch_size on each card (bf16 autocast, chunked loss;
    a card's memory taken as all free); with lora_rank > 0 a LoRA row of that rank (every block
    projection, the default --lora_targets) under each model's full fine-tuning row."""
    header = "| model | params + grads + optimizer | activations per row | " + \
             " | ".join(f"{g} GB card" for g in cards_gb) + " |"
    lora_note = (f"; LoRA rows: rank {lora_rank} on {', '.join(LORA_TARGETS)}, {LORA_OPTIMIZER.capitalize()} "
                 f"on the adapters, the base frozen in fp32" if lora_rank > 0 else "")
    lines = [f"Largest `--device_batch_size` at `--max_seq_len {seq}` (bf16 autocast, chunked loss, every "
             f"position supervised, {USABLE_FRACTION:.0%} of the card usable{lora_note}; `sciassist_train.py "
             f"--dry_run` prints it for your card):", "", header, "|---|---:|---:|" + "---:|" * len(cards_gb)]
    for depth in depths:
        config = PUBLISHED[depth] if depth in PUBLISHED else config_for_depth(depth)
        lines.append(_table_row(config, cards_gb, seq, None))
        if lora_rank > 0:
            lines.append(_table_row(config, cards_gb, seq, LoraShape(lora_rank)))
    return "\n".join(lines)


def _table_row(config: GPTConfig, cards_gb, seq: int, lora: LoraShape | None) -> str:
    """One row of readme_table: full fine-tuning (lora None) or LoRA of `config`."""
    one = memory_plan(config, 1, seq, lora=lora)
    static = one["params"] + one["grads"] + one["optimizer"]
    per_row = (activation_bytes(config, 2, seq, lora=lora)["blocks"]
               - activation_bytes(config, 1, seq, lora=lora)["blocks"])
    cells = []
    for g in cards_gb:
        b = max_batch(config, seq, g * GB, lora=lora)
        cells.append(str(b) if b else "does not fit")
    name = f"d{config.n_layer} ({one['params_count'] / 1e6:.0f}M)" + (f", LoRA r={lora.rank}" if lora else "")
    return f"| {name} | {_gb(static)} | {_gb(per_row)} | " + " | ".join(cells) + " |"


def rl_table(depths=(20, 32), cards_gb=CARDS_GB, prompt_len: int = 512, max_new_tokens: int = 256,
             samples_per_question: int = 16, lora_rank: int = 0) -> str:
    """Markdown: for each published model (and, with lora_rank > 0, its LoRA run), the RL stage's
    fixed memory, the rollout and update memory per row, and on each card the largest
    --generation_batch_size / --device_batch_size (bf16 autocast, a card's memory taken as all free)."""
    seq = prompt_len + max_new_tokens
    lines = [f"RL: largest `--generation_batch_size` / `--device_batch_size` with prompts of {prompt_len} tokens "
             f"and `--max_new_tokens {max_new_tokens}` (bf16 autocast, {USABLE_FRACTION:.0%} of the card usable; "
             f"a generation batch of {samples_per_question} rows is one question's "
             f"`--samples_per_question {samples_per_question}`):", "",
             "| model | weights + grads + optimizer | KV cache per row | prefill per prompt | update per row | "
             + " | ".join(f"{g} GB card" for g in cards_gb) + " |",
             "|---|---:|---:|---:|---:|" + "---:|" * len(cards_gb)]
    for depth in depths:
        config = PUBLISHED[depth] if depth in PUBLISHED else config_for_depth(depth)
        for lora in (None, LoraShape(lora_rank)) if lora_rank > 0 else (None,):
            one = rl_plan(config, 1, 1, prompt_len, max_new_tokens, samples_per_question, lora=lora)
            static = one["params"] + one["grads"] + one["optimizer"]
            update_row = (activation_bytes(config, 2, seq, lora=lora)["blocks"]
                          - activation_bytes(config, 1, seq, lora=lora)["blocks"])
            cells = []
            for g in cards_gb:
                p = rl_plan(config, 1, 1, prompt_len, max_new_tokens, samples_per_question, free=g * GB, lora=lora)
                generation, device = p["max_generation_batch"], p["max_device_batch"]
                cells.append(f"{generation} / {device}" if generation and device else "does not fit")
            name = f"d{config.n_layer} ({one['params_count'] / 1e6:.0f}M)" + (f", LoRA r={lora.rank}" if lora else "")
            lines.append(f"| {name} | {_gb(static)} | {_gb(one['kv_cache'])} | {_gb(one['prefill'])} | "
                         f"{_gb(update_row)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_rl_plan(plan: dict) -> str:
    """An RL plan as a small markdown table (and its verdict)."""
    lines = [f"RL, d{plan['n_layer']} (n_embd {plan['n_embd']}, vocab {plan['vocab_size']:,}, "
             f"{plan['params_count']:,} parameters), prompts of {plan['prompt_len']} + {plan['max_new_tokens']} new "
             f"tokens, {'bf16 autocast' if plan['bf16'] else 'fp32'}", *_lora_lines(plan), "",
             "| | memory |", "|---|---:|", *_static_rows(plan),
             f"| rollout: KV cache of {plan['generation_batch_size']} rows | {_gb(plan['kv_cache'])} |",
             f"| rollout: prefill transient ({plan['prompts_per_call']} distinct prompt(s) per call, logits of every "
             f"position) | {_gb(plan['prefill'])} |",
             f"| rollout: one decode step's logits | {_gb(plan['decode_logits'])} |",
             f"| update: activations of {plan['device_batch_size']} rows | {_gb(plan['activations'])} |",
             f"| rollout peak (weights, optimizer, cache, prefill) | {_gb(plan['rollout_total'])} |",
             f"| update peak (weights, gradients, optimizer, activations) | {_gb(plan['update_total'])} |",
             f"| **total (the larger peak)** | **{_gb(plan['total'])}** |"]
    if plan["free"] is None:
        lines += ["", "no GPU visible: free memory unknown, so no verdict (`--rl --table` lists the cards)"]
    else:
        lines += [f"| GPU free memory | {_gb(plan['free'])} (usable {USABLE_FRACTION:.0%}) |", "",
                  f"fits: {'yes' if plan['fits'] else 'NO'}; largest --generation_batch_size: "
                  f"{plan['max_generation_batch']}, largest --device_batch_size: {plan['max_device_batch']}"]
    return "\n".join(lines)


@dataclasses.dataclass
class PlanCommand:
    table: bool = setting(False, "only the d20 / d32 table on 16, 24, 40, 80 GB cards (markdown)")
    seq: int = setting(2048, "positions per row", at_least=16, at_most=MAX_POSITIONS)
    lora_rank: int = setting(16, "rank of the LoRA rows (0: full fine-tuning only)", at_least=0, at_most=MAX_LORA_RANK)
    rl: bool = setting(False, "the RL stage's plan (sciassist.train.rl) instead of fine-tuning's")
    prompt_len: int = setting(512, "--rl: prompt tokens per row (the longest prompt of a batch)", at_least=1,
                              at_most=MAX_POSITIONS)
    max_new_tokens: int = setting(256, "--rl: reply tokens per row", at_least=1, at_most=MAX_POSITIONS)
    samples_per_question: int = setting(16, "--rl: replies per question (k)", at_least=1, at_most=4096)
    generation_batch_size: int = setting(32, "--rl: rows decoded together, for the d20 plan", at_least=1,
                                         at_most=4096)
    device_batch_size: int = setting(8, "--rl: rows per forward/backward, for the d20 plan", at_least=1,
                                     at_most=4096)


def main(argv=None) -> int:
    parser = settings_parser(PlanCommand, "python -m sciassist.train.plan", __doc__)
    args = settings_from_namespace(PlanCommand, parser.parse_args(argv))
    if args.rl:
        print(rl_table(prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
                       samples_per_question=args.samples_per_question, lora_rank=args.lora_rank))
        if not args.table:
            print("\n" + format_rl_plan(rl_plan(PUBLISHED[20], args.generation_batch_size, args.device_batch_size,
                                               args.prompt_len, args.max_new_tokens, args.samples_per_question,
                                               free=gpu_free_bytes())))
        return 0
    print(readme_table(seq=args.seq, lora_rank=args.lora_rank))
    if not args.table:
        lora = LoraShape(args.lora_rank) if args.lora_rank > 0 else None
        for shape in (None, lora) if lora else (None,):
            print("\n" + format_plan(memory_plan(PUBLISHED[20], 8, args.seq, free=gpu_free_bytes(), lora=shape)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

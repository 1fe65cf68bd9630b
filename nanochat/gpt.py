"""
The nanochat GPT, checkpoint-compatible with the published nanochat models (Oct 2025 - Jan 2026).

Read top to bottom it is the forward pass:
    x = norm(wte(idx))
    for each block:  x = x + attn(norm(x));  x = x + mlp(norm(x))
    logits = 15 * tanh(lm_head(norm(x)) / 15)

Details that matter for loading published weights (any of them wrong still "trains", but
breaks the loaded model):
- RMSNorm has no learnable weight; eps is the dtype's machine epsilon (F.rms_norm's default).
- Rotary embeddings use the half-split convention and rotate by minus theta; the cos/sin
  tables are rounded to bf16 on every device, as the reference does.
- QK norm is applied AFTER rotary.
- The MLP is relu(x)^2; no Linear has a bias; lm_head is untied from wte.

Precision. Every RMS norm returns its input's dtype. torch >= 2.12 puts rms_norm on CUDA
autocast's fp32 list, so under bf16 autocast q and k would leave the QK norm in fp32 while v
stays bf16 (and the attention kernel would see mixed dtypes); keeping the input's dtype gives
the numbers torch <= 2.11 gives, on every release.

Beyond the reference, forward() takes the layout of packed rows (`layout`, a
nanochat.attention.PackedLayout built by whoever packed them) so several conversations share a
row without attending to each other (padding-free fine-tuning); `doc_ids` describe the same
with ids (read back to the host once), also with a KV cache (batched generation of prompts of
different lengths). Packed rows without a cache go through nanochat.attention (varlen / flex /
dense / per-document kernels, each checked before use). A SharedPrefix (shared_prefix()) is a
prefix run once whose keys and values, with their graph, every row of later passes continues:
what RL's update uses to run a question's prompt once for all of its replies.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nanochat import attention, optim


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 20
    n_head: int = 10
    n_kv_head: int = 10
    n_embd: int = 1280


def config_for_depth(depth, vocab_size=65536, sequence_len=2048):
    """nanochat's training scripts derive the width from the depth: 64 channels per layer,
    heads of 128 channels."""
    n_embd = depth * 64
    n_head = max(1, math.ceil(n_embd / 128))
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd)


def norm(x):
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)  # the input's dtype on every torch (see above)


def apply_rotary(x, cos, sin):
    """x: (B, T, H, D); cos, sin: broadcastable to (B, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


def positions_in_document(doc_ids):
    """For each position, its offset from the start of its document (a run of equal ids).
    doc_ids (B, T) -> (B, T) long."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    is_start = torch.ones_like(doc_ids, dtype=torch.bool)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    run_start = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - run_start


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.eager_attention = None  # set by GPT.compile_for_training: packed attention outside the graph

    def keys_values(self, x, cos, sin):
        """k (rotated, then normed) and v of x: each (B, T, n_kv_head, head_dim)."""
        B, T, C = x.shape
        k = norm(apply_rotary(self.c_k(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin))
        return k, self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)

    def forward(self, x, cos, sin, kv_cache, attn_mask):
        B, T, C = x.shape
        q = norm(apply_rotary(self.c_q(x).view(B, T, self.n_head, self.head_dim), cos, sin))
        k, v = self.keys_values(x, cos, sin)
        if isinstance(attn_mask, attention.PackedRows):
            # Packed rows (no cache): causal attention within each document segment.
            y = (self.eager_attention or attention.packed_attention)(q, k, v, attn_mask)
            return self.c_proj(y.reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        if self.n_kv_head != self.n_head:
            # Grouped-query attention: each kv head serves n_head / n_kv_head query heads.
            repeat = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        Tq, Tk = q.size(2), k.size(2)
        if attn_mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        elif Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v)  # one new token sees the whole cache
        else:
            # A chunk after a cached prefix: the whole prefix, then causal within the chunk.
            prefix = Tk - Tq
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=prefix)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, attn_mask):
        x = x + self.attn(norm(x), cos, sin, kv_cache, attn_mask)
        x = x + self.mlp(norm(x))
        return x


class SharedPrefix:
    """The keys and values of every layer for one prefix (batch 1), kept with their autograd
    graph, that every row of later forward passes continues (GPT.shared_prefix builds it; pass it
    as kv_cache). Each layer's attention sees the prefix broadcast over the rows, then the row's
    own positions, causally; rotary positions continue from the prefix's length. Unlike a
    KVCache it does not grow: every forward continues the same prefix, so several batches of
    rows can share one (detached() and backward_from() carry their gradients into it once)."""

    def __init__(self):
        self.keys, self.values = {}, {}  # layer -> (1, n_kv_head, P, head_dim)
        self.pos = 0  # the prefix's length: the rows' first rotary position
        self.doc_ids = None  # (what GPT.forward reads of a cache: rows are not packed)
        self.sealed = False  # False while GPT.shared_prefix stores the prefix's own keys/values

    def insert_kv(self, layer_idx, k, v):
        if not self.sealed:
            self.keys[layer_idx], self.values[layer_idx] = k, v
            return k, v
        if layer_idx not in self.keys:  # an empty prefix
            return k, v
        B = k.size(0)
        return (torch.cat([self.keys[layer_idx].expand(B, -1, -1, -1), k], dim=2),
                torch.cat([self.values[layer_idx].expand(B, -1, -1, -1), v], dim=2))

    def advance(self, T):
        if not self.sealed:
            self.pos += T

    def seal(self):
        self.sealed = True
        return self

    def tensors(self):
        return [t for layer in sorted(self.keys) for t in (self.keys[layer], self.values[layer])]

    def detached(self):
        """The same prefix as leaves of the graph: backward passes through rows that continue it
        stop there, their gradients adding up in the leaves' .grad (then backward_from())."""
        copy = SharedPrefix()
        for layer in self.keys:
            copy.keys[layer] = self.keys[layer].detach().requires_grad_(self.keys[layer].requires_grad)
            copy.values[layer] = self.values[layer].detach().requires_grad_(self.values[layer].requires_grad)
        copy.pos = self.pos
        return copy.seal()

    def backward_from(self, detached):
        """Backward through the prefix's graph of the gradients gathered by `detached` (a
        detached() copy): with several batches of rows, the prefix's own backward runs once."""
        pairs = [(t, d.grad) for t, d in zip(self.tensors(), detached.tensors(), strict=True) if d.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


# Above this many logits (B*T*V) the loss is computed in chunks whose logits are recomputed
# in the backward pass: d20 at batch 8 x 2048 would otherwise hold 4.3 GB of fp32 logits
# (plus as much again for their gradient). Costs ~5% extra compute, only when it is needed.
LOSS_CHUNK_LOGITS = 2**27
SOFTCAP = 15.0


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # On the meta device (loading a checkpoint) skip nn.Embedding's random init: it
        # would import torch's compiler stack just to fill a tensor that has no data.
        on_meta = torch.empty(0).device.type == "meta"
        wte_weight = torch.empty(config.vocab_size, config.n_embd) if on_meta else None
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd, _weight=wte_weight),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables cover 10x the training length so generation can run past it.
        # Not saved in checkpoints (persistent=False), rebuilt by init_rotary().
        self.rotary_seq_len = config.sequence_len * 10
        self.init_rotary()
        self.chunk_loss = _chunk_loss  # compile_for_training swaps in a compiled one
        self._attention_kernel = None  # a kernel asked for by name; None: the first that passes its check
        self._checked_kernels = {}  # (device, dtype) -> the kernel chosen and checked for it

    @property
    def attention_kernel(self):
        """The kernel packed rows use ("varlen", "flex", "dense" or "loop") on the model's device
        and compute dtype (the autocast dtype when autocast is on, so read it inside the
        forward's autocast): the one set by name if it passes its check (else
        attention.AttentionKernelError), otherwise attention.choose_kernel's choice."""
        device = self.get_device()
        try:
            autocast = torch.is_autocast_enabled(device.type)
        except RuntimeError:  # a device autocast does not know (meta)
            autocast = False
        dtype = torch.get_autocast_dtype(device.type) if autocast else self.transformer.wte.weight.dtype
        kernel = self._checked_kernels.get((device, dtype))
        if kernel is None:
            c = self.config
            kernel = attention.choose_kernel(device, dtype, c.n_head, c.n_kv_head, c.n_embd // c.n_head,
                                             forced=self._attention_kernel)
            self._checked_kernels[(device, dtype)] = kernel
        return kernel

    @attention_kernel.setter
    def attention_kernel(self, name):
        if name is not None and name not in attention.KERNELS:
            raise ValueError(f"unknown attention kernel {name!r}; expected one of {attention.KERNELS}")
        self._attention_kernel = name
        self._checked_kernels = {}

    def init_rotary(self, device=None):
        """(Re)build the rotary cos/sin tables, e.g. after the model was created on the meta
        device and moved with to_empty()."""
        head_dim = self.config.n_embd // self.config.n_head
        if device is None:
            device = self.transformer.wte.weight.device
        base = 10000
        if device.type == "meta":
            cos = torch.empty(self.rotary_seq_len, head_dim // 2, dtype=torch.bfloat16, device=device)
            sin = torch.empty_like(cos)
        else:
            inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
            t = torch.arange(self.rotary_seq_len, dtype=torch.float32, device=device)
            angles = torch.outer(t, inv_freq)
            cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Random initialisation for training from scratch: unit-variance embeddings, a small
        lm_head, uniform projections scaled by fan-in, and zero output projections so every
        block starts as the identity."""
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0) * lin.weight.size(1) ** -0.5
                torch.nn.init.uniform_(lin.weight, -bound, bound)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        self.init_rotary()

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """Forward+backward FLOPs per token: 6 per matmul weight (embedding lookups are free)
        plus the attention score/value matmuls at full context."""
        c = self.config
        head_dim = c.n_embd // c.n_head
        matmul_params = self.num_params() - self.transformer.wte.weight.numel()
        return 6 * matmul_params + 12 * c.n_layer * c.n_head * head_dim * c.sequence_len

    def setup_optimizers(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                         muon_dtype=None):
        return optim.setup_optimizers(self, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                      matrix_lr=matrix_lr, weight_decay=weight_decay, muon_dtype=muon_dtype)

    def compile_for_training(self, backend="inductor"):
        """torch.compile each block and the loss, in place, with dynamic shapes, the packed
        attention left out of the graph (it runs its own kernel; its per-document Python work
        would otherwise make a graph per row layout). Packed rows change shape every step; this
        way a run compiles a fixed handful of graphs, not one per step. State dict keys do not
        change (nothing is wrapped)."""
        eager = torch.compiler.disable(attention.packed_attention)
        for block in self.transformer.h:
            block.attn.eager_attention = eager
            block.compile(backend=backend, dynamic=True)
        self.chunk_loss = torch.compile(_chunk_loss, backend=backend, dynamic=True)

    def uncompile(self):
        """Undo compile_for_training."""
        for block in self.transformer.h:
            block.attn.eager_attention = None
            block._compiled_call_impl = None
        self.chunk_loss = _chunk_loss

    def _positions_and_mask(self, B, T, device, kv_cache, doc_ids, layout):
        """Rotary positions (B or 1, T) and what attention needs: None for plain causal,
        attention.PackedRows for packed rows, a boolean mask for packed rows with a KV cache."""
        start = kv_cache.pos if kv_cache is not None else 0
        if layout is None and doc_ids is None:
            if kv_cache is not None and kv_cache.doc_ids is not None:
                raise ValueError("this KV cache was filled with doc_ids; pass doc_ids for the new tokens too")
            self._check_positions(start + T)
            return torch.arange(start, start + T, device=device).unsqueeze(0), None
        if doc_ids is not None and doc_ids.shape != (B, T):
            raise ValueError(f"doc_ids must have shape {(B, T)}, got {tuple(doc_ids.shape)}")
        if kv_cache is None:
            # Packed rows: everything comes from the layout's host-side description.
            if layout is None:
                layout = attention.PackedLayout.from_doc_ids(doc_ids)
            if (layout.B, layout.T) != (B, T):
                raise ValueError(f"the packed layout is for {(layout.B, layout.T)}, the batch is {(B, T)}")
            self._check_positions(layout.max_seqlen)
            positions = layout.positions.to(device, non_blocking=True)
            return positions, attention.kernel_inputs(layout, self.attention_kernel, device)
        if doc_ids is None:
            raise ValueError("with a KV cache, packed rows are described by doc_ids")
        all_ids = kv_cache.insert_doc_ids(doc_ids)  # (B, start + T)
        positions = positions_in_document(all_ids)[:, start:]
        self._check_positions(int(positions.max()) + 1)
        Tk = all_ids.size(1)
        causal = torch.ones(T, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - T)
        same_doc = doc_ids.unsqueeze(2) == all_ids.unsqueeze(1)  # (B, T, Tk)
        return positions, (same_doc & causal).unsqueeze(1)

    def _check_positions(self, count):
        if count > self.cos.size(0):
            raise ValueError(f"sequence position {count - 1} is beyond the rotary table ({self.cos.size(0)} positions)")

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean", doc_ids=None, layout=None,
                supervised_index=None):
        """Logits (targets=None) or the loss. Packed rows: `layout` (attention.PackedLayout,
        what training passes) or `doc_ids` (B, T). supervised_index: the flat indices (into
        B*T) of the positions whose target is not -1, when the caller knows them on the host
        (training): the loss then needs nothing read back from the device. With
        loss_reduction "none" only those positions get logits (the others get 0, as ignored
        targets do); without it "none" computes the logits of every position."""
        B, T = idx.shape
        positions, attn_mask = self._positions_and_mask(B, T, idx.device, kv_cache, doc_ids, layout)
        cos = self.cos[positions].unsqueeze(2)  # (B|1, T, 1, D/2)
        sin = self.sin[positions].unsqueeze(2)

        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos, sin, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = norm(x)

        if targets is None:
            logits = self.lm_head(x).float()
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        return self._loss(x, targets, loss_reduction, supervised_index)

    def shared_prefix(self, idx):
        """A SharedPrefix of idx (1, P): its keys and values at every layer, with their graph
        when gradients are on, for forward passes whose rows all continue it (the group of RL
        replies of one prompt: the prompt runs once, not once per reply). Nothing beyond the
        last layer's keys and values is computed (no logits)."""
        B, P = idx.shape
        if B != 1:
            raise ValueError(f"a shared prefix is one row, got {B}")
        prefix = SharedPrefix()
        if P:
            self._check_positions(P)
            cos, sin = self.cos[:P][None, :, None], self.sin[:P][None, :, None]
            x = norm(self.transformer.wte(idx))
            *blocks, last = self.transformer.h
            for block in blocks:
                x = block(x, cos, sin, prefix, None)
            k, v = last.attn.keys_values(norm(x), cos, sin)
            prefix.insert_kv(last.attn.layer_idx, k.transpose(1, 2), v.transpose(1, 2))
            prefix.advance(P)
        return prefix.seal()

    def _loss(self, x, targets, loss_reduction, supervised_index=None):
        if loss_reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")
        B, T, C = x.shape
        x, targets = x.reshape(B * T, C), targets.reshape(B * T)
        if loss_reduction != "none" or supervised_index is not None:
            # Only supervised positions need logits: in chat fine-tuning about half of the
            # positions are prompts, so this halves the (large) lm_head work.
            if supervised_index is not None:
                x, targets = x.index_select(0, supervised_index), targets.index_select(0, supervised_index)
            else:
                keep = targets != -1
                x, targets = x[keep], targets[keep]
        V = self.config.vocab_size
        chunk = max(1, LOSS_CHUNK_LOGITS // V)
        if x.size(0) <= chunk:
            per_token = self.chunk_loss(x, targets, self.lm_head.weight)
        elif torch.is_grad_enabled():
            per_token = torch.cat([checkpoint(self.chunk_loss, x[i:i + chunk], targets[i:i + chunk],
                                              self.lm_head.weight, use_reentrant=False)
                                   for i in range(0, x.size(0), chunk)])
        else:
            per_token = torch.cat([self.chunk_loss(x[i:i + chunk], targets[i:i + chunk], self.lm_head.weight)
                                   for i in range(0, x.size(0), chunk)])
        if loss_reduction == "none":
            if supervised_index is not None:
                return per_token.new_zeros(B * T).index_copy(0, supervised_index, per_token).view(B, T)
            return per_token.view(B, T)  # 0 where the target is ignored
        total = per_token.sum()
        if loss_reduction == "sum":
            return total
        # An all-ignored batch gives 0, not NaN (0/0): it simply teaches nothing.
        return total / max(1, targets.numel())


def _chunk_loss(x, targets, weight):
    logits = F.linear(x, weight).float()
    logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
    return F.cross_entropy(logits, targets, ignore_index=-1, reduction="none")

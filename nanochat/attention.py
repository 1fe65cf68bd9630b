"""
Attention over packed rows: several documents (conversations) share a row and must not
attend to each other.

One description of the boundaries drives every kernel: `cu_seqlens`, the int32 cumulative
lengths of the segments over the flattened batch (B*T positions), plus `max_seqlen`, as
flash-attention's varlen API takes them. A segment is a run of equal doc ids within one row;
a row boundary always starts a new segment, and padding (doc id -1, at the end of a row) is
a segment of its own, so real tokens never attend to it.

Kernels, one per model/run (attention_kernel(device, dtype)):
- "varlen": torch.nn.attention.varlen.varlen_attn (flash-attention varlen, causal). CUDA
  with fp16/bf16 compute only (what bf16 autocast gives); GQA natively.
- "flex":   FlexAttention with a document-causal block mask, compiled. CUDA with Triton.
- "dense":  scaled_dot_product_attention with a (B, 1, T, T) boolean mask. The fallback;
  memory grows with T^2 and it rules out the flash kernel.
- "loop":   causal SDPA per segment. CPU (and anything that is not CUDA).
All of them compute the same numbers (within rounding) from the same q, k, v.
"""

import functools
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

KERNELS = ("varlen", "flex", "dense", "loop")


def cu_seqlens_from_doc_ids(doc_ids):
    """doc_ids (B, T) -> (cu_seqlens int32 (N+1,), max_seqlen int) over the B*T flattened
    positions. Segments are runs of equal ids within a row (as positions_in_document counts
    them); each row starts a new segment, so padding (-1 runs) is its own segment."""
    B, T = doc_ids.shape
    is_start = torch.ones(B, T, dtype=torch.bool, device=doc_ids.device)
    is_start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    starts = is_start.flatten().nonzero().squeeze(1)
    end = torch.tensor([B * T], dtype=starts.dtype, device=starts.device)
    cu_seqlens = torch.cat([starts, end]).to(torch.int32)
    max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
    return cu_seqlens, max_seqlen


def segment_ids(cu_seqlens, B, T):
    """The segment index of every position, (B, T) int32, from cu_seqlens."""
    marks = torch.zeros(B * T, dtype=torch.int32, device=cu_seqlens.device)
    marks[cu_seqlens[1:-1].long()] = 1
    return marks.cumsum(0, dtype=torch.int32).view(B, T)


@functools.lru_cache(maxsize=None)
def _attention_kernel(device_type, device_index, dtype):
    if device_type != "cuda":
        return "loop"
    if dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.is_flash_attention_available():
        major, _ = torch.cuda.get_device_capability(device_index)
        if major >= 8:  # torch's flash kernels need Ampere or newer
            try:
                from torch.nn.attention.varlen import varlen_attn  # noqa: F401
                return "varlen"
            except ImportError:
                pass
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        from torch.utils._triton import has_triton
        if has_triton():
            return "flex"
    except ImportError:
        pass
    return "dense"


def attention_kernel(device, dtype=torch.bfloat16):
    """The packed-row kernel for a device and the dtype attention computes in (the autocast
    dtype; bf16 on CUDA as nanochat runs): "varlen" on CUDA (Ampere+, fp16/bf16) when torch
    has varlen_attn, else "flex" when FlexAttention can compile (Triton), else "dense";
    "loop" on CPU and any other device."""
    device = torch.device(device)
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return _attention_kernel(device.type, index, dtype)


@dataclass
class PackedRows:
    """The document layout of a packed (B, T) batch, prepared once per forward for one kernel
    and shared by every layer."""
    cu_seqlens: torch.Tensor  # int32 (N+1,), over the B*T flattened positions
    max_seqlen: int
    B: int
    T: int
    kernel: str
    segments: list | None = None  # loop: [(start, end)] over the flattened positions
    mask: object = None  # dense: (B, 1, T, T) bool; flex: BlockMask


def pack_rows(doc_ids, kernel):
    """doc_ids (B, T) -> PackedRows for `kernel`; everything is derived from cu_seqlens."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    B, T = doc_ids.shape
    cu_seqlens, max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    packed = PackedRows(cu_seqlens, max_seqlen, B, T, kernel)
    if kernel == "loop":
        bounds = cu_seqlens.tolist()
        packed.segments = list(itertools.pairwise(bounds))
    elif kernel == "dense":
        packed.mask = dense_mask(cu_seqlens, B, T)
    elif kernel == "flex":
        packed.mask = block_mask(cu_seqlens, B, T)
    return packed


def dense_mask(cu_seqlens, B, T):
    """(B, 1, T, T) boolean: same segment and causal."""
    seg = segment_ids(cu_seqlens, B, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return ((seg.unsqueeze(2) == seg.unsqueeze(1)) & causal).unsqueeze(1)


def block_mask(cu_seqlens, B, T):
    """FlexAttention's document-causal BlockMask."""
    from torch.nn.attention.flex_attention import create_block_mask
    seg = segment_ids(cu_seqlens, B, T)

    def document_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, B, None, T, T, device=seg.device)


def varlen_inputs(q, k, v, packed):
    """The arguments varlen_attn takes: q (B, T, H, D), k, v (B, T, Hkv, D) ->
    (query (B*T, H, D), key, value (B*T, Hkv, D), cu_seq_q, cu_seq_k, max_q, max_k)."""
    B, T = packed.B, packed.T
    query = q.reshape(B * T, q.size(2), q.size(3))
    key = k.reshape(B * T, k.size(2), k.size(3))
    value = v.reshape(B * T, v.size(2), v.size(3))
    return query, key, value, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen, packed.max_seqlen


def repeat_kv(k, v, n_head, dim):
    """Grouped-query attention: each kv head serves n_head / n_kv_head query heads."""
    repeat = n_head // k.size(dim)
    if repeat == 1:
        return k, v
    return k.repeat_interleave(repeat, dim=dim), v.repeat_interleave(repeat, dim=dim)


def packed_attention(q, k, v, packed):
    """Causal attention within each segment. q (B, T, H, D), k, v (B, T, Hkv, D), after
    rotary and QK norm -> (B, T, H, D)."""
    B, T, H, D = q.shape
    if packed.kernel == "varlen":
        return _varlen(q, k, v, packed)
    if packed.kernel == "loop":
        return _loop(q, k, v, packed)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if packed.kernel == "flex":
        y = _flex(q, k, v, block_mask=packed.mask, enable_gqa=k.size(1) != H)
    else:
        k, v = repeat_kv(k, v, H, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=packed.mask)
    return y.transpose(1, 2)


def _loop(q, k, v, packed):
    """Causal SDPA per [cu_seqlens[i], cu_seqlens[i+1]) segment of the varlen inputs: cheaper
    on CPU than a dense mask, whose cost grows with the row, not the document."""
    query, key, value, *_ = varlen_inputs(q, k, v, packed)
    key, value = repeat_kv(key, value, query.size(1), dim=1)
    y = torch.empty_like(query)
    for s, e in packed.segments:
        y[s:e] = F.scaled_dot_product_attention(
            query[s:e].transpose(0, 1).unsqueeze(0), key[s:e].transpose(0, 1).unsqueeze(0),
            value[s:e].transpose(0, 1).unsqueeze(0), is_causal=True)[0].transpose(0, 1)
    return y.view(q.shape)


def _varlen(q, k, v, packed):
    from torch.nn.attention.varlen import varlen_attn
    query, key, value, cu_q, cu_k, max_q, max_k = varlen_inputs(q, k, v, packed)
    # Flash kernels take fp16/bf16 only; under autocast, cast as SDPA would.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the varlen attention kernel needs fp16/bf16 compute, got {dtype}; "
                         "use bf16 autocast or another kernel (attention_kernel(device, dtype))")
    y = varlen_attn(query.to(dtype), key.to(dtype), value.to(dtype), cu_q, cu_k, max_q, max_k,
                    window_size=(-1, 0), enable_gqa=key.size(1) != query.size(1))
    return y.view(q.shape)


def _flex(q, k, v, **kw):
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, **kw)
    return flex_attention(q, k, v, **kw)  # eager (CPU tests): unfused, forward only


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)

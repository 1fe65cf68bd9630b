"""
Attention over packed rows: several documents (conversations) share a row and must not
attend to each other.

The boundaries are known where the rows are packed (the collator), so they are described
there once, on the host, as a PackedLayout: `cu_seqlens`, the int32 cumulative lengths of
the segments over the flattened batch (B*T positions), `max_seqlen` as a Python int (what
flash-attention's varlen API takes), and each position's offset within its document (the
rotary position). A segment is one document's run within a row; padding at the end of a row
is a segment of its own, so real tokens never attend to it. Every kernel takes what it needs
from the layout (kernel_inputs()) without reading anything back from the device.

Kernels, in order of preference (choose_kernel):
- "varlen": torch.nn.attention.varlen.varlen_attn (flash-attention varlen). CUDA, Ampere or
  newer, fp16/bf16 compute. Called as the installed torch's signature allows (VARLEN_RELEASES).
- "flex":   FlexAttention with a document-causal block mask, compiled. CUDA with Triton,
  Ampere or newer (Triton has no tensor-core path below compute capability 8.0).
- "dense":  scaled_dot_product_attention with a (B, 1, T, T) boolean mask. Memory grows with
  T^2 and it rules out the flash kernel; what older GPUs (T4, V100) get.
- "loop":   causal SDPA per segment. CPU (and anything that is not CUDA).
All of them compute the same numbers (within rounding) from the same q, k, v; a kernel is
only used after it has shown that on this device and dtype (check_kernel).
"""

import functools
import inspect
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

KERNELS = ("varlen", "flex", "dense", "loop")

# What torch.nn.attention.varlen.varlen_attn accepts, by torch release (read from each
# release's source), and how causal attention and grouped-query heads are asked for:
#   2.9    no torch.nn.attention.varlen                        -> not a candidate
#   2.10   (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None)
#          -> is_causal=True; kv heads expanded to the query heads
#   2.11   (..., max_k, *, return_aux=None, scale=None, window_size=(-1, -1))
#          -> window_size=(-1, 0); kv heads expanded
#   2.12+  2.11's + enable_gqa=False, seqused_k=None, block_table=None, num_splits=None
#          -> window_size=(-1, 0), enable_gqa=True when there are fewer kv heads
VARLEN_RELEASES = {
    "2.10": "is_causal=True, kv heads expanded",
    "2.11": "window_size=(-1, 0), kv heads expanded",
    "2.12+": "window_size=(-1, 0), enable_gqa",
}

# Relative error ||y - reference|| / ||reference|| (output and each gradient) a kernel may show
# in its check: bf16 keeps 8 bits of mantissa (rounding ~4e-3 per value), fp16 11 bits, and
# fp32 matmuls may run in TF32 on GPUs (10 bits). A kernel that lets a document see another
# one, or drops causality, is off by 0.3 or more.
CHECK_TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


class AttentionKernelError(RuntimeError):
    """A kernel that was asked for by name cannot be used here (its check failed)."""


# ----------------------------------------------------------------------------- the layout

@dataclass
class PackedLayout:
    """Where the documents of a packed (B, T) batch start and end, built on the host by
    whoever packed the rows. cu_seqlens stays on the host (a CPU tensor): kernels copy it to
    their device; positions moves with the batch (to())."""

    B: int
    T: int
    cu_seqlens: torch.Tensor  # int32 (N+1,), CPU, over the B*T flattened positions
    max_seqlen: int
    positions: torch.Tensor  # (B, T) long: each position's offset within its document

    @classmethod
    def from_row_lengths(cls, rows, T):
        """rows: for each row, the lengths of its documents in order (sum <= T); the rest of
        a row is padding (its own segment)."""
        bounds, positions = [0], np.zeros((len(rows), T), dtype=np.int64)
        for r, lengths in enumerate(rows):
            if sum(lengths) > T:
                raise ValueError(f"row {r} holds {sum(lengths)} positions, more than T={T}")
            pos = 0
            for n in list(lengths) + [T - sum(lengths)]:
                if n:
                    positions[r, pos:pos + n] = np.arange(n)
                    bounds.append(r * T + pos + n)
                    pos += n
        cu = torch.tensor(bounds, dtype=torch.int32)
        return cls(B=len(rows), T=T, cu_seqlens=cu, max_seqlen=int(np.diff(bounds).max(initial=0)),
                   positions=torch.from_numpy(positions))

    @classmethod
    def from_doc_ids(cls, doc_ids):
        """From (B, T) document ids (runs of equal ids; -1 padding). Reads the ids back to the
        host: a convenience for callers that have ids, not the training path."""
        ids = doc_ids.detach().cpu().numpy()
        rows = []
        for row in ids:
            starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
            rows.append(np.diff(np.r_[starts, len(row)]).tolist())
        return cls.from_row_lengths(rows, ids.shape[1]) if rows else None

    def to(self, device, non_blocking=False):
        """The same layout with positions on `device` (cu_seqlens stays on the host)."""
        return PackedLayout(self.B, self.T, self.cu_seqlens, self.max_seqlen,
                            self.positions.to(device, non_blocking=non_blocking))

    def segment_ids(self):
        """The segment index of every position, (B, T) int32, on the host."""
        lengths = np.diff(self.cu_seqlens.numpy())
        return torch.from_numpy(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths).reshape(self.B, self.T))


# ----------------------------------------------------------------------------- per-kernel inputs

@dataclass
class PackedRows:
    """A layout prepared for one kernel on one device, shared by every layer of a forward."""

    layout: PackedLayout
    kernel: str
    cu_seqlens: torch.Tensor | None = None  # varlen: on the device
    lengths: list | None = None  # loop: the segments' lengths over the flattened positions
    mask: object = None  # dense: (B, 1, T, T) bool; flex: BlockMask


def kernel_inputs(layout, kernel, device):
    """What `kernel` needs of `layout` on `device`, built from host data (no read-back)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; expected one of {KERNELS}")
    packed = PackedRows(layout, kernel)
    if kernel == "varlen":
        packed.cu_seqlens = layout.cu_seqlens.to(device, non_blocking=True)
    elif kernel == "loop":
        packed.lengths = np.diff(layout.cu_seqlens.numpy()).tolist()
    elif kernel == "dense":
        packed.mask = dense_mask(layout.segment_ids().to(device, non_blocking=True))
    else:
        packed.mask = block_mask(layout.segment_ids().to(device, non_blocking=True))
    return packed


def dense_mask(seg):
    """(B, 1, T, T) boolean from segment ids (B, T): same segment and causal."""
    T = seg.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return ((seg.unsqueeze(2) == seg.unsqueeze(1)) & causal).unsqueeze(1)


def block_mask(seg):
    """FlexAttention's document-causal BlockMask from segment ids (B, T)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, T = seg.shape

    def document_causal(b, h, q_idx, kv_idx):
        return (seg[b, q_idx] == seg[b, kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(document_causal, B, None, T, T, device=seg.device)


def repeat_kv(k, v, n_head, dim):
    """Grouped-query attention: each kv head serves n_head / n_kv_head query heads."""
    repeat = n_head // k.size(dim)
    if repeat == 1:
        return k, v
    return k.repeat_interleave(repeat, dim=dim), v.repeat_interleave(repeat, dim=dim)


# ----------------------------------------------------------------------------- the kernels

def packed_attention(q, k, v, packed):
    """Causal attention within each segment. q (B, T, H, D), k, v (B, T, Hkv, D), after
    rotary and QK norm -> (B, T, H, D)."""
    H = q.size(2)
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


def flatten(x):
    """(B, T, heads, D) -> (B*T, heads, D): the varlen layout."""
    return x.reshape(x.size(0) * x.size(1), x.size(2), x.size(3))


def _loop(q, k, v, packed):
    """Causal SDPA per segment of the flattened positions: cheaper on CPU than a dense mask,
    whose cost grows with the row, not the document. The row is split once into views and the
    outputs concatenated once, so the backward is one concatenation of the segments' gradients
    (indexing per segment instead zero-fills a full-size gradient per segment: 4-6x slower)."""
    query, key, value = (flatten(x).transpose(0, 1) for x in (q, k, v))  # (heads, B*T, D)
    key, value = repeat_kv(key, value, query.size(0), dim=0)
    lengths = packed.lengths
    outputs = [F.scaled_dot_product_attention(qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0), is_causal=True)[0]
               for qs, ks, vs in zip(query.split(lengths, 1), key.split(lengths, 1), value.split(lengths, 1),
                                     strict=True)]
    return torch.cat(outputs, 1).transpose(0, 1).reshape(q.shape)


@dataclass(frozen=True)
class VarlenCall:
    """How the installed varlen_attn is asked for causal attention (keyword arguments) and
    whether it takes fewer kv heads than query heads itself (enable_gqa)."""

    causal: tuple  # ((name, value),)
    native_gqa: bool


@functools.lru_cache(maxsize=8)
def varlen_call(fn):
    """A VarlenCall for `fn` from its signature (see VARLEN_RELEASES). Raises
    AttentionKernelError when the signature offers no way to ask for causal attention."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        causal = (("window_size", (-1, 0)),)
    elif "is_causal" in params:
        causal = (("is_causal", True),)
    else:
        raise AttentionKernelError(f"varlen_attn{inspect.signature(fn)} takes neither window_size nor is_causal")
    return VarlenCall(causal=causal, native_gqa="enable_gqa" in params)


def varlen_arguments(fn, q, k, v, packed):
    """(args, kwargs) for fn (the installed varlen_attn): flattened q, k, v (kv heads expanded
    when fn has no enable_gqa), the device cu_seqlens for queries and keys, max_seqlen twice."""
    call = varlen_call(fn)
    query, key, value = flatten(q), flatten(k), flatten(v)
    kwargs = dict(call.causal)
    if key.size(1) != query.size(1):
        if call.native_gqa:
            kwargs["enable_gqa"] = True
        else:
            key, value = repeat_kv(key, value, query.size(1), dim=1)
    cu, max_len = packed.cu_seqlens, packed.layout.max_seqlen
    return (query, key, value, cu, cu, max_len, max_len), kwargs


def _varlen(q, k, v, packed):
    from torch.nn.attention import varlen as varlen_module  # absent before torch 2.10
    fn = varlen_module.varlen_attn
    # Flash kernels take fp16/bf16 only; under autocast, cast as SDPA would.
    device_type = q.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else q.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the varlen attention kernel needs fp16/bf16 compute, got {dtype}")
    args, kwargs = varlen_arguments(fn, q.to(dtype), k.to(dtype), v.to(dtype), packed)
    return fn(*args, **kwargs).view(q.shape)


def _flex(q, k, v, **kw):
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, **kw)
    return flex_attention(q, k, v, **kw)  # eager (CPU tests): unfused, forward only


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


# ----------------------------------------------------------------------------- choosing and checking

def candidates(device, dtype):
    """The kernels worth trying on `device` for `dtype` compute, best first (each is checked
    before use; "loop" is the last resort everywhere)."""
    device = torch.device(device)
    if device.type != "cuda":
        return ("loop",)
    index = device.index if device.index is not None else torch.cuda.current_device()
    ampere = tuple(torch.cuda.get_device_capability(index)) >= (8, 0)
    found = []
    if ampere and dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.is_flash_attention_available():
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401  (torch >= 2.10)
            found.append("varlen")
        except ImportError:
            pass
    if ampere:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
            from torch.utils._triton import has_triton
            if has_triton():
                found.append("flex")
        except ImportError:
            pass
    return (*found, "dense", "loop")


def _check_layout(T=256):
    """Several documents of uneven lengths (one of a single token), a row that is one long
    document, padding: the cases a kernel gets wrong when it gets anything wrong."""
    return PackedLayout.from_row_lengths([[37, 90, 1, 100], [200]], T)


def reference_attention(q, k, v, layout):
    """Document-causal attention written out (scores, mask, softmax) in fp32: what every
    kernel is checked against."""
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # (B, heads, T, D)
    k, v = repeat_kv(k, v, q.size(1), dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    allowed = dense_mask(layout.segment_ids().to(q.device))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def relative_error(x, reference):
    x, reference = x.detach().float(), reference.detach()
    return float((x - reference).norm() / reference.norm().clamp_min(1e-12))


def check_kernel(kernel, device, dtype, n_head, n_kv_head, head_dim):
    """Run `kernel` forward and backward on a small random packed batch on `device` with
    `dtype` compute and compare its output and the gradients of q, k and v with
    reference_attention within CHECK_TOLERANCE. Returns None when it passes, else the reason
    (an exception's first line, or the error that was too large)."""
    device = torch.device(device)
    layout = _check_layout()
    g = torch.Generator().manual_seed(0)
    B, T = layout.B, layout.T

    def rand(heads):  # rms-normed over the head, as q and k are after the QK norm
        return F.rms_norm(torch.randn(B, T, heads, head_dim, generator=g), (head_dim,))

    tensors = [rand(n_head), rand(n_kv_head), torch.randn(B, T, n_kv_head, head_dim, generator=g)]
    weight = torch.randn(B, T, n_head, head_dim, generator=g).to(device)
    autocast = dtype != torch.float32
    try:
        with torch.inference_mode(False), torch.enable_grad():
            q, k, v = (x.to(device).requires_grad_() for x in tensors)
            with torch.autocast(device.type, dtype=dtype if autocast else None, enabled=autocast):
                y = packed_attention(q, k, v, kernel_inputs(layout, kernel, device))
            grads = torch.autograd.grad((y.float() * weight).sum(), (q, k, v))
            with torch.autocast(device.type, enabled=False):
                q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
                ref = reference_attention(q32, k32, v32, layout)
                ref_grads = torch.autograd.grad((ref * weight).sum(), (q32, k32, v32))
    except Exception as e:  # a kernel that cannot run here is a failed check, with its reason
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"[:300]
    tolerance = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.bfloat16])
    for name, got, want in zip(("output", "grad q", "grad k", "grad v"), (y, *grads), (ref, *ref_grads), strict=True):
        if got.shape != want.shape:
            return f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        error = relative_error(got, want)
        if not error <= tolerance:  # also catches nan
            return f"{name} differs from the reference by {error:.3g} (relative; tolerance {tolerance:g})"
    return None


def _describe(device, dtype):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}"


@functools.lru_cache(maxsize=None)
def _choose(device, dtype, heads, forced):
    """(kernel, [(kernel, reason) of those that failed]) for a device, dtype and head shape."""
    failed = []
    for kernel in ((forced,) if forced else candidates(device, dtype)):
        reason = check_kernel(kernel, device, dtype, *heads)
        if reason is None:
            return kernel, failed
        failed.append((kernel, reason))
        if forced:
            raise AttentionKernelError(f"the {forced!r} attention kernel failed its check on "
                                       f"{_describe(device, dtype)}: {reason}. Choose another (--attention_kernel "
                                       "auto picks one that passes).")
        print(f"attention: the {kernel!r} kernel failed its check on {_describe(device, dtype)}: {reason}; "
              "trying the next one", file=sys.stderr, flush=True)
    raise AttentionKernelError(f"no attention kernel passed its check on {_describe(device, dtype)}: {failed}")


def choose_kernel(device, dtype, n_head, n_kv_head, head_dim, forced=None):
    """The packed-row kernel to use: `forced` (a name from KERNELS) if it passes its check,
    else AttentionKernelError; with forced=None, the first of candidates(device, dtype) that
    passes, saying on stderr (once) why each one before it was passed over. Checked once per
    process for each (device, dtype, head shape, forced)."""
    if forced is not None and forced not in KERNELS:
        raise ValueError(f"unknown attention kernel {forced!r}; expected one of {KERNELS}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _choose(device, dtype, (n_head, n_kv_head, head_dim), forced)[0]


def kernel_report(device, dtype, n_head, n_kv_head, head_dim):
    """Every kernel's check on a device: [(kernel, None or the reason it failed)], for
    benchmarks and diagnostics (nothing is cached)."""
    device = torch.device(device)
    return [(k, check_kernel(k, device, dtype, n_head, n_kv_head, head_dim)) for k in KERNELS]

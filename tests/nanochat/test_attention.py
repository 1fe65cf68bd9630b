"""Packed-row attention: cu_seqlens, and every kernel that runs on CPU giving the same numbers."""

import pytest
import torch
import torch.nn.functional as F

from nanochat import attention
from nanochat.attention import (
    attention_kernel,
    cu_seqlens_from_doc_ids,
    pack_rows,
    packed_attention,
    segment_ids,
    varlen_inputs,
)
from tests.nanochat.test_gpt import tiny_model

# Row 0: three documents, the last one truncated by the row end. Row 1: a document that
# continues the id of the previous row's last one (must still be a new segment), a second
# one, then padding (-1). Row 2: one document filling the row.
DOC_IDS = torch.tensor([
    [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2],
    [2, 2, 2, 2, 2, 3, 3, 3, -1, -1, -1, -1],
    [0] * 12,
])
CU = [0, 3, 7, 12, 17, 20, 24, 36]


def test_cu_seqlens_one_document_per_row():
    cu, max_len = cu_seqlens_from_doc_ids(torch.zeros(2, 5, dtype=torch.long))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 10] and max_len == 5


def test_cu_seqlens_several_truncated_and_padding():
    cu, max_len = cu_seqlens_from_doc_ids(DOC_IDS)
    assert cu.dtype == torch.int32
    assert cu.tolist() == CU and max_len == 12
    cu, max_len = cu_seqlens_from_doc_ids(torch.tensor([[0, 0, 1, -1, -1], [0, 1, 1, 1, -1]]))
    assert cu.tolist() == [0, 2, 3, 5, 6, 9, 10] and max_len == 3
    # A row that is all padding is one segment.
    cu, max_len = cu_seqlens_from_doc_ids(torch.tensor([[0, 0, 0], [-1, -1, -1]]))
    assert cu.tolist() == [0, 3, 6] and max_len == 3


def test_segment_ids_from_cu_seqlens():
    cu, _ = cu_seqlens_from_doc_ids(DOC_IDS)
    seg = segment_ids(cu, *DOC_IDS.shape)
    assert seg.tolist() == [[0] * 3 + [1] * 4 + [2] * 5, [3] * 5 + [4] * 3 + [5] * 4, [6] * 12]


def test_pack_rows_per_kernel():
    packed = pack_rows(DOC_IDS, "loop")
    assert packed.segments == list(zip(CU[:-1], CU[1:], strict=True))
    dense = pack_rows(DOC_IDS, "dense").mask
    assert dense.shape == (3, 1, 12, 12) and dense.dtype == torch.bool
    assert dense[1, 0, 9].tolist() == [False] * 8 + [True, True, False, False]  # padding sees only padding
    assert dense[0, 0, 4].tolist() == [False] * 3 + [True] * 2 + [False] * 7
    with pytest.raises(ValueError, match="unknown attention kernel"):
        pack_rows(DOC_IDS, "fast")


def random_qkv(H=4, Hkv=2, D=8, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    B, T = DOC_IDS.shape
    q, k, v = (torch.randn(B, T, h, D, generator=g, requires_grad=requires_grad) for h in (H, Hkv, Hkv))
    return q, k, v


def reference(q, k, v):
    """Each document on its own, plain causal SDPA on (1, H, L, D)."""
    y = torch.zeros_like(q)
    repeat = q.size(2) // k.size(2)
    for b, row in enumerate(DOC_IDS.tolist()):
        start = 0
        for t in range(1, len(row) + 1):
            if t == len(row) or row[t] != row[start]:
                qs, ks, vs = (x[b:b + 1, start:t].transpose(1, 2) for x in (q, k, v))
                ks, vs = ks.repeat_interleave(repeat, 1), vs.repeat_interleave(repeat, 1)
                y[b, start:t] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
                start = t
    return y


@pytest.mark.parametrize("Hkv", [4, 2, 1])
@pytest.mark.parametrize("kernel", ["loop", "dense", "flex"])
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_kernels_match_per_document_reference(kernel, Hkv):
    q, k, v = random_qkv(Hkv=Hkv)
    y = packed_attention(q, k, v, pack_rows(DOC_IDS, kernel))
    assert y.shape == q.shape
    assert torch.allclose(y, reference(q, k, v), atol=1e-5)


def test_gradients_loop_equal_dense():
    grads = {}
    for kernel in ("loop", "dense"):
        q, k, v = random_qkv(requires_grad=True, seed=3)
        w = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
        (packed_attention(q, k, v, pack_rows(DOC_IDS, kernel)) * w).sum().backward()
        grads[kernel] = [x.grad for x in (q, k, v)]
    for a, b in zip(grads["loop"], grads["dense"], strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def varlen_emulated(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size=(-1, -1), enable_gqa=False):
    """What flash varlen_attn computes, in plain SDPA: causal (window (-1, 0)) attention per
    [cu[i], cu[i+1]) segment of the (total, heads, D) inputs."""
    assert window_size == (-1, 0)  # causal
    assert cu_seq_q.dtype == torch.int32 and torch.equal(cu_seq_q, cu_seq_k)
    assert enable_gqa == (key.size(1) != query.size(1))
    assert key.shape == value.shape and key.shape[0] == query.shape[0]
    bounds = cu_seq_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.size(0)
    assert max_q == max_k == max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True))
    out = torch.empty_like(query)
    repeat = query.size(1) // key.size(1)
    for s, e in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        ks, vs = ks.repeat_interleave(repeat, 1), vs.repeat_interleave(repeat, 1)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("Hkv", [4, 2])
def test_varlen_inputs_match_loop(Hkv):
    q, k, v = random_qkv(Hkv=Hkv, seed=1)
    packed = pack_rows(DOC_IDS, "varlen")
    query, key, value, cu_q, cu_k, max_q, max_k = varlen_inputs(q, k, v, packed)
    B, T = DOC_IDS.shape
    assert query.shape == (B * T, 4, 8) and key.shape == value.shape == (B * T, Hkv, 8)
    assert cu_q.tolist() == CU and cu_k.tolist() == CU and (max_q, max_k) == (12, 12)
    assert torch.equal(query[T + 5], q[1, 5]) and torch.equal(key[2 * T + 3], k[2, 3])
    y = varlen_emulated(query, key, value, cu_q, cu_k, max_q, max_k, window_size=(-1, 0), enable_gqa=Hkv != 4)
    loop = packed_attention(q, k, v, pack_rows(DOC_IDS, "loop"))
    assert torch.allclose(y.view(q.shape), loop, atol=1e-5)


def test_varlen_path_calls_varlen_attn_with_those_inputs(monkeypatch):
    # The CUDA kernel cannot run here: swap in the emulation and run the model's varlen path
    # in bf16 (the kernel's dtype), against the loop in bf16.
    import torch.nn.attention.varlen as varlen_module
    calls = []

    def fake(*args, **kw):
        calls.append(args[3:])
        return varlen_emulated(*args, **kw)

    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    model = tiny_model(seed=2, n_kv_head=2).bfloat16()
    idx = torch.randint(0, 97, DOC_IDS.shape, generator=torch.Generator().manual_seed(0))
    model.attention_kernel = "varlen"
    y = model(idx, doc_ids=DOC_IDS)
    assert len(calls) == model.config.n_layer and calls[0][0].tolist() == CU and calls[0][2:] == (12, 12)
    model.attention_kernel = "loop"
    loop = model(idx, doc_ids=DOC_IDS)
    assert torch.allclose(y, loop, atol=1e-2)
    # fp32 compute without autocast is refused, not silently down-cast.
    model = tiny_model(seed=2)
    model.attention_kernel = "varlen"
    with pytest.raises(ValueError, match="fp16/bf16"):
        model(idx, doc_ids=DOC_IDS)


def packed_batch(seed=4):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 97, DOC_IDS.shape, generator=g)
    targets = torch.randint(0, 97, DOC_IDS.shape, generator=g)
    targets[DOC_IDS == -1] = -1
    targets[0, :2] = -1
    return idx, targets


@pytest.mark.parametrize("n_kv_head", [4, 2])
@torch.no_grad()  # FlexAttention has no backward on CPU
def test_model_forward_same_on_every_cpu_kernel(n_kv_head):
    model = tiny_model(seed=5, n_kv_head=n_kv_head)
    idx, _ = packed_batch()
    outputs = {}
    for kernel in ("loop", "dense", "flex"):
        model.attention_kernel = kernel
        outputs[kernel] = model(idx, doc_ids=DOC_IDS)
    assert torch.allclose(outputs["loop"], outputs["dense"], atol=1e-5)
    assert torch.allclose(outputs["loop"], outputs["flex"], atol=1e-5)
    # Every document equals itself run alone (positions restart per document).
    model.attention_kernel = None
    alone = model(idx[0:1, 3:7])
    assert torch.allclose(outputs["loop"][0:1, 3:7], alone, atol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_model_gradients_loop_equal_dense(n_kv_head):
    model = tiny_model(seed=8, n_kv_head=n_kv_head)
    idx, targets = packed_batch()
    grads = {}
    for kernel in ("loop", "dense"):
        model.zero_grad()
        model.attention_kernel = kernel
        model(idx, targets, loss_reduction="sum", doc_ids=DOC_IDS).backward()
        grads[kernel] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, g in grads["loop"].items():
        assert torch.allclose(g, grads["dense"][n], atol=1e-5), n


@pytest.mark.parametrize("kernel", ["loop", "dense", "flex"])
@torch.no_grad()
def test_real_tokens_never_see_padding(kernel):
    model = tiny_model(seed=6)
    model.attention_kernel = kernel
    idx, _ = packed_batch()
    other = idx.clone()
    other[DOC_IDS == -1] = (other[DOC_IDS == -1] + 1) % 97
    real = DOC_IDS != -1
    assert torch.allclose(model(idx, doc_ids=DOC_IDS)[real], model(other, doc_ids=DOC_IDS)[real], atol=1e-6)


def test_kernel_selection_rule(monkeypatch):
    import torch.utils._triton as triton_utils
    assert attention_kernel("cpu") == "loop" and attention_kernel(torch.device("cpu"), torch.float32) == "loop"
    assert tiny_model().attention_kernel == "loop"
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability["value"])
    triton = {"value": True}
    monkeypatch.setattr(triton_utils, "has_triton", lambda: triton["value"])
    attention._attention_kernel.cache_clear()
    try:
        assert attention_kernel("cuda:0") == "varlen"
        assert attention_kernel("cuda:0", torch.float16) == "varlen"
        assert attention_kernel("cuda:0", torch.float32) == "flex"
        triton["value"] = False
        attention._attention_kernel.cache_clear()
        assert attention_kernel("cuda:0", torch.float32) == "dense"
        capability["value"] = (7, 5)
        attention._attention_kernel.cache_clear()
        assert attention_kernel("cuda:0") == "dense"
        triton["value"] = True
        attention._attention_kernel.cache_clear()
        assert attention_kernel("cuda:0") == "flex"
    finally:
        attention._attention_kernel.cache_clear()

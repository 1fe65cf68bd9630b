"""Packed-row attention: cu_seqlens, and every kernel that runs on CPU giving the same numbers."""

import inspect
import itertools
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from nanochat import attention
from nanochat.attention import (
    AttentionKernelError,
    PackedLayout,
    kernel_inputs,
    packed_attention,
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
ROWS = [[3, 4, 5], [5, 3], [12]]  # the same rows as document lengths (padding implied)
CU = [0, 3, 7, 12, 17, 20, 24, 36]
LAYOUT = PackedLayout.from_row_lengths(ROWS, 12)


def test_layout_from_row_lengths():
    assert LAYOUT.cu_seqlens.dtype == torch.int32 and LAYOUT.cu_seqlens.device.type == "cpu"
    assert LAYOUT.cu_seqlens.tolist() == CU and LAYOUT.max_seqlen == 12 and (LAYOUT.B, LAYOUT.T) == (3, 12)
    assert LAYOUT.positions.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4],
                                         [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3], list(range(12))]
    assert LAYOUT.segment_ids().tolist() == [[0] * 3 + [1] * 4 + [2] * 5, [3] * 5 + [4] * 3 + [5] * 4, [6] * 12]
    # An empty row (a rank's dummy micro-batch) is one padding segment.
    empty = PackedLayout.from_row_lengths([[]], 8)
    assert empty.cu_seqlens.tolist() == [0, 8] and empty.max_seqlen == 8
    with pytest.raises(ValueError, match="row 0 holds 13 positions, more than T=12"):
        PackedLayout.from_row_lengths([[6, 7]], 12)


def test_layout_from_doc_ids_equals_the_row_lengths():
    layout = PackedLayout.from_doc_ids(DOC_IDS)
    assert layout.cu_seqlens.tolist() == CU and layout.max_seqlen == 12
    assert torch.equal(layout.positions, LAYOUT.positions)
    layout = PackedLayout.from_doc_ids(torch.tensor([[0, 0, 1, -1, -1], [0, 1, 1, 1, -1]]))
    assert layout.cu_seqlens.tolist() == [0, 2, 3, 5, 6, 9, 10] and layout.max_seqlen == 3
    layout = PackedLayout.from_doc_ids(torch.zeros(2, 5, dtype=torch.long))
    assert layout.cu_seqlens.tolist() == [0, 5, 10] and layout.max_seqlen == 5


def test_kernel_inputs_per_kernel():
    packed = kernel_inputs(LAYOUT, "loop", "cpu")
    assert packed.lengths == [e - s for s, e in zip(CU[:-1], CU[1:], strict=True)]
    dense = kernel_inputs(LAYOUT, "dense", "cpu").mask
    assert dense.shape == (3, 1, 12, 12) and dense.dtype == torch.bool
    assert dense[1, 0, 9].tolist() == [False] * 8 + [True, True, False, False]  # padding sees only padding
    assert dense[0, 0, 4].tolist() == [False] * 3 + [True] * 2 + [False] * 7
    varlen = kernel_inputs(LAYOUT, "varlen", "cpu")
    assert varlen.cu_seqlens.tolist() == CU and varlen.layout.max_seqlen == 12
    with pytest.raises(ValueError, match="unknown attention kernel"):
        kernel_inputs(LAYOUT, "fast", "cpu")


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
    y = packed_attention(q, k, v, kernel_inputs(LAYOUT, kernel, "cpu"))
    assert y.shape == q.shape
    assert torch.allclose(y, reference(q, k, v), atol=1e-5)


def indexed_loop(q, k, v, layout):
    """The loop kernel as it was: one SDPA per segment, read and written by indexing the row."""
    query, key, value = (x.reshape(-1, x.size(2), x.size(3)) for x in (q, k, v))
    key, value = (x.repeat_interleave(query.size(1) // x.size(1), dim=1) for x in (key, value))
    y = torch.empty_like(query)
    cu = layout.cu_seqlens.tolist()
    for s, e in itertools.pairwise(cu):
        y[s:e] = F.scaled_dot_product_attention(*(x[s:e].transpose(0, 1)[None] for x in (query, key, value)),
                                                is_causal=True)[0].transpose(0, 1)
    return y.view(q.shape)


@pytest.mark.parametrize("Hkv", [4, 1])
def test_loop_split_once_equals_the_indexed_loop(Hkv):
    results = []
    for attend in (lambda q, k, v: packed_attention(q, k, v, kernel_inputs(LAYOUT, "loop", "cpu")),
                   lambda q, k, v: indexed_loop(q, k, v, LAYOUT)):
        q, k, v = random_qkv(Hkv=Hkv, requires_grad=True, seed=5)
        w = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))
        y = attend(q, k, v)
        (y * w).sum().backward()
        results.append([y.detach(), q.grad, k.grad, v.grad])
    for a, b in zip(*results, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_gradients_loop_equal_dense():
    grads = {}
    for kernel in ("loop", "dense"):
        q, k, v = random_qkv(requires_grad=True, seed=3)
        w = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
        (packed_attention(q, k, v, kernel_inputs(LAYOUT, kernel, "cpu")) * w).sum().backward()
        grads[kernel] = [x.grad for x in (q, k, v)]
    for a, b in zip(grads["loop"], grads["dense"], strict=True):
        assert torch.allclose(a, b, atol=1e-5)



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
    for kernel in ("loop", "dense"):
        model.attention_kernel = kernel
        outputs[kernel] = model(idx, doc_ids=DOC_IDS)
    assert torch.allclose(outputs["loop"], outputs["dense"], atol=1e-5)
    # The same rows described by their layout (what training passes) give the same logits.
    assert torch.equal(model(idx, layout=LAYOUT), outputs["dense"])
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


@pytest.mark.parametrize("kernel", ["loop", "dense"])
@torch.no_grad()
def test_real_tokens_never_see_padding(kernel):
    model = tiny_model(seed=6)
    model.attention_kernel = kernel
    idx, _ = packed_batch()
    other = idx.clone()
    other[DOC_IDS == -1] = (other[DOC_IDS == -1] + 1) % 97
    real = DOC_IDS != -1
    assert torch.allclose(model(idx, doc_ids=DOC_IDS)[real], model(other, doc_ids=DOC_IDS)[real], atol=1e-6)


# ----------------------------------------------------------------------------- varlen_attn by release
# Stand-ins with the exact signature of each torch release's varlen_attn (VARLEN_RELEASES),
# computing what flash varlen computes, in plain SDPA per segment. Like the real kernel they
# refuse fewer kv heads than query heads unless told (enable_gqa).

def _emulate(query, key, value, cu_q, cu_k, max_q, max_k, causal, gqa):
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and isinstance(max_q, int)
    bounds = cu_q.tolist()
    assert bounds[0] == 0 and bounds[-1] == query.size(0)
    assert max_q == max_k == max(e - s for s, e in itertools.pairwise(bounds))
    if key.size(1) != query.size(1) and not gqa:
        raise RuntimeError("number of heads in key/value must equal the query's")
    repeat = query.size(1) // key.size(1)
    out = torch.empty_like(query)
    for s, e in itertools.pairwise(bounds):
        qs, ks, vs = (x[s:e].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        ks, vs = ks.repeat_interleave(repeat, 1), vs.repeat_interleave(repeat, 1)
        out[s:e] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)[0].transpose(0, 1)
    return out


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _emulate(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, gqa=False)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    assert window_size in ((-1, -1), (-1, 0))
    return _emulate(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), gqa=False)


def varlen_2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert window_size in ((-1, -1), (-1, 0))
    return _emulate(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), gqa=enable_gqa)


RELEASES = {"2.10": varlen_2_10, "2.11": varlen_2_11, "2.12": varlen_2_12}


def install_varlen(monkeypatch, fn):
    """Make `fn` torch.nn.attention.varlen.varlen_attn (the module is absent before 2.10)."""
    try:
        import torch.nn.attention.varlen as module
    except ImportError:
        module = types.ModuleType("torch.nn.attention.varlen")
        monkeypatch.setitem(sys.modules, module.__name__, module)
        monkeypatch.setattr(torch.nn.attention, "varlen", module, raising=False)
    monkeypatch.setattr(module, "varlen_attn", fn, raising=False)


@pytest.fixture(autouse=True)
def fresh_kernel_choice():
    attention._choose.cache_clear()
    attention.varlen_call.cache_clear()
    yield
    attention._choose.cache_clear()
    attention.varlen_call.cache_clear()


def test_varlen_call_by_release():
    assert attention.varlen_call(varlen_2_10) == attention.VarlenCall((("is_causal", True),), native_gqa=False)
    assert attention.varlen_call(varlen_2_11) == attention.VarlenCall((("window_size", (-1, 0)),), native_gqa=False)
    assert attention.varlen_call(varlen_2_12) == attention.VarlenCall((("window_size", (-1, 0)),), native_gqa=True)
    with pytest.raises(AttentionKernelError, match="neither window_size nor is_causal"):
        attention.varlen_call(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k: None)


@pytest.mark.parametrize("Hkv", [4, 2])
@pytest.mark.parametrize("release", sorted(RELEASES))
def test_varlen_arguments_bind_to_each_release(release, Hkv):
    fn = RELEASES[release]
    q, k, v = random_qkv(Hkv=Hkv, seed=1)
    args, kwargs = attention.varlen_arguments(fn, q, k, v, kernel_inputs(LAYOUT, "varlen", "cpu"))
    inspect.signature(fn).bind(*args, **kwargs)  # raises TypeError on a keyword the release lacks
    query, key, value, cu_q, cu_k, max_q, max_k = args
    B, T = DOC_IDS.shape
    assert query.shape == (B * T, 4, 8) and cu_q.tolist() == CU and (max_q, max_k) == (12, 12)
    assert key.shape == (B * T, 2 if (release == "2.12" and Hkv == 2) else 4, 8)
    assert kwargs == {"2.10": {"is_causal": True}, "2.11": {"window_size": (-1, 0)},
                      "2.12": {"window_size": (-1, 0), **({"enable_gqa": True} if Hkv == 2 else {})}}[release]
    y = fn(*args, **kwargs)
    assert torch.allclose(y.view(q.shape), reference(q, k, v), atol=1e-5)


def test_varlen_arguments_bind_to_the_installed_torch():
    """What the kernel chosen for a simulated A100 passes binds to the installed torch's own
    varlen_attn (2.11 in the Colab environment, 2.13/2.14 in the others)."""
    real = pytest.importorskip("torch.nn.attention.varlen", reason="torch < 2.10 has no varlen_attn").varlen_attn
    for Hkv in (4, 2):
        q, k, v = random_qkv(Hkv=Hkv)
        args, kwargs = attention.varlen_arguments(real, q, k, v, kernel_inputs(LAYOUT, "varlen", "cpu"))
        bound = inspect.signature(real).bind(*args, **kwargs)
        causal = bound.arguments.get("window_size") == (-1, 0) or bound.arguments.get("is_causal") is True
        assert causal and len(bound.args) == 7


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_model_varlen_path_with_each_release(monkeypatch, release):
    install_varlen(monkeypatch, RELEASES[release])
    model = tiny_model(seed=2, n_kv_head=2)
    idx, targets = packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.attention_kernel = "varlen"
        y = model(idx, layout=LAYOUT)
        model.attention_kernel = "loop"
        loop = model(idx, layout=LAYOUT)
    assert torch.allclose(y, loop, atol=2e-2)
    # fp32 compute (no autocast) is refused by the check, not silently down-cast.
    model.attention_kernel = "varlen"
    with pytest.raises(AttentionKernelError, match="'varlen' attention kernel failed its check.*fp16/bf16"):
        model(idx, layout=LAYOUT)


def broken_raises(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                  window_size=(-1, -1)):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")


def broken_across_documents(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                            window_size=(-1, -1)):
    """Ignores the boundaries: the whole flattened batch is one causal document."""
    whole = torch.tensor([0, query.size(0)], dtype=torch.int32)
    return _emulate(query, key, value, whole, whole, query.size(0), query.size(0), True, gqa=False)


def broken_not_causal(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    return _emulate(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, False, gqa=False)


def test_check_passes_good_kernels_and_names_what_is_wrong_with_bad_ones(monkeypatch):
    for fn in RELEASES.values():
        install_varlen(monkeypatch, fn)
        attention.varlen_call.cache_clear()
        assert attention.check_kernel("varlen", "cpu", torch.bfloat16, 4, 2, 16) is None
    for kernel in ("loop", "dense"):
        assert attention.check_kernel(kernel, "cpu", torch.float32, 4, 1, 16) is None
        assert attention.check_kernel(kernel, "cpu", torch.bfloat16, 4, 4, 16) is None
    install_varlen(monkeypatch, broken_raises)
    assert attention.check_kernel("varlen", "cpu", torch.bfloat16, 4, 4, 16) == \
        "RuntimeError: FlashAttention only supports Ampere GPUs or newer."
    for fn in (broken_across_documents, broken_not_causal):
        install_varlen(monkeypatch, fn)
        reason = attention.check_kernel("varlen", "cpu", torch.bfloat16, 4, 4, 16)
        assert reason.startswith("output differs from the reference by") and "tolerance 0.03" in reason
        error = float(reason.split("by ")[1].split(" ")[0])
        assert error > 0.1  # a wrong kernel is far outside the tolerance, not near it
    # FlexAttention runs forward on CPU but has no backward there.
    assert "backward" in attention.check_kernel("flex", "cpu", torch.float32, 4, 4, 16)


def test_auto_falls_back_with_one_line_and_forced_failures_are_errors(monkeypatch, capsys):
    install_varlen(monkeypatch, broken_across_documents)
    monkeypatch.setattr(attention, "candidates", lambda device, dtype: ("varlen", "dense", "loop"))
    assert attention.choose_kernel("cpu", torch.bfloat16, 4, 4, 16) == "dense"
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "'varlen' kernel failed its check" in lines[0] and f"torch {torch.__version__}" in lines[0]
    assert "output differs from the reference" in lines[0] and "bfloat16" in lines[0]
    assert attention.choose_kernel("cpu", torch.bfloat16, 4, 4, 16) == "dense"  # checked once
    assert capsys.readouterr().err == ""
    with pytest.raises(AttentionKernelError, match="'varlen' attention kernel failed its check"):
        attention.choose_kernel("cpu", torch.bfloat16, 4, 4, 16, forced="varlen")
    model = tiny_model(seed=1)
    model.attention_kernel = "flex"
    idx, _ = packed_batch()
    with pytest.raises(AttentionKernelError, match="'flex' attention kernel failed its check.*backward"):
        model(idx, layout=LAYOUT)


def test_candidates_by_gpu_and_torch(monkeypatch):
    import torch.utils._triton as triton_utils
    assert attention.candidates("cpu", torch.float32) == ("loop",)
    assert attention.candidates("mps", torch.float16) == ("loop",)
    install_varlen(monkeypatch, varlen_2_11)
    capability = {"value": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability["value"])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    triton = {"value": True}
    monkeypatch.setattr(triton_utils, "has_triton", lambda: triton["value"])
    a100 = torch.device("cuda", 0)
    assert attention.candidates(a100, torch.bfloat16) == ("varlen", "flex", "dense", "loop")
    assert attention.candidates(a100, torch.float16) == ("varlen", "flex", "dense", "loop")
    assert attention.candidates(a100, torch.float32) == ("flex", "dense", "loop")
    triton["value"] = False
    assert attention.candidates(a100, torch.bfloat16) == ("varlen", "dense", "loop")
    triton["value"] = True
    capability["value"] = (7, 5)  # T4: no flash, and Triton has no tensor-core path below 8.0
    assert attention.candidates(a100, torch.float16) == ("dense", "loop")
    capability["value"] = (9, 0)
    monkeypatch.setitem(sys.modules, "torch.nn.attention.varlen", None)  # torch 2.9: no such module
    assert attention.candidates(a100, torch.bfloat16) == ("flex", "dense", "loop")

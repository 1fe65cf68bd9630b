import math

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig, apply_rotary, config_for_depth, positions_in_document


def tiny_config(**kw):
    base = dict(sequence_len=64, vocab_size=97, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw))
    model.init_weights()
    # Zero-initialised output projections make every block the identity; give them some
    # weight so the tests exercise attention and the MLP.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 0.5)
    return model


def expected_keys(n_layer):
    keys = {"transformer.wte.weight", "lm_head.weight"}
    for i in range(n_layer):
        for name in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            keys.add(f"transformer.h.{i}.{name}.weight")
    return keys


@pytest.mark.parametrize("depth", [20, 32])
def test_published_configs_state_dict(depth):
    config = config_for_depth(depth)
    assert (config.n_embd, config.n_head, config.n_kv_head) == (64 * depth, depth // 2, depth // 2)
    with torch.device("meta"):
        model = GPT(config)
    sd = model.state_dict()
    assert set(sd) == expected_keys(depth)
    assert len(sd) == 2 + 6 * depth
    C, V = config.n_embd, config.vocab_size
    assert sd["transformer.wte.weight"].shape == (V, C)
    assert sd["lm_head.weight"].shape == (V, C)
    assert sd["transformer.h.0.attn.c_q.weight"].shape == (C, C)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (4 * C, C)
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (C, 4 * C)
    if depth == 20:
        assert model.num_params() == 560_988_160
        # FLOPs per token at T=2048, as the compat notes give it.
        assert model.estimate_flops() == pytest.approx(3.49e9, rel=0.01)


def test_gqa_shapes():
    model = GPT(tiny_config(n_head=4, n_kv_head=2))
    assert model.transformer.h[0].attn.c_k.weight.shape == (16, 32)
    logits = model(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape == (1, 5, 97)


def test_rotary_convention_hand_computed():
    # One head of dim 4 at position 1: inv_freq = [1, 1/100]; first half (x1) and second
    # half (x2) rotate together: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos.
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    theta = torch.tensor([1.0, 0.01])
    cos, sin = theta.cos().view(1, 1, 1, 2), theta.sin().view(1, 1, 1, 2)
    y = apply_rotary(x, cos, sin).flatten().tolist()
    c0, s0, c1, s1 = math.cos(1), math.sin(1), math.cos(0.01), math.sin(0.01)
    expected = [1 * c0 + 3 * s0, 2 * c1 + 4 * s1, -1 * s0 + 3 * c0, -2 * s1 + 4 * c1]
    assert y == pytest.approx(expected, abs=1e-6)


def test_rotary_tables_are_bf16_and_match_formula():
    model = GPT(tiny_config())
    assert model.cos.dtype == torch.bfloat16
    head_dim = 8
    pos, i = 5, 1
    angle = pos * 10000 ** (-2 * i / head_dim)
    assert model.cos[pos, i].item() == torch.tensor(math.cos(angle)).bfloat16().item()
    assert model.sin[pos, i].item() == torch.tensor(math.sin(angle)).bfloat16().item()
    assert model.cos.size(0) == 64 * 10


def test_forward_loss_and_reductions():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[0, :4] = -1
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15.0
    manual = torch.nn.functional.cross_entropy(logits.view(-1, 97), targets.view(-1), ignore_index=-1)
    assert model(idx, targets).item() == pytest.approx(manual.item(), rel=1e-5)
    total = model(idx, targets, loss_reduction="sum")
    assert total.item() == pytest.approx(manual.item() * 16, rel=1e-5)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (2, 10) and per_token[0, :4].abs().max() == 0
    # given the supervised positions, "none" computes logits only there: the same values
    supervised = (targets.view(-1) != -1).nonzero().squeeze(1)
    sparse = model(idx, targets, loss_reduction="none", supervised_index=supervised)
    assert torch.allclose(sparse, per_token, atol=1e-6)
    weights = torch.tensor([[1.0], [-0.5]])
    grads = [torch.autograd.grad((x * weights).sum(), model.lm_head.weight)[0] for x in (per_token, sparse)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_all_ignored_targets_give_zero_not_nan():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 6))
    targets = torch.full((2, 6), -1)
    loss = model(idx, targets)
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_chunked_loss_matches_unchunked(monkeypatch):
    import nanochat.gpt as gpt_module
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 12))
    targets = torch.randint(0, 97, (2, 12))
    full = model(idx, targets, loss_reduction="sum")
    full.backward()
    grad_full = model.lm_head.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setattr(gpt_module, "LOSS_CHUNK_LOGITS", 97 * 5)  # chunks of 5 tokens
    chunked = model(idx, targets, loss_reduction="sum")
    chunked.backward()
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(model.lm_head.weight.grad, grad_full, atol=1e-6)


def test_positions_in_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert positions_in_document(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_packed_rows_equal_separate_sequences():
    model = tiny_model()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 7 + [1] * 5])
    logits = model(packed, doc_ids=doc_ids)
    assert torch.allclose(logits[:, :7], model(a), atol=1e-5)
    assert torch.allclose(logits[:, 7:], model(b), atol=1e-5)


def test_meta_device_then_to_empty_rebuilds_rotary():
    with torch.device("meta"):
        model = GPT(tiny_config())
    model.to_empty(device="cpu")
    model.init_rotary()
    reference = GPT(tiny_config())
    assert torch.equal(model.cos, reference.cos) and torch.equal(model.sin, reference.sin)


def test_packed_gradients_equal_separate_gradients():
    model = tiny_model(seed=6)
    a, b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 9))
    ta, tb = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 9))
    ta[0, :2] = -1
    separate = model(a, ta, loss_reduction="sum") + model(b, tb, loss_reduction="sum")
    separate.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed = model(torch.cat([a, b], 1), torch.cat([ta, tb], 1), loss_reduction="sum",
                   doc_ids=torch.tensor([[0] * 6 + [1] * 9]))
    packed.backward()
    assert packed.item() == pytest.approx(separate.item(), rel=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[n], atol=1e-5), n


def test_dense_mask_path_matches_segment_path():
    # The CUDA fallback uses a dense block-diagonal mask, CPU per-document segments: same numbers.
    model = tiny_model(seed=7)
    idx = torch.randint(0, 97, (2, 10))
    doc_ids = torch.tensor([[0] * 4 + [1] * 6, [3] * 7 + [-1] * 3])
    assert model.attention_kernel == "loop"  # CPU
    segment_logits = model(idx, doc_ids=doc_ids)
    model.attention_kernel = "dense"
    dense_logits = model(idx, doc_ids=doc_ids)
    assert torch.allclose(segment_logits, dense_logits, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        model.attention_kernel = "fast"


def test_norms_keep_the_input_dtype_when_rms_norm_computes_in_fp32(monkeypatch):
    """torch >= 2.12 runs rms_norm in fp32 under CUDA autocast: q and k would leave the QK norm
    in fp32 beside a bf16 v. Simulated here by an rms_norm that upcasts, as autocast makes it."""
    import torch.nn.functional as F

    from nanochat import attention
    real_rms_norm = F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda x, shape, *a, **kw: real_rms_norm(x.float(), shape, *a, **kw))
    model = tiny_model(seed=3, n_kv_head=2).bfloat16()
    assert model.attention_kernel == "loop"  # its check done before the spy below
    seen = []
    real_attention = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention", lambda q, k, v, packed: seen.append(
        (q.dtype, k.dtype, v.dtype)) or real_attention(q, k, v, packed))
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = model(idx, doc_ids=torch.tensor([[0] * 4 + [1] * 6, [0] * 10]))
    assert seen == [(torch.bfloat16,) * 3] * model.config.n_layer
    monkeypatch.setattr(F, "rms_norm", real_rms_norm)
    # The same numbers as an rms_norm that keeps bf16 (torch <= 2.11), within bf16 rounding.
    torch.testing.assert_close(model(idx, doc_ids=torch.tensor([[0] * 4 + [1] * 6, [0] * 10])), logits,
                               atol=0.1, rtol=0.02)


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_rows_after_a_shared_prefix_equal_each_row_after_its_own_copy(n_kv_head):
    model = tiny_model(seed=3, n_kv_head=n_kv_head)
    g = torch.Generator().manual_seed(1)
    prefix_ids = torch.randint(0, 97, (1, 9), generator=g)
    rows = torch.randint(0, 97, (3, 5), generator=g)
    full = torch.cat([prefix_ids.expand(3, -1), rows], dim=1)
    # logits: every position after the prefix
    with torch.no_grad():
        expected = model(full)[:, 9:]
        got = model(rows, kv_cache=model.shared_prefix(prefix_ids))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # gradients of a loss over the rows (one row of a single position too), through the prefix
    targets = torch.randint(0, 97, (3, 5), generator=g)
    targets[1, 1:] = -1
    weights = torch.tensor([[0.5], [-1.0], [2.0]])
    grads = []
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        if shared:
            nll = model(rows, targets, kv_cache=model.shared_prefix(prefix_ids), loss_reduction="none")
        else:
            nll = model(full, torch.cat([torch.full((3, 9), -1), targets], dim=1), loss_reduction="none")[:, 9:]
        (nll * weights).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_shared_prefix_carries_several_batches_gradients_in_one_backward():
    model = tiny_model(seed=4)
    g = torch.Generator().manual_seed(2)
    prefix_ids = torch.randint(0, 97, (1, 6), generator=g)
    batches = [torch.randint(0, 97, (2, 4), generator=g), torch.randint(0, 97, (1, 7), generator=g)]
    grads = []
    for detached in (False, True):
        model.zero_grad(set_to_none=True)
        prefix = model.shared_prefix(prefix_ids)
        if not detached:
            sum(model(b, b, kv_cache=prefix, loss_reduction="sum") for b in batches).backward()
        else:
            leaves = prefix.detached()
            assert leaves.pos == 6 and all(t.is_leaf and t.requires_grad for t in leaves.tensors())
            for b in batches:
                model(b, b, kv_cache=leaves, loss_reduction="sum").backward()
            prefix.backward_from(leaves)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert prefix.pos == 6  # rows do not extend it
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_an_empty_shared_prefix_is_no_prefix():
    model = tiny_model(seed=5)
    rows = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        prefix = model.shared_prefix(torch.zeros(1, 0, dtype=torch.long))
        assert prefix.pos == 0 and prefix.tensors() == []
        torch.testing.assert_close(model(rows, kv_cache=prefix), model(rows), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one row"):
        model.shared_prefix(rows)


def test_a_shared_prefix_under_bf16_autocast_matches_the_full_rows():
    model = tiny_model(seed=6)
    g = torch.Generator().manual_seed(4)
    prefix_ids, rows = torch.randint(0, 97, (1, 8), generator=g), torch.randint(0, 97, (2, 3), generator=g)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        prefix = model.shared_prefix(prefix_ids)
        assert all(t.dtype == torch.bfloat16 for t in prefix.tensors())
        got = model(rows, kv_cache=prefix)
        expected = model(torch.cat([prefix_ids.expand(2, -1), rows], dim=1))[:, 8:]
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)

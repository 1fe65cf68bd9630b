import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanochat.optim import adamw_lr_scale, setup_optimizers

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class TinyStack(nn.Module):
    """The parameter layout setup_optimizers relies on, with chosen matrix shapes."""

    def __init__(self, n_embd=32, vocab_size=48, shapes=((64, 32), (32, 64))):
        super().__init__()
        self.config = SimpleNamespace(n_embd=n_embd)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            h=nn.ModuleList([nn.Linear(cols, rows, bias=False) for rows, cols in shapes]),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)


def reference_muon_step(param, grad, buf, lr, momentum=0.95, ns_steps=5):
    """nanochat's Muon step written out: lerp momentum, Nesterov lerp, NS5 in bf16, aspect-ratio lr."""
    a, b, c = NS_COEFFICIENTS
    buf.lerp_(grad, 1 - momentum)
    g = grad.lerp(buf, momentum)
    X = g.bfloat16()
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(ns_steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.T
    param.add_(X.to(param.dtype), alpha=-lr * max(1, param.size(0) / param.size(1)) ** 0.5)


def one_muon_update(model, grads, lr):
    """Apply one Muon step (fresh momentum) with the given gradients; return p_before - p_after."""
    _, muon = setup_optimizers(model, matrix_lr=lr)
    params = list(model.transformer.h.parameters())
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    muon.step()
    return [b - p.detach() for b, p in zip(before, params, strict=True)]


def test_muon_update_is_orthogonalised_with_aspect_ratio_step():
    torch.manual_seed(0)
    model = TinyStack(shapes=((64, 32), (32, 64)))
    lr = 0.02
    grad_tall = torch.randn(64, 32) * torch.logspace(0, 1, 32)  # columns of very different scale
    grad_wide = grad_tall.T.contiguous()
    update_tall, update_wide = one_muon_update(model, [grad_tall, grad_wide], lr)

    grad_sv = torch.linalg.svdvals(grad_tall)
    assert grad_sv.max() / grad_sv.min() > 5  # the gradient itself is far from orthogonal
    for update, scale in ((update_tall, math.sqrt(64 / 32)), (update_wide, 1.0)):
        sv = torch.linalg.svdvals(update / (lr * scale))
        assert sv.min() > 0.55 and sv.max() < 1.25, sv
        assert sv.max() / sv.min() < 2.0
    # tall matrices step sqrt(rows/cols) further; the transposed gradient gives the transposed direction
    torch.testing.assert_close(update_tall / math.sqrt(2), update_wide.T, rtol=1e-4, atol=1e-7)


def test_muon_matches_reference_math_within_bf16_rounding():
    torch.manual_seed(1)
    model = TinyStack(shapes=((64, 32), (32, 64), (48, 48)))
    _, muon = setup_optimizers(model, matrix_lr=0.02)
    params = list(model.transformer.h.parameters())
    ref_params = [p.detach().clone() for p in params]
    ref_bufs = [torch.zeros_like(p) for p in params]
    for _ in range(3):  # several steps so momentum and Nesterov both matter
        grads = [torch.randn_like(p) for p in params]
        before = [p.detach().clone() for p in params]
        ref_before = [p.clone() for p in ref_params]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        muon.step()
        for ref_p, g, buf in zip(ref_params, grads, ref_bufs, strict=True):
            reference_muon_step(ref_p, g, buf, lr=0.02)
        for p, b, ref_p, ref_b in zip(params, before, ref_params, ref_before, strict=True):
            update, ref_update = b - p.detach(), ref_b - ref_p
            rel = (update - ref_update).norm() / ref_update.norm()
            assert rel < 0.05, f"{tuple(p.shape)}: relative difference {rel:.4f}"
        ref_params = [p.detach().clone() for p in params]  # keep both on the same trajectory


def test_groups_learning_rates_and_settings():
    model = TinyStack(n_embd=32)
    adamw, muon = setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    s = (32 / 768) ** -0.5
    assert adamw_lr_scale(32) == pytest.approx(s)
    assert adamw_lr_scale(768) == 1.0
    lm_group, wte_group = adamw.param_groups
    assert lm_group["params"] == [model.lm_head.weight]
    assert wte_group["params"] == [model.transformer.wte.weight]
    assert lm_group["lr"] == pytest.approx(0.004 * s) and lm_group["initial_lr"] == lm_group["lr"]
    assert wte_group["lr"] == pytest.approx(0.2 * s) and wte_group["initial_lr"] == wte_group["lr"]
    for g in adamw.param_groups:
        assert g["betas"] == (0.8, 0.95) and g["eps"] == 1e-10 and g["weight_decay"] == 0.0
        assert not g["fused"]  # fused AdamW is CUDA only
    (muon_group,) = muon.param_groups
    assert isinstance(muon, torch.optim.Muon)
    assert muon_group["params"] == list(model.transformer.h.parameters())
    assert muon_group["lr"] == 0.02 and muon_group["initial_lr"] == 0.02
    assert muon_group["momentum"] == 0.95 and muon_group["nesterov"] and muon_group["ns_steps"] == 5
    assert muon_group["weight_decay"] == 0.0  # torch's own default would be 0.1
    assert muon_group["ns_coefficients"] == pytest.approx(NS_COEFFICIENTS)
    _, muon = setup_optimizers(model, weight_decay=0.05)
    assert muon.param_groups[0]["weight_decay"] == 0.05


def test_every_gpt_parameter_in_exactly_one_group():
    from nanochat.gpt import GPT, GPTConfig
    model = GPT(GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    optimizers = model.setup_optimizers()
    grouped = [p for opt in optimizers for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters())) == 2 + 6 * 2
    assert all(p.ndim == 2 for p in optimizers[1].param_groups[0]["params"])
    assert all("initial_lr" in g for opt in optimizers for g in opt.param_groups)


def test_uncovered_or_shared_parameters_are_refused():
    model = TinyStack()
    model.extra_scale = nn.Parameter(torch.ones(3))
    with pytest.raises(AssertionError, match="not covered.*extra_scale"):
        setup_optimizers(model)
    model = TinyStack(vocab_size=48)
    model.lm_head.weight = model.transformer.wte.weight  # tied
    with pytest.raises(AssertionError, match="tied"):
        setup_optimizers(model)

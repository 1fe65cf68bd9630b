import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nanochat import optim as optim_module
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
    assert isinstance(muon, torch.optim.Muon)  # torch's, with the iteration's dtype chosen
    assert muon.dtype == (torch.bfloat16 if optim_module._cpu_has_native_bf16() else torch.float32)
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


def muon_trajectory(make, shapes=((64, 32), (32, 64), (48, 48)), steps=3, weight_decay=0.01):
    """Parameters after `steps` Muon steps of seeded gradients (the same for every optimizer)."""
    torch.manual_seed(3)
    params = [nn.Parameter(torch.randn(*s) * 0.05) for s in shapes]
    opt = make(params, weight_decay)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach() for p in params], opt


def torch_muon(params, weight_decay):
    return torch.optim.Muon(params, lr=0.02, weight_decay=weight_decay, momentum=0.95, nesterov=True, ns_steps=5,
                            adjust_lr_fn="original")


def test_muon_in_bf16_is_torchs_update_bit_for_bit():
    from nanochat.optim import muon
    theirs, _ = muon_trajectory(torch_muon)
    ours, opt = muon_trajectory(lambda ps, wd: muon(ps, lr=0.02, weight_decay=wd, dtype=torch.bfloat16))
    assert opt.dtype == torch.bfloat16
    for a, b in zip(theirs, ours, strict=True):
        assert torch.equal(a, b)


def test_muon_in_fp32_is_torchs_update_within_bf16_rounding_and_closer_to_exact():
    from nanochat.optim import muon
    start, _ = muon_trajectory(torch_muon, steps=0)
    theirs, _ = muon_trajectory(torch_muon)
    ours, _ = muon_trajectory(lambda ps, wd: muon(ps, lr=0.02, weight_decay=wd, dtype=torch.float32))
    exact, _ = muon_trajectory(lambda ps, wd: muon(ps, lr=0.02, weight_decay=wd, dtype=torch.float64))
    for p0, a, b, x in zip(start, theirs, ours, exact, strict=True):
        bf16_error = ((a - p0) - (x - p0)).norm() / (x - p0).norm()
        fp32_error = ((b - p0) - (x - p0)).norm() / (x - p0).norm()
        assert 1e-3 < bf16_error < 2e-2  # torch's bf16 iteration: rounding at the 3rd significant digit
        assert fp32_error < 1e-5  # fp32: at the 6th


def test_muon_state_is_torchs_so_checkpoints_load_either_way():
    from nanochat.optim import Muon, muon
    _, theirs = muon_trajectory(torch_muon, steps=2)
    ours_params, ours = muon_trajectory(lambda ps, wd: muon(ps, lr=0.02, weight_decay=wd, dtype=torch.float32),
                                        steps=2)
    state = ours.state_dict()
    assert state["param_groups"][0].keys() == theirs.state_dict()["param_groups"][0].keys()
    assert {k for s in state["state"].values() for k in s} == {"momentum_buffer"}
    fresh = torch_muon(ours_params, 0.01)
    fresh.load_state_dict(state)  # ours -> torch's
    back = Muon([nn.Parameter(p.clone()) for p in ours_params], dtype=torch.float32, lr=0.02, weight_decay=0.01,
                adjust_lr_fn="original")
    back.load_state_dict(theirs.state_dict())  # torch's -> ours
    assert back.param_groups[0]["momentum"] == 0.95 and back.dtype == torch.float32


def test_muon_refuses_a_step_scale_it_does_not_implement():
    from nanochat.optim import Muon
    p = nn.Parameter(torch.randn(4, 8))
    p.grad = torch.randn(4, 8)
    with pytest.raises(ValueError, match="original"):
        Muon([p], lr=0.02, adjust_lr_fn="match_rms_adamw").step()


def test_orthogonalization_dtype_by_device(monkeypatch):
    from nanochat import optim
    monkeypatch.setattr(optim, "_cpu_has_native_bf16", lambda: False)
    assert optim.orthogonalization_dtype("cpu") == torch.float32
    monkeypatch.setattr(optim, "_cpu_has_native_bf16", lambda: True)
    assert optim.orthogonalization_dtype("cpu") == torch.bfloat16
    for capability, dtype in (((7, 5), torch.float32), ((7, 0), torch.float32), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert optim.orthogonalization_dtype("cuda:0") == dtype
    assert optim.orthogonalization_dtype("mps") == torch.float32


def test_cpu_bf16_flags_read_from_cpuinfo(tmp_path):
    from nanochat import optim
    for flags, native in (("fpu avx2 fma", False), ("fpu avx2 avx512f avx512_bf16", True), ("amx_bf16 amx_tile", True)):
        cpuinfo = tmp_path / f"cpuinfo-{native}-{len(flags)}"
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n")
        assert optim._cpu_has_native_bf16(str(cpuinfo)) is native
    assert optim._cpu_has_native_bf16(str(tmp_path / "absent")) is False

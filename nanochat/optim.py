"""
Optimizers for nanochat models: Muon for the transformer's hidden matrices, AdamW for the
embedding and the unembedding (lm_head).

The math matches nanochat's (Oct 2025 - Jan 2026):
- Muon: buf = lerp(buf, g, 1-m); g = lerp(g, buf, m) (Nesterov); g is orthogonalised by 5
  quintic Newton-Schulz steps; p *= 1 - lr * wd; p -= lr * sqrt(max(1, rows/cols)) * g.
  torch.optim.Muon (torch >= 2.9, adjust_lr_fn="original") is this update with the iteration
  always in bf16. `Muon` below is torch's optimizer (its constructor, checks, param groups and
  state: checkpoints and resume are unchanged) with its step taking the iteration's dtype:
  bf16 where the device computes it natively (CUDA from Ampere on, CPUs with AVX512-BF16 or
  AMX), fp32 elsewhere. Emulated bf16 is the slow part of a CPU step (one iteration over a
  1024x256 gradient: 0.72 s in bf16, 0.02 s in fp32 on an AVX2 AMD EPYC) and no more exact.
- AdamW: betas (0.8, 0.95), eps 1e-10, no weight decay; the two learning rates are scaled
  by (n_embd/768)^-0.5 because they were tuned on a 768-wide model.
"""

import functools
import math
from pathlib import Path

import torch

# nanochat's tuned constants
ADAMW_BETAS = (0.8, 0.95)
ADAMW_EPS = 1e-10
MUON_MOMENTUM = 0.95
MUON_NS_STEPS = 5
REFERENCE_WIDTH = 768  # width at which the AdamW learning rates were tuned


def adamw_lr_scale(n_embd):
    """AdamW learning rates shrink with width as 1/sqrt(n_embd/768)."""
    return (n_embd / REFERENCE_WIDTH) ** -0.5


def setup_optimizers(model, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                     muon_dtype=None):
    """
    Build [adamw, muon] for a GPT: AdamW over lm_head (unembedding_lr * s) and wte
    (embedding_lr * s), s = (n_embd/768)^-0.5; Muon over every matrix in transformer.h
    (matrix_lr, momentum 0.95, Nesterov, 5 Newton-Schulz steps in `muon_dtype` (None: the
    device's fast one), `weight_decay`).
    Every param group gets 'initial_lr' so that schedules can scale from it.
    """
    n_embd = model.config.n_embd
    lm_head_params = list(model.lm_head.parameters())
    embedding_params = list(model.transformer.wte.parameters())
    matrix_named = list(model.transformer.h.named_parameters())
    matrix_params = [p for _, p in matrix_named]

    # every trainable tensor must be updated by exactly one optimizer: a parameter left out
    # would silently stay frozen, one listed twice (e.g. tied weights) would be stepped twice
    group_of = {}
    named_groups = (("lm_head", lm_head_params), ("wte", embedding_params), ("transformer.h", matrix_params))
    for group_name, params in named_groups:
        for p in params:
            assert id(p) not in group_of, (
                f"a parameter is in both the '{group_of[id(p)]}' and '{group_name}' groups "
                "(tied weights are not supported)"
            )
            group_of[id(p)] = group_name
    ungrouped = [name for name, p in model.named_parameters() if id(p) not in group_of]
    assert not ungrouped, f"parameters not covered by any optimizer group: {ungrouped[:5]}"
    not_matrices = [f"transformer.h.{name} {tuple(p.shape)}" for name, p in matrix_named if p.ndim != 2]
    assert not not_matrices, f"Muon only handles 2D matrices, found: {not_matrices[:5]}"

    scale = adamw_lr_scale(n_embd)
    adam_groups = [
        dict(params=lm_head_params, lr=unembedding_lr * scale),
        dict(params=embedding_params, lr=embedding_lr * scale),
    ]
    # the fused kernel exists only for CUDA tensors
    use_fused = lm_head_params[0].device.type == "cuda"
    adamw = torch.optim.AdamW(adam_groups, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=0.0, fused=use_fused)
    optimizers = [adamw, muon(matrix_params, lr=matrix_lr, weight_decay=weight_decay, dtype=muon_dtype)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


# ----------------------------------------------------------------------------- Muon


def muon(params, lr, weight_decay=0.0, dtype=None):
    """nanochat's Muon over `params`: momentum 0.95, Nesterov, 5 Newton-Schulz steps,
    sqrt(max(1, rows/cols)) step scale (torch's adjust_lr_fn="original"). weight_decay is always
    given: torch.optim.Muon's default is 0.1, nanochat's 0. dtype: of the iteration (None: the
    device's fast one, see orthogonalization_dtype)."""
    params = list(params)
    if dtype is None:
        dtype = orthogonalization_dtype(params[0].device) if params else torch.float32
    return Muon(params, lr=lr, weight_decay=weight_decay, momentum=MUON_MOMENTUM, nesterov=True,
                ns_steps=MUON_NS_STEPS, adjust_lr_fn="original", dtype=dtype)


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose Newton-Schulz iteration runs in `dtype` (torch's: always bf16).
    The dtype is not part of the state dict, so a checkpoint of either loads into the other."""

    def __init__(self, params, *, dtype=torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["adjust_lr_fn"] not in (None, "original"):
                raise ValueError(f"Muon here scales steps as nanochat does (adjust_lr_fn='original'), "
                                 f"not {group['adjust_lr_fn']!r}")
            momentum, lr = group["momentum"], float(group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                direction = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                direction = newton_schulz(direction, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                          self.dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(direction, alpha=-lr * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss


def muon_dtype_of(optimizers):
    """The Newton-Schulz dtype of the Muon among `optimizers` ("float32", "bfloat16"; None: no Muon)."""
    return next((str(opt.dtype).removeprefix("torch.") for opt in optimizers if isinstance(opt, Muon)), None)


def newton_schulz(matrix, coefficients, steps, eps, dtype):
    """An approximately orthogonal matrix with `matrix`'s singular vectors (singular values pulled
    into about [0.7, 1.2]) by `steps` quintic Newton-Schulz iterations X <- aX + (bA + cA^2)X,
    A = XX^T, in `dtype`, on the wide orientation (so A is the smaller Gram matrix)."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.mT if tall else matrix
    x = x.to(dtype)
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def orthogonalization_dtype(device):
    """bf16 where `device` multiplies bf16 matrices natively, fp32 where it would emulate it."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def native_bf16(device) -> bool:
    """Whether `device` computes bf16 in hardware: CUDA from compute capability 8.0 (Ampere) on
    (T4 7.5 and V100 7.0 only emulate it, many times slower, though torch.cuda.is_bf16_supported()
    says True for them unless asked without emulation; ROCm: as torch says without emulation),
    CPUs with AVX512-BF16 or AMX. mps: no (not relied on)."""
    device = torch.device(device)
    if device.type == "cuda":
        if getattr(torch.version, "hip", None):  # ROCm: no compute capability to go by
            return torch.cuda.is_bf16_supported(including_emulation=False)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)
    return device.type == "cpu" and _cpu_has_native_bf16()


@functools.cache
def _cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    """AVX512-BF16 or AMX-BF16 among the CPU's flags (Linux; elsewhere: no)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags

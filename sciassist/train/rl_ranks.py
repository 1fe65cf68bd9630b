"""How the processes of an RL run under torchrun share its work and put it back together.

Every rank builds the same list of a step's questions (rl_questions: a function of (seed, step))
and draws the same sampling seed for every reply of the step, then takes its share: a contiguous
slice of the questions (share), with all their replies, so a question's group stays on one rank.
A reply depends only on its seed and the weights, not on the rows decoded beside it
(nanochat.engine's per-row generators), so the ranks together sample exactly the replies one
process would.

The ranks then exchange their samples (gathered): every rank knows the whole step, so the
token-normalisation divisor and the step's metrics are those of one process. Each rank runs the
policy gradient of its own replies only, divided by that step-wide divisor, and the gradients are
summed over the ranks (all_reduce_gradients) before every rank takes the same optimizer step:
the update is the one-process update up to the order of float additions. Muon runs on every rank
on the summed gradients, as fine-tuning's DDP does (nanochat's DistMuon, which shards the
orthogonalisation, is not used).

Validation is shared the same way: each rank decodes its slice of the validation questions and the
samples are gathered, so its figures, too, equal one process's. Only rank 0 writes files.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def share(count: int, runtime) -> range:
    """This rank's contiguous slice of `count` items (the first ranks get one fewer when they do
    not divide evenly)."""
    return range(count * runtime.rank // runtime.world_size, count * (runtime.rank + 1) // runtime.world_size)


def gathered(runtime, items: list) -> list:
    """Every rank's `items`, concatenated in rank order, on every rank (one process: `items`)."""
    if not runtime.distributed:
        return list(items)
    parts = [None] * runtime.world_size
    dist.all_gather_object(parts, list(items))
    return [item for part in parts for item in part]


def summed(runtime, values: list[float]) -> list[float]:
    """Each of `values` summed over the ranks (in float64)."""
    if not runtime.distributed:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(total)
    return total.tolist()


def all_reduce_gradients(model, runtime) -> None:
    """Sum every trainable parameter's gradient over the ranks, in place (a rank that trained on
    nothing this step adds zeros)."""
    if not runtime.distributed:
        return
    pending = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        pending.append(dist.all_reduce(p.grad, async_op=True))
    for work in pending:
        work.wait()

"""A GPU simulated on the CPU, for the tests of what memory allows: torch.cuda.mem_get_info and
get_device_name answer for a card of the given size, sciassist.memory treats the CPU as that card,
and an allocation hook (a TorchDispatchMode counting the bytes of every live tensor storage made
under it) raises torch.cuda.OutOfMemoryError, with CUDA's wording, once they pass a budget.

    with simulated_card(monkeypatch, total=16 * GB, free=15 * GB, budget=40_000_000) as card:
        ...            # card.peak: the most bytes held at once; card.failures: how often it raised

Tensors made before the card (a model's weights) are not counted: the budget is what the work
under it may add, as a real card's free memory is what is left beside the weights.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sciassist import memory

GB = 10**9


class AllocationHook(TorchDispatchMode):
    """Counts live storage bytes made under it; raises OutOfMemoryError past `budget` (None: never)."""

    def __init__(self, budget: int | None):
        super().__init__()
        self.budget = budget
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.failures = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)  # a storage keeps its Python object while it lives
            if key in self.live:
                continue
            size = storage.nbytes()
            self.live[key] = size
            self.current += size
            weakref.finalize(storage, self._freed, key)
            if self.budget is not None and self.current > self.budget:
                self.failures += 1
                raise torch.cuda.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {size / 2**20:.2f} MiB. GPU 0 has a total capacity of "
                    f"{self.budget / 2**30:.2f} GiB of which 0 bytes is free. (simulated)")
            self.peak = max(self.peak, self.current)
        return out

    def _freed(self, key):
        self.current -= self.live.pop(key, 0)


@contextlib.contextmanager
def simulated_card(monkeypatch, total: int, free: int | None = None, budget: int | None = None,
                   name: str = "Simulated GPU"):
    """The CPU as a card of `total` bytes with `free` free (default: all), allocations past
    `budget` bytes failing (default: never)."""
    free = total if free is None else free
    monkeypatch.setattr(memory, "CARD_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    hook = AllocationHook(budget)
    with hook:
        yield hook

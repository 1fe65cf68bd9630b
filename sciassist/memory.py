"""What a device's memory allows, for every stage: the card a run is on (its name, total and
free memory), recognising an out-of-memory error on any device, releasing what a failed batch
held, and running work at a batch size that halves on out-of-memory.

A CPU has no card: its memory is the machine's, and a batch there is chosen for speed
(sciassist.train.batch). CARD_TYPES names the device types whose memory torch.cuda reports.
"""

from __future__ import annotations

import dataclasses
import gc

import torch

GB = 10**9  # cards are sold in GB; messages say GB
CARD_TYPES = ("cuda",)  # ROCm GPUs are "cuda" devices too
OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed")


@dataclasses.dataclass(frozen=True)
class Card:
    """A GPU as a batch is sized for it: its name, total and free memory (bytes)."""

    name: str
    total: int
    free: int

    def describe(self) -> str:
        return f"{self.name} ({self.total / GB:.1f} GB, {self.free / GB:.1f} GB free)"


def card_of(device) -> Card | None:
    """The card `device` is (torch.cuda.mem_get_info, now), or None for a CPU or mps."""
    device = torch.device(device)
    if device.type not in CARD_TYPES:
        return None
    index = device if device.index is not None else None
    free, total = torch.cuda.mem_get_info(index)
    return Card(name=torch.cuda.get_device_name(index), total=int(total), free=int(free))


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device ran out of memory: torch's OutOfMemoryError (CUDA, ROCm;
    torch.OutOfMemoryError is the same class), or the RuntimeError that mps, cuBLAS and cuDNN
    raise ("MPS backend out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory"), and
    the CPU allocator's "can't allocate memory"."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    text = str(error)
    return any(words in text.lower() for words in OUT_OF_MEMORY_WORDS)


def release_memory(device) -> None:
    """Give back what a failed batch held: Python's unreachable objects, then the CUDA caching
    allocator's free blocks (so the next, smaller try and other processes can have them). Call it
    outside the `except` block: the exception's traceback keeps the failed frames' tensors alive."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


class OutOfMemory(Exception):
    """Work that did not fit even at a batch of 1; `batch` is the size last tried."""

    def __init__(self, message: str, batch: int):
        super().__init__(message)
        self.batch = batch


def halving(work, batch: int, device, what: str = "batch", say=print):
    """work(batch), halving `batch` on out-of-memory (one line each time, via `say`) until it
    fits; OutOfMemory when even 1 does not. Returns (work's result, the batch that fitted)."""
    if batch < 1:
        raise ValueError(f"{what} must be >= 1, got {batch}")
    while True:
        failed = None
        try:
            return work(batch), batch
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raised
            if not is_out_of_memory(e):
                raise
            failed = first_line(e)
        release_memory(device)
        if batch == 1:
            raise OutOfMemory(f"{what} 1 does not fit ({failed})", batch)
        say(f"out of memory at {what} {batch}; trying {batch // 2}")
        batch //= 2


def first_line(error: BaseException) -> str:
    """The first line of an error's message (CUDA's go on for a paragraph)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

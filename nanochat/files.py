"""
Reading and writing the files of a checkpoint. load_tensors_file is the one loader of the .pt
files this project reads: model_<step>.pt, optim_<step>.pt, tokenizer/token_bytes.pt (and, in
sciassist.train.state, the resume points).

Every file is untrusted input: it is read with torch.load(weights_only=True), so it can hold
tensors and plain data only, never code, and whatever is wrong with it (missing, empty, a Git
LFS pointer, truncated, garbage, a pickle of other Python objects) becomes ONE line naming the
file, the problem and what to do: a CheckpointError. torch's own multi-line texts (which advise
loading with weights_only=False, i.e. running the file's code) are never passed on.

Writing is atomic (atomic_write: a temp file beside the target, fsynced, then renamed), so a
reader sees the old file or the complete new one; remove_partial_files sweeps what saves killed
midway leave. Kept apart from nanochat.checkpoint so that
nanochat.tokenizer, which checkpoint imports, can use it too.
"""

import os
import re
import tempfile
import warnings
from pathlib import Path

import torch

DOWNLOAD_HINT = "download a published checkpoint with `make download MODEL=d20` (or `python -m sciassist.hub`)"
RESAVE_HINT = "re-download or re-save it"


class CheckpointError(Exception):
    """A checkpoint cannot be found, read or loaded; the message says what to do."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_LONGEST_REASON = 160


def _one_line(text):
    """The first non-empty line of an exception's text, without terminal colours, shortened."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if len(line) > _LONGEST_REASON:  # torch's texts go on to advice: the first sentence is the reason
        line = line.split(". ", 1)[0]
    return line if len(line) <= _LONGEST_REASON else line[:_LONGEST_REASON - 3] + "..."


def _unpickling_problem(error):
    """(holds Python objects?, the reason) from torch's weights-only UnpicklingError text."""
    text = _ANSI.sub("", str(error))
    named = _GLOBAL.search(text)
    if named:
        return True, named.group(1)
    if "Weights only load failed" in text:
        # the real reason is after "WeightsUnpickler error:" (e.g. "Unsupported operand 38")
        after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        reason = next((line.strip() for line in after.splitlines()
                       if line.strip() and not line.strip().startswith("Check the documentation")), "")
        return False, _one_line(reason) or "not a torch file"
    return False, _one_line(text) or type(error).__name__


def load_tensors_file(path, map_location="cpu", what="tensor", remedy=None):
    """torch.load(path, weights_only=True), or a one-line CheckpointError.

    what: the kind of file, for the messages ("model", "resume point"); remedy: what the user
    can do, ending each message (default: download a published checkpoint when the file is
    missing, re-download or re-save it when it is damaged)."""
    path = Path(path)
    missing_remedy, damaged_remedy = (remedy, remedy) if remedy else (DOWNLOAD_HINT, RESAVE_HINT)
    if path.is_dir():
        raise CheckpointError(f"{what} file {path} is a directory, not a file; {missing_remedy}")
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} does not exist; {missing_remedy}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{what} file {path} is empty (0 bytes; a write that was cut short?); {damaged_remedy}")
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path} is a Git LFS pointer ({size} bytes), not the weights; {missing_remedy}")
    try:
        with warnings.catch_warnings():  # the refusal below says it better than this warning does
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as e:  # truncated or garbage files fail in many ways (zip, pickle, KeyError, EOFError, ...)
        objects, reason = _unpickling_problem(e) if "Unpickl" in type(e).__name__ else (False, _one_line(str(e)))
        if not objects and head[:1] == b"\x80" and head[1:2] >= b"\x04":  # a plain pickle, not torch.save's zip
            objects, reason = True, f"a plain pickle of protocol {head[1]}, not a torch file"
        if objects:
            raise CheckpointError(f"{path} holds Python objects other than tensors and plain data ({reason}); "
                                  f"refusing to unpickle it for safety; {damaged_remedy}") from None
        raise CheckpointError(f"{what} file {path} ({size} bytes) is unreadable: truncated or corrupt "
                              f"({reason or type(e).__name__}); {damaged_remedy}") from None


# -----------------------------------------------------------------------------
# writing

def write_temp(path, write_fn, mode):
    """Write a temp file beside `path` (.<name>.<random>.tmp), flushed to disk; returns its path.
    A failed write removes it; a killed one leaves it for remove_partial_files."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        remove_if_present(tmp)
        raise
    return tmp


def remove_if_present(path):
    if os.path.exists(path):
        os.remove(path)


def atomic_write(path, write_fn, mode):
    # a temp file in the same directory, then os.replace: readers see the old file or the
    # complete new one, never a partial write
    tmp = write_temp(path, write_fn, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_if_present(tmp)
        raise


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# what saves killed midway leave (a reader never sees them: it looks for model_<step>.pt)

PARTIAL_FILE = re.compile(r"^\.(model|optim|meta)_\d+\.(pt|json)\..+\.tmp$")
SAVED_FILE = re.compile(r"^(model|meta|optim)_(\d+)\.(pt|json)$")


def _incomplete(checkpoint_dir, name):
    """Whether `name` is one file of a save that did not finish: a temp file, a meta_/optim_<step>
    without its model_<step>.pt, or a model_<step>.pt without its meta_<step>.json."""
    if PARTIAL_FILE.match(name):
        return True
    saved = SAVED_FILE.match(name)
    if saved is None or saved.group(3) != ("json" if saved.group(1) == "meta" else "pt"):
        return False
    needed = f"meta_{saved.group(2)}.json" if saved.group(1) == "model" else f"model_{saved.group(2)}.pt"
    return not (checkpoint_dir / needed).is_file()


def remove_partial_files(checkpoint_dir):
    """Remove what saves killed midway left in a folder save_checkpoint writes: temp files (a
    model's is as large as the model), meta_/optim_<step> files whose model never arrived, and
    a model_<step>.pt without its meta (which earlier versions, writing the model first, could
    leave, and which no reader can load). Returns the names removed. Not for a folder another
    program writes at the same time (its save in progress would look the same)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    incomplete = [p for p in sorted(checkpoint_dir.iterdir()) if p.is_file() and _incomplete(checkpoint_dir, p.name)]
    for path in incomplete:
        path.unlink()
    return [p.name for p in incomplete]

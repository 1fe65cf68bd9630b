"""
Conversation files: JSONL, one conversation per line.

A line is either an object with a "messages" list (the TRL / workshop README shape; other
keys such as "meta" are kept as they are) or a bare JSON array of messages (what the
nanochat workshop's loader also accepted). Each message is {"role": ..., "content": str}.

Message rules are nanochat's own (`nanochat.tokenizer.validate_messages`), so a file that
reads cleanly here also renders cleanly for training:
  - an optional "system" message, first only;
  - then "user" / "assistant" strictly alternating, starting with "user";
  - content is a non-empty string (whitespace only counts as empty); the one exception is
    nanochat's tool-use format, an assistant content given as a list of typed parts;
  - at least one "assistant" turn (a line with nothing to learn from is an error).
This module adds what only a file knows: which line broke. Blank lines are skipped; a
file with no conversations at all is an error. A JSON array of conversations (on one line,
or a whole file that is one JSON document) is not JSONL, and the error says so.
"""

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from nanochat.tokenizer import validate_messages
from sciassist.common import UserError


class ConversationError(UserError, ValueError):
    """A conversation file or record is malformed. The message reads 'path:line: problem'."""


def check_messages(messages, require_assistant=True):
    """None when `messages` is a valid conversation, else a one-line description of the
    first problem (naming the message index), for callers to prefix with their location."""
    try:
        validate_messages(messages, require_assistant=require_assistant)
    except ValueError as e:
        return str(e)
    return None


def _is_conversation(obj):
    """A whole conversation ({"messages": ...} or a list), not one message."""
    return (isinstance(obj, dict) and "messages" in obj and "role" not in obj) or isinstance(obj, list)


def _as_record(obj):
    """Normalise one parsed JSON value to a record dict, or return a problem string."""
    if isinstance(obj, list):
        return {"messages": obj}
    if isinstance(obj, dict):
        if "messages" not in obj:
            keys = ", ".join(sorted(obj)) or "none"
            return f"expected a 'messages' key (keys found: {keys})"
        return obj
    return f"expected an object with 'messages' or an array of messages, got {type(obj).__name__}"


def _whole_file_json(path):
    """'a JSON array' / 'a JSON object' when the whole file is one JSON document spread over
    lines (not JSONL), else None."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            obj = json.load(f)
    except (ValueError, OSError):
        return None
    return {list: "a JSON array", dict: "a JSON object"}.get(type(obj))


def _line_problem(text, lineno, path, require_assistant, first=False):
    """(record, None) for a good line, (None, problem) for a bad one; ConversationError when
    the file is not JSONL at all (one JSON document over several lines, checked at the
    `first` line of content)."""
    try:
        # Without the newline, so an error's column points into this line.
        obj = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        problem = f"invalid JSON ({e.msg} at column {e.colno})"
        document = _whole_file_json(path) if first and text.lstrip().startswith(("[", "{")) else None
        if document:  # no line of it can be read: an error even with skip_bad
            raise ConversationError(f"{path}:{lineno}: {problem}; the whole file is {document} spread over "
                                    f"several lines, not JSONL (one conversation per line)") from None
        return None, problem
    if isinstance(obj, list) and obj and all(_is_conversation(item) for item in obj):
        count = f"{len(obj)} conversations" if len(obj) > 1 else "1 conversation"
        return None, (f"a JSON array of {count} on one line: the file is a JSON array, not JSONL (one "
                      f"conversation per line); write each {{\"messages\": [...]}} object on its own line")
    record = _as_record(obj)
    if isinstance(record, str):
        return None, record
    problem = check_messages(record["messages"], require_assistant)
    return (record, None) if problem is None else (None, problem)


@dataclass
class SkippedLine:
    line: int
    problem: str


class Conversations(list):
    """The records read from a file (a plain list of dicts), plus what `skip_bad` left out."""

    def __init__(self, records=(), path="", skipped=None):
        super().__init__(records)
        self.path = str(path)
        self.skipped: list[SkippedLine] = list(skipped or [])

    def skipped_summary(self, limit=5):
        if not self.skipped:
            return f"{self.path}: {len(self)} conversations, none skipped"
        shown = "; ".join(f"line {s.line}: {s.problem}" for s in self.skipped[:limit])
        more = f"; ... {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"{self.path}: {len(self)} conversations, skipped {len(self.skipped)} bad lines ({shown}{more})"


def read_conversations(path, skip_bad=False, require_assistant=True):
    """Read a JSONL conversation file into a list of {"messages": [...], ...} records.

    By default the first bad line raises ConversationError('path:line: problem'). With
    skip_bad=True bad lines are left out instead; the returned list's `.skipped` names them
    and a warning gives the count, so a silently shrunken dataset cannot go unnoticed.
    """
    path = Path(path)
    records, skipped = [], []
    # Binary read + per-line decode so an encoding error can name its line too.
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                record, problem = None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
            else:
                if not text.strip():
                    continue
                record, problem = _line_problem(text, lineno, path, require_assistant, not records and not skipped)
            if problem is None:
                records.append(record)
            elif skip_bad:
                skipped.append(SkippedLine(lineno, problem))
            else:
                raise ConversationError(f"{path}:{lineno}: {problem}")
    result = Conversations(records, path, skipped)
    if not records:
        why = (f" ({len(skipped)} bad lines skipped); the first, line {skipped[0].line}: {skipped[0].problem}"
               if skipped else " (the file is empty or blank)")
        raise ConversationError(f"{path}: no conversations{why}")
    if skipped:
        warnings.warn(result.skipped_summary(), stacklevel=2)
    return result


def write_conversations(path, records):
    """Write records (dicts with "messages", or bare message lists) as JSONL; returns the count.

    Every record is checked first so a bad one fails with its index before anything is
    written, and the file is replaced atomically so a crash never leaves half a dataset.
    """
    path = Path(path)
    lines = []
    for index, obj in enumerate(records):
        record = _as_record(obj)
        problem = record if isinstance(record, str) else check_messages(record["messages"])
        if problem is not None:
            raise ConversationError(f"{path}: record {index}: {problem}")
        lines.append(json.dumps(record, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(lines)


def split_validation(records, val_split):
    """Split into (train, val) with val = the LAST `val_split` fraction, as the workshop did
    (int(n * val_split) records, so the split is reproducible without a seed).

    Unlike the workshop, both sides always get at least one record: a fraction that rounds
    to zero still yields one validation record, and a split that would leave no training
    record is an error rather than a silent empty run.
    """
    if not isinstance(val_split, (int, float)) or not 0 < val_split < 1:
        raise ValueError(f"val_split must be a fraction strictly between 0 and 1, got {val_split!r}")
    records = list(records)
    n = len(records)
    if n < 2:
        raise ValueError(f"need at least 2 conversations to split off validation, got {n}")
    n_val = max(1, int(n * val_split))
    if n_val >= n:
        raise ValueError(f"val_split={val_split} of {n} conversations leaves no training data")
    return records[: n - n_val], records[n - n_val :]

"""
BPE tokenizer compatible with nanochat's published tokenizer files, plus chat rendering.

The tokenizer itself is a tiktoken Encoding (fast encode/decode). New vocabularies are
trained with the rustbpe package. On disk a tokenizer directory holds:
  tokenizer.pkl   a pickled tiktoken.core.Encoding named "rustbpe" (pickle protocol 4)
  token_bytes.pt  int32 tensor [V], UTF-8 byte length of every token, 0 for specials
Chat rendering turns a conversation into token ids plus a supervision mask
(1 = the model is trained to predict this token).
"""

import io
import os
import pickle
from pathlib import Path

import tiktoken
import torch

from nanochat.files import CheckpointError, load_tensors_file

SPECIAL_TOKENS = [
    "<|bos|>",  # every document / conversation starts with it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, fed back to the assistant
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers are split into groups of 1-2 digits (not 1-3):
# with a 65k vocab, fewer number tokens leave room for more word tokens.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

ENCODING_NAME = "rustbpe"
PICKLE_PROTOCOL = 4  # what the published tokenizer.pkl files use
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")
TOKEN_BYTES_HINT = "delete it (it is then computed from tokenizer.pkl) or re-download the tokenizer"


class TokenizerLoadError(ValueError):
    """A tokenizer directory that cannot (or must not) be loaded."""


# -----------------------------------------------------------------------------
# Restricted unpickling of tokenizer.pkl

class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling.

    Encoding.__setstate__ would call Encoding.__init__ on whatever state the file holds, and
    a str state makes tiktoken fetch a registered encoding (network access). So the file is
    first unpickled into this inert holder, the state is checked to be plain data of the
    expected shape, and only then is a real Encoding built from it.
    """

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    # every global reference (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through find_class,
    # so refusing all but one name means the pickle can only build plain data plus the holder
    def find_class(self, module, name):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _EncodingState
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': a tokenizer pickle may only contain "
            f"tiktoken.core.Encoding and plain data (other globals could run code)"
        )


def _check_int(value):
    # bool is an int subclass; a rank of True is not a rank
    return type(value) is int and value >= 0


def _encoding_from_state(state, where):
    """Build a tiktoken Encoding from an unpickled state dict after checking every value."""
    expected = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise TokenizerLoadError(f"{where}: Encoding state should be a dict with keys {sorted(expected)}, got {got}")
    name, pat_str = state["name"], state["pat_str"]
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if type(name) is not str or type(pat_str) is not str:
        raise TokenizerLoadError(f"{where}: Encoding 'name' and 'pat_str' should be strings")
    if type(ranks) is not dict or not ranks or not all(type(k) is bytes and _check_int(v) for k, v in ranks.items()):
        raise TokenizerLoadError(f"{where}: 'mergeable_ranks' should be a non-empty dict of bytes -> non-negative int")
    if type(specials) is not dict or not all(type(k) is str and _check_int(v) for k, v in specials.items()):
        raise TokenizerLoadError(f"{where}: 'special_tokens' should be a dict of str -> non-negative int")
    try:
        return tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # e.g. a split pattern that does not compile
        raise TokenizerLoadError(f"{where}: cannot build a tiktoken Encoding from it: {e}") from e


def load_encoding(path):
    """Read a pickled tiktoken Encoding without ever running code named by the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerLoadError(f"{path}: cannot read tokenizer pickle: {e}") from e
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise TokenizerLoadError(f"{path}: {e}") from e
    except Exception as e:  # truncated or garbage files fail in many ways (EOFError, TypeError, ...)
        raise TokenizerLoadError(f"{path}: not a valid tokenizer pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise TokenizerLoadError(f"{path}: expected a pickled tiktoken Encoding, got {type(obj).__name__}")
    return _encoding_from_state(obj.state, str(path))


# -----------------------------------------------------------------------------
# Conversation validation (shared with sciassist.data.conversations, which adds file:line)

def _messages_of(conversation):
    if isinstance(conversation, dict):
        if "messages" not in conversation:
            raise ValueError("conversation: a dict conversation needs a 'messages' list")
        conversation = conversation["messages"]
    if not isinstance(conversation, list):
        raise ValueError(f"conversation: expected a list of messages, got {type(conversation).__name__}")
    return conversation


def _check_text(i, role, text):
    if not isinstance(text, str):
        raise ValueError(f"message {i} ({role}): content must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"message {i} ({role}): content is empty")


def _check_parts(i, parts):
    # only assistant messages may carry tool calls, as a list of typed parts
    if not parts:
        raise ValueError(f"message {i} (assistant): content is an empty list of parts")
    for j, part in enumerate(parts):
        if not isinstance(part, dict):
            raise ValueError(f"message {i} (assistant): part {j} must be a dict, got {type(part).__name__}")
        if part.get("type") not in PART_TYPES:
            raise ValueError(f"message {i} (assistant): part {j} has type {part.get('type')!r}, "
                             f"expected one of {list(PART_TYPES)}")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"message {i} (assistant): part {j} needs a string 'text'")
    # a reply made only of empty parts would teach nothing but <|assistant_end|>
    if not any(part["text"].strip() for part in parts):
        raise ValueError(f"message {i} (assistant): all content parts are empty")


def validate_messages(messages, require_assistant=True):
    """Check a list of chat messages and return them normalized.

    Rules: roles are system|user|assistant; a system message may only come first and is
    merged into the following user message as system + "\\n\\n" + user; after that, roles
    alternate user, assistant, user, ...; content is a non-empty string (assistant content
    may also be a list of parts). Errors are ValueErrors that start with "message <i>"
    where i indexes the list as given (before the system merge).
    Returns new dicts {"role", "content"}; the input is not modified.
    """
    messages = _messages_of(messages)
    if not messages:
        raise ValueError("conversation: no messages")
    out = []
    system = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r}, expected one of {list(ROLES)}")
        if "content" not in msg:
            raise ValueError(f"message {i} ({role}): missing 'content'")
        content = msg["content"]
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i} (system): a system message may only be the first message")
            _check_text(i, role, content)
            system = content
            continue
        expected = "user" if len(out) % 2 == 0 else "assistant"
        if role != expected:
            if out:
                where = f"after message {i - 1} ({out[-1]['role']})"
            else:
                where = "after the system message" if system is not None else "first"
            raise ValueError(f"message {i}: expected role '{expected}' {where}, got '{role}' "
                             f"(roles must alternate user/assistant)")
        if role == "assistant" and isinstance(content, list):
            _check_parts(i, content)
            content = [{"type": p["type"], "text": p["text"]} for p in content]
        else:
            _check_text(i, role, content)
        if system is not None and not out:
            content = system + "\n\n" + content
        out.append({"role": role, "content": content})
    if not out:
        raise ValueError("message 0 (system): a system message must be followed by a user message")
    if require_assistant and not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"message {len(messages) - 1}: conversation has no assistant message to train on")
    return out


# -----------------------------------------------------------------------------

class Tokenizer:

    def __init__(self, enc, token_bytes=None):
        missing = [s for s in SPECIAL_TOKENS if s not in enc._special_tokens]
        if missing:
            raise ValueError(f"encoding '{enc.name}' lacks the chat special tokens {missing}")
        # every id below n_vocab must decode, or token_bytes() and the embedding rows would not line up
        if len(enc._mergeable_ranks) + len(enc._special_tokens) != enc.n_vocab:
            raise ValueError(f"encoding '{enc.name}' token ids are not contiguous 0..{enc.n_vocab - 1}")
        self.enc = enc
        self._special = {s: enc._special_tokens[s] for s in SPECIAL_TOKENS}
        self._token_bytes = token_bytes

    @classmethod
    def from_directory(cls, directory):
        directory = Path(directory)
        pkl = directory / "tokenizer.pkl"
        if not pkl.is_file():
            raise TokenizerLoadError(f"{directory}: no tokenizer.pkl in this directory")
        enc = load_encoding(pkl)
        try:
            tok = cls(enc)
        except ValueError as e:
            raise TokenizerLoadError(f"{pkl}: {e}") from e
        tb_path = directory / "token_bytes.pt"
        if tb_path.is_file():
            # keep the file's values when present: that is what bits-per-byte was measured with
            try:
                tb = load_tensors_file(tb_path, "cpu", "token bytes", remedy=TOKEN_BYTES_HINT)
            except CheckpointError as e:
                raise TokenizerLoadError(str(e)) from e
            V = tok.get_vocab_size()
            if not isinstance(tb, torch.Tensor) or tb.dtype != torch.int32 or tuple(tb.shape) != (V,):
                got = f"{tb.dtype} {tuple(tb.shape)}" if isinstance(tb, torch.Tensor) else type(tb).__name__
                raise TokenizerLoadError(f"{tb_path}: expected an int32 tensor of shape ({V},), got {got}")
            tok._token_bytes = tb
        return tok

    @classmethod
    def train_from_iterator(cls, texts, vocab_size):
        import rustbpe  # only needed for training
        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} specials), got {vocab_size}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), n_merged, pattern=SPLIT_PATTERN)
        ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
        # rustbpe stops early when the text has no more pairs to merge; a smaller vocab than
        # asked for would silently disagree with the model's vocab_size
        if len(ranks) != n_merged:
            raise ValueError(f"training text too small: got {len(ranks)} non-special tokens, wanted {n_merged} "
                             f"(vocab_size {vocab_size}); give more text or a smaller vocab_size")
        specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(ENCODING_NAME, pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc)

    def save(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # write-then-rename so an interrupted save never leaves a half-written file behind
        pkl = directory / "tokenizer.pkl"
        tmp = pkl.with_name(pkl.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump(self.enc, f, protocol=PICKLE_PROTOCOL)
        os.replace(tmp, pkl)
        tb = directory / "token_bytes.pt"
        tmp = tb.with_name(tb.name + ".tmp")
        torch.save(self.token_bytes(), tmp)
        os.replace(tmp, tb)

    # --- plain tokens

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self._special["<|bos|>"]

    def get_special_tokens(self):
        return list(SPECIAL_TOKENS)

    def encode_special(self, name):
        if name not in self._special:
            raise ValueError(f"unknown special token {name!r}, expected one of {SPECIAL_TOKENS}")
        return self._special[name]

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def _as_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else int(token)

    def encode(self, text, prepend=None, append=None):
        """Encode str -> list[int] or list[str] -> list[list[int]].

        Special-token text inside `text` stays ordinary text (encode_ordinary), so user
        content can never inject control tokens. prepend/append: a token id or special name.
        """
        pre = [] if prepend is None else [self._as_id(prepend)]
        post = [] if append is None else [self._as_id(append)]
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, list):
            return [pre + ids + post for ids in self.enc.encode_ordinary_batch(text)]
        raise TypeError(f"encode expects str or list[str], got {type(text).__name__}")

    def decode(self, ids):
        # int() so a tensor of ids works as well as a list
        return self.enc.decode([int(i) for i in ids])

    def token_bytes(self):
        """int32 tensor [V]: UTF-8 length of each token's text, 0 for special tokens.

        The text is the token decoded on its own, so a token holding part of a multi-byte
        character counts the bytes of U+FFFD (3) per broken sequence. That is how the
        published token_bytes.pt files were made; doing the same keeps bits-per-byte
        comparable with nanochat's reported numbers.
        """
        if self._token_bytes is None:
            specials = set(self._special.values()) | set(self.enc._special_tokens.values())
            lengths = [0 if i in specials else len(self.enc.decode([i]).encode("utf-8"))
                       for i in range(self.get_vocab_size())]
            self._token_bytes = torch.tensor(lengths, dtype=torch.int32)
        return self._token_bytes

    # --- chat rendering

    def _render(self, messages):
        s = self._special
        ids, mask = [s["<|bos|>"]], [0]

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for msg in messages:
            content = msg["content"]
            if msg["role"] == "user":
                add([s["<|user_start|>"]] + self.encode(content) + [s["<|user_end|>"]], 0)
                continue
            add([s["<|assistant_start|>"]], 0)  # given by the prompt, not predicted
            if isinstance(content, str):
                add(self.encode(content), 1)
            else:
                for part in content:
                    tokens = self.encode(part["text"])
                    if part["type"] == "text":
                        add(tokens, 1)
                    elif part["type"] == "python":
                        add([s["<|python_start|>"]] + tokens + [s["<|python_end|>"]], 1)
                    else:  # python_output comes from the tool at inference time: never predicted
                        add([s["<|output_start|>"]] + tokens + [s["<|output_end|>"]], 0)
            add([s["<|assistant_end|>"]], 1)  # the model must learn when to stop
        return ids, mask

    def render_conversation(self, conversation, max_tokens=2048):
        """conversation ({"messages": [...]} or a list) -> (ids, mask), both cut to max_tokens."""
        if type(max_tokens) is not int or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        messages = validate_messages(conversation, require_assistant=True)
        ids, mask = self._render(messages)
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation):
        """Prompt ids for generating the next assistant reply.

        A final assistant message (e.g. the reference answer of an eval example) is dropped,
        and <|assistant_start|> is appended so the model continues as the assistant.
        """
        messages = validate_messages(conversation, require_assistant=False)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        return ids + [self._special["<|assistant_start|>"]]

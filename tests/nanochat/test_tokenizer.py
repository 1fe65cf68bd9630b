import os
import pickle
import pickletools
import random

import pytest
import tiktoken
import torch

from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    TokenizerLoadError,
    load_encoding,
    validate_messages,
)

VOCAB = 512
N_REG = VOCAB - len(SPECIAL_TOKENS)  # 503: first special id


def _corpus(n=400, seed=0):
    # a few hundred short science-quiz-like strings: enough pairs for ~250 merges
    rng = random.Random(seed)
    words = ("the which of these is a an plant animal cell energy water light heat magnet force "
             "earth moon sun rock solid liquid gas answer correct question choice context "
             "photosynthesis temperature weather climate mass volume gravity friction electricity "
             "circuit battery molecule atom element compound mixture habitat ecosystem predator prey "
             "fossil volcano erosion glacier continent ocean current planet orbit season experiment "
             "hypothesis observation evidence explanation background lecture property material").split()
    extra = ["café", "naïve", "你好世界", "🌍", "über", "12", "345", "6789", "I'm", "you're", "it's"]
    out = []
    for _ in range(n):
        k = rng.randint(4, 10)
        s = " ".join(rng.choice(words) for _ in range(k))
        if rng.random() < 0.3:
            s += " " + rng.choice(extra)
        out.append(s.capitalize() + rng.choice([".", "?", "!", "\n"]))
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(_corpus(), VOCAB)


def _special(tok, name):
    return tok.encode_special(name)


# -----------------------------------------------------------------------------
# restricted loading of tokenizer.pkl

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(_Evil(marker), protocol=4))
    with pytest.raises(TokenizerLoadError, match=r"refusing to load global '(posix|os)\.system'"):
        Tokenizer.from_directory(tmp_path)
    assert not marker.exists()


def test_pickle_with_builtin_eval_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class EvalReduce:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').close()",))
    path = tmp_path / "tokenizer.pkl"
    for protocol in (2, 4, 5):  # protocol 2 names it '__builtin__.eval'
        path.write_bytes(pickle.dumps(EvalReduce(), protocol=protocol))
        with pytest.raises(TokenizerLoadError, match=r"refusing to load global '(builtins|__builtin__)\.eval'"):
            load_encoding(path)
    assert not marker.exists()


def _raw_encoding_pickle(state_ops):
    # PROTO 4, STACK_GLOBAL tiktoken.core.Encoding, EMPTY_TUPLE, NEWOBJ, <state>, BUILD, STOP:
    # the exact shape nanochat's files have, with a chosen state
    mod, name = b"tiktoken.core", b"Encoding"
    return (b"\x80\x04" + b"\x8c" + bytes([len(mod)]) + mod + b"\x8c" + bytes([len(name)]) + name
            + b"\x93" + b")" + b"\x81" + state_ops + b"b" + b".")


def test_registered_name_state_is_refused(tmp_path):
    # a str state would make tiktoken look up (and download) a registered encoding
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(_raw_encoding_pickle(b"\x8c\x0bcl100k_base"))
    with pytest.raises(TokenizerLoadError, match="should be a dict with keys"):
        load_encoding(path)


def test_encoding_state_with_non_plain_values_is_refused(tmp_path):
    # REDUCE on the admitted class with arguments, and garbage bytes: clear errors, no crash
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(b"\x80\x04\x8c\rtiktoken.core\x8c\x08Encoding\x93\x8c\x01x\x85R.")
    with pytest.raises(TokenizerLoadError, match="not a valid tokenizer pickle"):
        load_encoding(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(TokenizerLoadError, match="tokenizer.pkl"):
        load_encoding(path)
    with pytest.raises(TokenizerLoadError, match="no tokenizer.pkl"):
        Tokenizer.from_directory(tmp_path / "missing")


def test_nanochat_style_pickle_loads_and_encodes_identically(tok, tmp_path):
    data = pickle.dumps(tok.enc, protocol=4)
    globals_named = [op.name for op, _, _ in pickletools.genops(data) if op.name in ("GLOBAL", "STACK_GLOBAL")]
    assert globals_named == ["STACK_GLOBAL"]  # one global, as in the published files
    (tmp_path / "tokenizer.pkl").write_bytes(data)
    loaded = Tokenizer.from_directory(tmp_path)  # no token_bytes.pt: computed
    assert isinstance(loaded.enc, tiktoken.Encoding) and loaded.enc.name == "rustbpe"
    assert loaded.enc._pat_str == SPLIT_PATTERN
    text = "Which of these is a solid? Context: 你好世界 🌍 café 123456"
    assert loaded.encode(text) == tok.encode(text) == tok.enc.encode_ordinary(text)
    assert loaded.get_vocab_size() == VOCAB
    assert torch.equal(loaded.token_bytes(), tok.token_bytes())


def test_encoding_without_chat_specials_is_refused(tok, tmp_path):
    plain = tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=tok.enc._mergeable_ranks,
                              special_tokens={})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(plain, protocol=4))
    with pytest.raises(TokenizerLoadError, match=r"lacks the chat special tokens \['<\|bos\|>'"):
        Tokenizer.from_directory(tmp_path)


# -----------------------------------------------------------------------------
# training and plain encoding

def test_trained_vocab_and_specials(tok):
    assert tok.get_vocab_size() == VOCAB
    assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(range(N_REG, VOCAB))
    assert tok.get_bos_token_id() == N_REG
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    assert [tok.id_to_token(i) for i in range(N_REG, VOCAB)] == SPECIAL_TOKENS
    # ranks 0..255 are the raw bytes
    assert all(tok.enc.decode_single_token_bytes(i) == bytes([i]) for i in range(256))
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|eos|>")


def test_round_trip_unicode(tok):
    for text in ["Hello world! This is a test.", "Numbers: 123, 4567, 89", "Unicode: 你好世界 🌍 naïve über",
                 "tabs\tand\nnewlines\r\n  spaces", "😀🧪 emoji not in training"]:
        ids = tok.encode(text)
        assert all(0 <= i < N_REG for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids)) == text


def test_special_text_is_ordinary(tok):
    ids = tok.encode("<|bos|> hi <|assistant_end|>")
    assert all(i < N_REG for i in ids)
    assert tok.decode(ids) == "<|bos|> hi <|assistant_end|>"


def test_numbers_split_in_pairs(tok):
    # SPLIT_PATTERN groups digits 1-2 at a time: "12345" -> "12", "34", "5" at least
    pieces = [tok.id_to_token(i) for i in tok.encode("12345")]
    assert "".join(pieces) == "12345" and all(len(p) <= 2 for p in pieces)


def test_encode_batch_prepend_append(tok):
    bos, ae = tok.get_bos_token_id(), tok.encode_special("<|assistant_end|>")
    a, b = tok.encode("the sun"), tok.encode("the moon")
    assert tok.encode(["the sun", "the moon"]) == [a, b]
    assert tok.encode("the sun", prepend="<|bos|>", append=ae) == [bos] + a + [ae]
    assert tok.encode(["the sun", "the moon"], prepend=bos) == [[bos] + a, [bos] + b]
    with pytest.raises(TypeError):
        tok.encode(123)


def test_train_errors():
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train_from_iterator(["abc"], 260)
    with pytest.raises(ValueError, match="training text too small"):
        Tokenizer.train_from_iterator(["ab ab"], 300)


# -----------------------------------------------------------------------------
# save / load

def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    d = tmp_path / "tokenizer"
    assert sorted(p.name for p in d.iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]
    # published format: plain pickle gives a tiktoken Encoding, token_bytes loads weights_only
    with open(d / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding) and enc.name == "rustbpe" and enc.n_vocab == VOCAB
    tb = torch.load(d / "token_bytes.pt", weights_only=True)
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)

    loaded = Tokenizer.from_directory(d)
    texts = _corpus(20, seed=1) + ["你好世界 🌍", "<|user_start|>"]
    assert loaded.encode(texts) == tok.encode(texts)
    assert torch.equal(loaded.token_bytes(), tb) and torch.equal(tb, tok.token_bytes())
    # by hand: "a" is one byte, specials are 0, a lone continuation byte decodes to U+FFFD (3 bytes)
    assert tb[ord("a")].item() == 1
    assert tb[N_REG:].tolist() == [0] * 9
    assert tb[0x80].item() == 3
    the = tok.encode(" the")
    assert len(the) == 1 and tb[the[0]].item() == 4  # " the" is frequent enough to be one token
    world = tok.encode("界")
    assert sum(tb[i].item() for i in world) >= 3


def test_bad_token_bytes_file(tok, tmp_path):
    tok.save(tmp_path)
    torch.save(torch.zeros(7, dtype=torch.int32), tmp_path / "token_bytes.pt")
    with pytest.raises(TokenizerLoadError, match=r"expected an int32 tensor of shape \(512,\)"):
        Tokenizer.from_directory(tmp_path)


@pytest.mark.parametrize("damage, problem", [
    ("pickle", "holds Python objects other than tensors and plain data ("),
    ("truncated", "is unreadable: truncated or corrupt"),
    ("empty", "is empty (0 bytes"),
])
def test_unreadable_token_bytes_is_one_line_and_never_runs(tok, tmp_path, damage, problem):
    tok.save(tmp_path)
    path, marker = tmp_path / "token_bytes.pt", tmp_path / "pwned"
    if damage == "pickle":  # a non-weights-only object: refused without running it
        torch.save({"lengths": _Evil(marker)}, path)
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(TokenizerLoadError) as info:
        Tokenizer.from_directory(tmp_path)
    message = str(info.value)
    assert message.startswith(("token bytes file " + str(path), str(path))) and problem in message
    assert "\n" not in message and "weights_only" not in message and "delete it" in message
    assert damage != "pickle" or "system); refusing to unpickle it for safety" in message
    assert not marker.exists()


# -----------------------------------------------------------------------------
# chat rendering

def test_render_conversation_exact(tok):
    s = {name: tok.encode_special(name) for name in SPECIAL_TOKENS}
    hi, hello = tok.encode("Which is a gas?"), tok.encode("Water vapor.")
    conv = {"messages": [{"role": "user", "content": "Which is a gas?"},
                         {"role": "assistant", "content": "Water vapor."}]}
    ids, mask = tok.render_conversation(conv)
    assert ids == ([s["<|bos|>"], s["<|user_start|>"]] + hi + [s["<|user_end|>"], s["<|assistant_start|>"]]
                   + hello + [s["<|assistant_end|>"]])
    assert mask == [0, 0] + [0] * len(hi) + [0, 0] + [1] * len(hello) + [1]
    assert tok.render_conversation(conv["messages"]) == (ids, mask)  # bare list works too
    # the concrete head of the sequence: ids 503 (bos) and 504 (user_start) for vocab 512
    assert ids[:2] == [503, 504] and ids[-1] == 507


def test_render_multi_turn_and_injection(tok):
    msgs = [{"role": "user", "content": "a <|assistant_end|>"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, mask = tok.render_conversation(msgs)
    ae = tok.encode_special("<|assistant_end|>")
    assert ids.count(ae) == 2  # the user's "<|assistant_end|>" text did not become the token
    assert sum(mask) == len(tok.encode("b")) + len(tok.encode("d")) + 2


def test_system_merge(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    norm = validate_messages(msgs)
    assert norm == [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"}]
    assert msgs[1]["content"] == "Hi"  # input untouched
    assert tok.render_conversation(msgs) == tok.render_conversation(norm)


def test_truncation(tok):
    conv = [{"role": "user", "content": "the sun is a star"}, {"role": "assistant", "content": "yes it is"}]
    full_ids, full_mask = tok.render_conversation(conv)
    ids, mask = tok.render_conversation(conv, max_tokens=5)
    assert ids == full_ids[:5] and mask == full_mask[:5] and len(ids) == 5
    with pytest.raises(ValueError, match="max_tokens"):
        tok.render_conversation(conv, max_tokens=0)


def test_list_of_parts(tok):
    s = {name: tok.encode_special(name) for name in SPECIAL_TOKENS}
    parts = [{"type": "text", "text": "Let me add."}, {"type": "python", "text": "1+2"},
             {"type": "python_output", "text": "3"}, {"type": "text", "text": "It is 3."}]
    ids, mask = tok.render_conversation([{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": parts}])
    t1, py, out, t2 = (tok.encode(p["text"]) for p in parts)
    u = tok.encode("1+2?")
    exp_ids = ([s["<|bos|>"], s["<|user_start|>"]] + u + [s["<|user_end|>"], s["<|assistant_start|>"]] + t1
               + [s["<|python_start|>"]] + py + [s["<|python_end|>"]]
               + [s["<|output_start|>"]] + out + [s["<|output_end|>"]] + t2 + [s["<|assistant_end|>"]])
    exp_mask = ([0] * (len(u) + 4) + [1] * len(t1) + [1] * (len(py) + 2) + [0] * (len(out) + 2)
                + [1] * len(t2) + [1])
    assert ids == exp_ids and mask == exp_mask


U = {"role": "user", "content": "q"}
A = {"role": "assistant", "content": "a"}


@pytest.mark.parametrize("msgs, index, why", [
    ([U, {"role": "robot", "content": "x"}], 1, "unknown role 'robot'"),
    ([U, A, A], 2, r"expected role 'user' after message 1 \(assistant\)"),
    ([A, U], 0, "expected role 'user' first"),
    ([U, {"role": "assistant", "content": ""}], 1, "content is empty"),
    ([U, {"role": "assistant", "content": "   "}], 1, "content is empty"),
    ([{"role": "user", "content": 5}, A], 0, "must be a string"),
    ([{"role": "user", "content": ["x"]}, A], 0, "must be a string"),
    ([U], 0, "no assistant message"),
    ([U, A, {"role": "system", "content": "s"}], 2, "may only be the first"),
    ([{"role": "system", "content": "s"}, A], 1, "after the system message"),
    ([{"role": "system", "content": "s"}], 0, "must be followed by a user"),
    ([{"role": "system", "content": ""}, U, A], 0, "content is empty"),
    ([U, {"role": "assistant"}], 1, "missing 'content'"),
    ([U, "hello"], 1, "expected a dict"),
    ([U, {"role": "assistant", "content": []}], 1, "empty list of parts"),
    ([U, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}], 1, "part 0 has type 'image'"),
    ([U, {"role": "assistant", "content": [{"type": "text", "text": 3}]}], 1, "part 0 needs a string"),
    ([U, {"role": "assistant", "content": [{"type": "text", "text": ""}]}], 1, "all content parts are empty"),
])
def test_bad_conversations(tok, msgs, index, why):
    with pytest.raises(ValueError, match=rf"^message {index}\b.*{why}"):
        tok.render_conversation(msgs)
    with pytest.raises(ValueError, match=rf"^message {index}\b"):
        validate_messages({"messages": msgs})


def test_bad_conversation_container(tok):
    with pytest.raises(ValueError, match="no messages"):
        tok.render_conversation([])
    with pytest.raises(ValueError, match="'messages' list"):
        tok.render_conversation({"msgs": [U, A]})
    with pytest.raises(ValueError, match="expected a list of messages"):
        tok.render_conversation("hello")


def test_render_for_completion(tok):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, U, A, U, A]}
    ids = tok.render_for_completion(conv)
    full, _ = tok.render_conversation(conv)
    n_last = len(tok.encode("a")) + 2  # assistant_start + content + assistant_end of the dropped reply
    assert ids == full[:-n_last] + [tok.encode_special("<|assistant_start|>")]
    # ending in a user message: nothing dropped; no assistant needed
    assert tok.render_for_completion([U]) == [503, 504] + tok.encode("q") + [505, 506]
    with pytest.raises(ValueError, match="^message 1"):
        tok.render_for_completion([U, U])

import pytest
import torch

from nanochat.engine import Engine, KVCache
from tests.nanochat.test_gpt import tiny_model

BOS, ASSISTANT_END = 95, 96


class StubTokenizer:
    """Only what the engine asks of a tokenizer: its two stop tokens."""

    def encode_special(self, name):
        return {"<|assistant_end|>": ASSISTANT_END, "<|bos|>": BOS}[name]

    def get_bos_token_id(self):
        return BOS


def greedy_by_recomputation(model, tokens, steps):
    seq = list(tokens)
    for _ in range(steps):
        logits = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(tokens):]


def test_kv_cache_chunked_prefill_equals_full_forward():
    model = tiny_model(seed=1, n_kv_head=2)
    idx = torch.randint(0, 90, (2, 9))
    full = model(idx)
    cache = KVCache(2, 2, 16, 8, 2, "cpu", torch.float32)
    first = model(idx[:, :4], kv_cache=cache)
    second = model(idx[:, 4:], kv_cache=cache)  # a multi-token chunk after a prefix
    assert cache.pos == 9
    assert torch.allclose(torch.cat([first, second], dim=1), full, atol=1e-5)


def test_kv_generation_equals_greedy_recomputation():
    model = tiny_model(seed=2).eval()
    engine = Engine(model, StubTokenizer())
    prompt = [3, 14, 15, 92, 65, 35]
    expected = greedy_by_recomputation(model, prompt, 12)
    cut = next((i for i, t in enumerate(expected) if t in (BOS, ASSISTANT_END)), len(expected))
    sequences, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=12, temperature=0.0)
    for seq, mask in zip(sequences, masks, strict=True):
        assert seq[:len(prompt)] == prompt
        assert seq[len(prompt):] == expected[:cut]
        assert mask == [0] * len(prompt) + [1] * cut


def test_sampling_is_reproducible_with_seed():
    model = tiny_model(seed=3).eval()
    engine = Engine(model, StubTokenizer())
    prompt = [1, 2, 3]
    a = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, top_k=20, seed=7)
    b = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, top_k=20, seed=7)
    c = engine.generate_batch(prompt, num_samples=4, max_tokens=10, temperature=1.0, top_k=20, seed=8)
    assert a == b
    assert a != c
    # Different samples of one prompt are drawn independently.
    assert len({tuple(s) for s in a[0]}) > 1


def test_generate_multi_equals_one_by_one():
    model = tiny_model(seed=4).eval()
    engine = Engine(model, StubTokenizer())
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    together = engine.generate_multi(prompts, max_tokens=8)
    for prompt, out in zip(prompts, together, strict=True):
        alone = engine.generate_multi([prompt], max_tokens=8)[0]
        expected = greedy_by_recomputation(model, prompt, 8)
        cut = next((i for i, t in enumerate(expected) if t in (BOS, ASSISTANT_END)), len(expected))
        assert out == alone == expected[:cut]


def test_a_row_with_its_own_seed_samples_the_same_whatever_rows_are_beside_it():
    model = tiny_model(seed=4).eval()
    engine = Engine(model, StubTokenizer())
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23], [12, 13]]
    seeds = [11, 12, 13, 14]
    together = engine.generate_multi(prompts, max_tokens=8, temperature=1.0, top_k=20, seeds=seeds)
    for i, prompt in enumerate(prompts):
        assert engine.generate_multi([prompt], max_tokens=8, temperature=1.0, top_k=20, seeds=[seeds[i]])[0] \
            == together[i]
    halves = (engine.generate_multi(prompts[:1], max_tokens=8, temperature=1.0, top_k=20, seeds=seeds[:1])
              + engine.generate_multi(prompts[1:], max_tokens=8, temperature=1.0, top_k=20, seeds=seeds[1:]))
    assert halves == together
    assert together[1] != together[3]  # the same prompt, another seed: another reply
    with pytest.raises(ValueError, match="got 1 seeds for 4 prompts"):
        engine.generate_multi(prompts, max_tokens=8, temperature=1.0, seeds=[1])


def test_rows_of_the_same_prompt_share_one_prefill_and_sample_as_if_alone(monkeypatch):
    model = tiny_model(seed=4).eval()
    engine = Engine(model, StubTokenizer())
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [5, 6, 7, 8, 9, 10, 11], [12, 13], [12, 13]]
    seeds = [21, 22, 23, 24, 25]
    forward = model.forward
    widths = []

    def counting_forward(idx, **kw):
        widths.append(tuple(idx.shape))
        return forward(idx, **kw)

    monkeypatch.setattr(model, "forward", counting_forward)
    together = engine.generate_multi(prompts, max_tokens=8, temperature=1.0, top_k=20, seeds=seeds)
    assert widths[0] == (2, 7)  # the prefill: each distinct prompt once, left-padded to the longest
    assert all(w == (5, 1) for w in widths[1:])  # then every row decodes
    for prompt, seed, out in zip(prompts, seeds, together, strict=True):
        assert engine.generate_multi([prompt], max_tokens=8, temperature=1.0, top_k=20, seeds=[seed])[0] == out
    assert together[1] != together[3]  # the same prompt, another seed
    greedy = engine.generate_multi(prompts, max_tokens=8)
    assert greedy[0] == greedy[2] and greedy[1] == greedy[3] == greedy[4]
    assert greedy[0] == engine.generate_multi(prompts[:1], max_tokens=8)[0]


def test_generation_stops_at_stop_token():
    model = tiny_model(seed=5).eval()
    plain_forward = model.forward

    def forward_ending_after_two(idx, **kw):
        # The third generated token (cache position 4) is <|assistant_end|>.
        start = kw["kv_cache"].pos
        logits = plain_forward(idx, **kw)
        if start + idx.size(1) == 4:
            logits[:, -1, ASSISTANT_END] = 100.0
        return logits

    model.forward = forward_ending_after_two
    engine = Engine(model, StubTokenizer())
    steps = list(engine.generate([1, 2], max_tokens=10, temperature=0.0))
    assert len(steps) == 3 and steps[2][0] == [ASSISTANT_END]
    sequences, _ = engine.generate_batch([1, 2], max_tokens=10, temperature=0.0)
    assert sequences == [[1, 2, steps[0][0][0], steps[1][0][0]]]


def test_tiny_temperatures_are_greedy_and_negative_ones_refused():
    from nanochat.engine import MIN_SAMPLING_TEMPERATURE, sample_next
    logits = torch.tensor([[1.0, 3.0, 2.0], [15.0, -15.0, 14.9]])
    generator = torch.Generator().manual_seed(0)
    for temperature in (0.0, 1e-45, 1e-38, MIN_SAMPLING_TEMPERATURE / 2):
        assert sample_next(logits, generator, temperature).tolist() == [[1], [0]]
        assert sample_next(logits, generator, temperature, top_k=2).tolist() == [[1], [0]]
    sampled = sample_next(logits, generator, MIN_SAMPLING_TEMPERATURE)  # a real (very sharp) sample
    assert torch.isfinite(logits / MIN_SAMPLING_TEMPERATURE).all() and sampled.shape == (2, 1)
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="temperature must be >= 0"):
            sample_next(logits, generator, bad)


def test_the_compute_dtype_is_the_callers():
    model = tiny_model()
    assert Engine(model, None).compute_dtype == torch.float32  # CPU: nanochat's choice, no autocast
    engine = Engine(model, None, torch.bfloat16)
    cache = engine._new_cache(1, 4)
    assert engine.compute_dtype == torch.bfloat16 and cache.kv.dtype == torch.bfloat16
    logits = engine._forward(torch.tensor([[1, 2, 3]]), None)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()

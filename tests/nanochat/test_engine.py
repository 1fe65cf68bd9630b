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
    # then the rows decode, each until its reply ends (a row that drew the stop token at step s leaves)
    assert widths[1:] == [(sum(len(out) > step for out in together), 1) for step in range(len(widths) - 1)]
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


@pytest.mark.parametrize("top_k", [None, 20])
def test_seeded_rows_sample_what_torch_multinomial_draws_row_by_row(top_k):
    """Rows that end early leave the batch and the draws are batched; every row's reply is still
    what decoding it alone with torch.multinomial and its seed gives (generate_batch, one sample)."""
    model = tiny_model(seed=7).eval()
    with torch.no_grad():  # make the stop token likely enough that replies end at many different steps
        winners = model(torch.randint(0, 90, (4, 12), generator=torch.Generator().manual_seed(5))).argmax(-1)
        model.lm_head.weight[ASSISTANT_END] = model.lm_head.weight[winners.flatten()].mean(0) * 2
    engine = Engine(model, StubTokenizer())
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (3, 9, 5)]
    rows = [p for p in prompts for _ in range(6)]
    seeds = torch.randint(0, 2**62, (len(rows),), generator=g).tolist()
    together = engine.generate_multi(rows, max_tokens=12, temperature=1.0, top_k=top_k, seeds=seeds)
    lengths = {len(out) for out in together}
    assert len(lengths) >= 4 and 12 in lengths  # replies of many lengths, some cut at the limit
    for prompt, seed, out in zip(rows, seeds, together, strict=True):
        alone, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=12, temperature=1.0, top_k=top_k, seed=seed)
        assert alone[0][len(prompt):] == out


def test_the_batched_draw_is_torch_multinomials():
    from nanochat.engine import _draw
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(16, 50, generator=g) * 3, dim=-1)
    seeds = torch.randint(0, 2**62, (16,), generator=g).tolist()
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    reference = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(20):
        expected = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=r) for i, r in enumerate(reference)])
        assert torch.equal(_draw(probs, generators), expected)


def test_keep_rows_moves_the_kept_rows_to_the_front_in_place():
    cache = KVCache(4, 2, 6, 3, 2, "cpu", torch.float32)
    cache.kv.copy_(torch.randn_like(cache.kv))
    cache.insert_doc_ids(torch.arange(4 * 5).view(4, 5))
    cache.advance(5)
    before, storage = cache.kv.clone(), cache.kv.untyped_storage().data_ptr()
    cache.keep_rows([1, 3])
    assert cache.kv.shape[2] == 2 and cache.kv.untyped_storage().data_ptr() == storage
    assert torch.equal(cache.kv[..., :5, :], before[:, :, [1, 3], :, :5])
    assert cache.doc_ids.tolist() == [[5, 6, 7, 8, 9, 0], [15, 16, 17, 18, 19, 0]]

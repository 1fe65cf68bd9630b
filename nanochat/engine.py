"""
Generation with a KV cache: the prompt is run once (prefill), then one token per step.

- Engine.generate streams token columns for num_samples continuations of one prompt.
- Engine.generate_batch collects them into finished sequences.
- Engine.generate_multi decodes many prompts of different lengths together: prompts are
  left-padded, and the padding gets its own document id so real tokens never attend to it
  and rotary positions start at 0 at each prompt's first real token; a prompt given for
  several rows is prefilled once, and a row whose reply ended stops being decoded (when no other
  row's draws depend on it). The result equals decoding each prompt alone.
"""

import torch


class KVCache:
    """Keys and values of every layer: (n_layer, 2, B, n_kv_head, T_max, head_dim)."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        self.kv = torch.zeros(num_layers, 2, batch_size, num_heads, seq_len, head_dim, device=device, dtype=dtype)
        self.num_layers = num_layers
        self.pos = 0  # number of positions already cached
        self.doc_ids = None  # (B, T_max) once forward() is called with doc_ids

    @property
    def max_len(self):
        return self.kv.size(4)

    def insert_kv(self, layer_idx, k, v):
        """Store this step's keys/values of one layer; return everything cached so far."""
        T = k.size(2)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.kv[layer_idx, 0, :, :, self.pos:end] = k
        self.kv[layer_idx, 1, :, :, self.pos:end] = v
        return self.kv[layer_idx, 0, :, :, :end], self.kv[layer_idx, 1, :, :, :end]

    def insert_doc_ids(self, doc_ids):
        if self.doc_ids is None:
            if self.pos > 0:
                raise ValueError("this KV cache was filled without doc_ids; cannot add them later")
            self.doc_ids = torch.zeros(doc_ids.size(0), self.max_len, dtype=doc_ids.dtype, device=doc_ids.device)
        end = self.pos + doc_ids.size(1)
        self.doc_ids[:, self.pos:end] = doc_ids
        return self.doc_ids[:, :end]

    def advance(self, T):
        self.pos += T

    def keep_rows(self, rows):
        """Keep only `rows` (increasing batch indices), moved to the front in place: the cache
        then holds len(rows) rows. Row by row, so no second buffer is allocated."""
        for dst, src in enumerate(rows):
            if dst != src:
                self.kv[:, :, dst, :, :self.pos].copy_(self.kv[:, :, src, :, :self.pos])
                if self.doc_ids is not None:
                    self.doc_ids[dst, :self.pos].copy_(self.doc_ids[src, :self.pos])
        self.kv = self.kv[:, :, :len(rows)]
        if self.doc_ids is not None:
            self.doc_ids = self.doc_ids[:len(rows)]


# Below this temperature sampling is greedy: it is the limit of sampling as the temperature
# goes to 0, and dividing by a tinier one overflows (15 / 1e-38 is beyond float32).
MIN_SAMPLING_TEMPERATURE = 1e-3


def sample_next(logits, generator, temperature=1.0, top_k=None):
    """logits (B, V) -> (B, 1). Temperatures below MIN_SAMPLING_TEMPERATURE (0 included) are greedy.
    generator: one torch.Generator for the batch, or a list of B, row i drawing from the i-th."""
    if not temperature >= 0:  # negative or NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if temperature < MIN_SAMPLING_TEMPERATURE:
        return logits.argmax(dim=-1, keepdim=True)
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        probs = torch.softmax(values / temperature, dim=-1)
        return indices.gather(-1, _draw(probs, generator))
    probs = torch.softmax(logits / temperature, dim=-1)
    return _draw(probs, generator)


def _draw(probs, generator):
    """One index per row of probs (B, V) -> (B, 1), from one generator or one per row.
    torch.multinomial draws one sample as argmax(p / E) with E ~ Exp(1) drawn for the row
    (empty_like(p).exponential_(1, generator)); with a generator per row only E is drawn row by
    row, the rest is batched: the same indices as torch.multinomial row by row (a test keeps
    this true) at a fraction of the cost."""
    if isinstance(generator, (list, tuple)):
        noise = torch.empty_like(probs)
        for row, g in zip(noise, generator, strict=True):
            row.exponential_(1, generator=g)
        return (probs / noise).argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs, 1, generator=generator)


class Engine:
    def __init__(self, model, tokenizer, compute_dtype=None):
        """compute_dtype: the autocast dtype of forward passes (and of the KV cache); None:
        nanochat's choice, bf16 on CUDA and fp32 elsewhere. torch.float32 turns autocast off."""
        self.model = model
        self.tokenizer = tokenizer
        device = model.get_device()
        if compute_dtype is None:
            compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.compute_dtype = compute_dtype

    def _new_cache(self, batch_size, seq_len):
        c = self.model.config
        device = self.model.get_device()
        head_dim = c.n_embd // c.n_head
        return KVCache(batch_size, c.n_kv_head, seq_len, head_dim, c.n_layer, device, self.compute_dtype)

    def _stop_ids(self):
        return {self.tokenizer.encode_special("<|assistant_end|>"), self.tokenizer.get_bos_token_id()}

    def _forward(self, ids, kv_cache, doc_ids=None):
        device = self.model.get_device()
        reduced = self.compute_dtype != torch.float32
        with torch.autocast(device.type, dtype=self.compute_dtype if reduced else torch.bfloat16, enabled=reduced):
            logits = self.model(ids, kv_cache=kv_cache, doc_ids=doc_ids)
        return logits[:, -1, :].float()

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Yield (token_column, mask_column) per step: one token per sample (mask 1 = sampled).
        A finished sample keeps yielding its stop token until all are done, then it stops."""
        if not tokens:
            raise ValueError("generate() needs a non-empty prompt")
        device = self.model.get_device()
        limit = self.model.rotary_seq_len
        max_tokens = max_tokens if max_tokens is not None else limit - len(tokens)
        max_tokens = min(max_tokens, limit - len(tokens))
        if max_tokens <= 0:
            return
        generator = torch.Generator(device=device).manual_seed(seed)
        stop_ids = self._stop_ids()
        # Prefill once with batch 1, then share the prefix with every sample.
        prefill = self._new_cache(1, len(tokens) + max_tokens)
        logits = self._forward(torch.tensor([tokens], dtype=torch.long, device=device), prefill)
        cache = self._new_cache(num_samples, len(tokens) + max_tokens)
        cache.kv[:, :, :, :, :len(tokens)] = prefill.kv[:, :, :, :, :len(tokens)]
        cache.pos = prefill.pos
        del prefill
        logits = logits.expand(num_samples, -1)
        done = [False] * num_samples
        for step in range(max_tokens):
            next_ids = sample_next(logits, generator, temperature, top_k)
            column = next_ids[:, 0].tolist()
            yield column, [1] * num_samples
            for i, t in enumerate(column):
                done[i] = done[i] or t in stop_ids
            if all(done) or step == max_tokens - 1:
                return
            logits = self._forward(next_ids, cache)

    def generate_batch(self, tokens, num_samples=1, **kwargs):
        """Return (sequences, masks): each the prompt followed by its generated tokens, up to
        and excluding the stop token."""
        stop_ids = self._stop_ids()
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        finished = [False] * num_samples
        for column, mask_column in self.generate(tokens, num_samples=num_samples, **kwargs):
            for i, (t, m) in enumerate(zip(column, mask_column, strict=True)):
                if finished[i]:
                    continue
                if t in stop_ids:
                    finished[i] = True
                    continue
                sequences[i].append(t)
                masks[i].append(m)
            if all(finished):
                break
        return sequences, masks

    @torch.inference_mode()
    def generate_multi(self, prompts, max_tokens=256, temperature=0.0, top_k=None, seed=42, seeds=None):
        """Continue many prompts of different lengths at once. Returns the generated tokens of
        each prompt (stop token excluded). seeds: one per prompt, each row sampling from its own
        generator (then `seed` is not used); else one generator seeded with `seed` for all rows."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate_multi() needs non-empty prompts")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"generate_multi() got {len(seeds)} seeds for {len(prompts)} prompts")
        device = self.model.get_device()
        B, longest = len(prompts), max(len(p) for p in prompts)
        max_tokens = min(max_tokens, self.model.rotary_seq_len - longest)
        if max_tokens <= 0:
            return [[] for _ in prompts]
        # Rows that continue the same prompt (the replies of one RL question) share its prefill:
        # each distinct prompt is run once, and its keys and values are copied to its rows.
        distinct = {}
        source = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        pad_id = self.tokenizer.get_bos_token_id()
        ids = torch.full((len(distinct), longest), pad_id, dtype=torch.long)
        doc_ids = torch.full((len(distinct), longest), -1, dtype=torch.long)
        for i, p in enumerate(distinct):
            ids[i, longest - len(p):] = torch.tensor(p)
            doc_ids[i, longest - len(p):] = 0
        ids, doc_ids = ids.to(device), doc_ids.to(device)
        cache = self._new_cache(B, longest + max_tokens)
        generator = (torch.Generator(device=device).manual_seed(seed) if seeds is None else
                     [torch.Generator(device=device).manual_seed(int(s)) for s in seeds])
        stop_ids = self._stop_ids()
        if len(distinct) == B:
            logits = self._forward(ids, cache, doc_ids)
        else:
            prefill = self._new_cache(len(distinct), longest)
            logits = self._forward(ids, prefill, doc_ids)
            rows = torch.tensor(source, device=device)
            cache.kv[:, :, :, :, :longest] = prefill.kv[:, :, rows]
            cache.insert_doc_ids(prefill.doc_ids[rows])
            cache.advance(longest)
            logits = logits[rows]
            del prefill
        # A row whose reply ended leaves the batch (its cache row too) when the other rows' draws do
        # not depend on it: each row has its own generator, or decoding is greedy. One generator
        # shared by the rows draws for the batch as a whole, so then every row decodes to the end.
        drop_finished = seeds is not None or temperature < MIN_SAMPLING_TEMPERATURE
        active = list(range(B))  # the prompts of the batch's rows, in order
        step_doc_ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        outputs = [[] for _ in prompts]
        finished = [False] * B
        for step in range(max_tokens):
            rows_generator = [generator[i] for i in active] if seeds is not None else generator
            next_ids = sample_next(logits, rows_generator, temperature, top_k)
            for i, t in zip(active, next_ids[:, 0].tolist(), strict=True):
                if finished[i]:
                    continue
                if t in stop_ids:
                    finished[i] = True
                else:
                    outputs[i].append(t)
            if all(finished) or step == max_tokens - 1:
                break
            if drop_finished and any(finished[i] for i in active):
                keep = [row for row, i in enumerate(active) if not finished[i]]
                cache.keep_rows(keep)
                next_ids, active = next_ids[keep], [active[row] for row in keep]
            logits = self._forward(next_ids, cache, step_doc_ids[:len(active)])
        return outputs

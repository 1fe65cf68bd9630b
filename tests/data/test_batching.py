import copy
import math
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from sciassist.data.batching import (
    ROW_MULTIPLE,
    arrange_step,
    balanced_row_len,
    collate,
    epoch_order,
    pack_rows,
    step_batches,
    step_examples,
    steps_per_epoch,
    tokenize_conversations,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def conv(question, answer, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


CONVERSATIONS = [
    conv("Which of these states is farthest north?", "The correct answer is A. Maine.",
         system="You are a science tutor."),
    conv("What is 12 + 30?", "42"),
    conv("Select the living thing. Options: rock, tree, cloud.", "The correct answer is B. A tree is alive: it grows."),
    conv("Hello, how are you today?", "I'm fine, thanks. Let's learn about the solar system."),
    conv("Water freezes at what temperature?", "0 degrees Celsius."),
    conv("Which word would you find on a dictionary page?", "The correct answer is C."),
    conv("What is the capital of France?", "Paris is the capital."),
]


@pytest.fixture(scope="module")
def dataset(tiny_tokenizer):
    return tokenize_conversations(tiny_tokenizer, CONVERSATIONS, max_seq_len=64)


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    m = GPT(GPTConfig(sequence_len=128, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                      n_kv_head=2, n_embd=32))
    m.init_weights()
    with torch.no_grad():  # zero-initialised projections would hide attention leaks
        for block in m.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.3)
            block.mlp.c_proj.weight.normal_(0, 0.3)
        m.lm_head.weight.normal_(0, 0.3)
    return m


def pad_id(tok):
    return tok.encode_special("<|assistant_end|>")


# --- tokenisation

def test_mask_covers_assistant_content_and_end_only(tiny_tokenizer, dataset):
    tok = tiny_tokenizer
    ids, mask = dataset.ids[0], dataset.masks[0]
    assert (ids, mask) == tuple(map(list, tok.render_conversation(CONVERSATIONS[0])))
    supervised = [t for t, m in zip(ids, mask, strict=True) if m]
    assert supervised[-1] == tok.encode_special("<|assistant_end|>")
    assert tok.decode(supervised[:-1]) == "The correct answer is A. Maine."
    # everything before <|assistant_start|> (system, user, specials) is never a target
    start = ids.index(tok.encode_special("<|assistant_start|>"))
    assert not any(mask[:start + 1])
    assert dataset.supervised[0] == len(supervised)
    assert dataset.lengths[0] == len(ids) - 1
    assert dataset.num_truncated == 0 and dataset.num_dropped == 0


def test_truncation_is_counted_and_unsupervised_leftovers_dropped(tiny_tokenizer):
    long_answer = conv("Hi", "plants need sunlight to make food " * 10)
    long_question = conv("a magnet attracts iron and steel " * 10, "yes")
    ds = tokenize_conversations(tiny_tokenizer, [long_answer, long_question, CONVERSATIONS[1]], max_seq_len=20)
    full = len(tiny_tokenizer.render_conversation(long_answer, max_tokens=10**6)[0])
    assert ds.num_truncated == 2
    assert ds.num_truncated_tokens > full - 21
    # the long question leaves no assistant token inside the limit: dropped, not trained on
    assert ds.num_dropped == 1 and ds.record_indices == [0, 2]
    assert ds.lengths[0] == 20 and len(ds.ids[0]) == 21
    assert "2 truncated to max_seq_len=20" in ds.describe() and "1 dropped" in ds.describe()


def test_bad_conversation_names_its_index(tiny_tokenizer):
    with pytest.raises(ValueError, match="conversation 1"):
        tokenize_conversations(tiny_tokenizer, [CONVERSATIONS[0], {"messages": [{"role": "user", "content": "x"}]}], 32)
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_conversations(tiny_tokenizer, CONVERSATIONS, 1)


# --- packing

def test_pack_rows_best_fit():
    lengths = [50, 30, 20, 70, 10, 60]
    rows = pack_rows(lengths, 100)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 100 for row in rows)
    assert len(rows) == math.ceil(sum(lengths) / 100)  # 240 positions fit in 3 rows exactly here
    with pytest.raises(ValueError, match="more than a row"):
        pack_rows([101], 100)


def test_balanced_row_len_spreads_the_slack():
    lengths = [100] * 9  # rows of 400: 4 + 4 + 1 conversations, the last row 3/4 empty
    assert [len(r) for r in pack_rows(lengths, 400)] == [4, 4, 1]
    assert balanced_row_len(lengths, 3, 400) == 320  # 3 + 3 + 3 in rows of 320
    assert balanced_row_len([100] * 9, 9, 400) == 128  # never narrower than the longest item
    lengths = [60] * 10  # 600 positions in 2 rows of 512 -> 2 rows of 320 (5 x 60 = 300)
    assert balanced_row_len(lengths, 2, 512) == 320
    assert balanced_row_len([500], 1, 500) == 500  # never above the limit


def test_collate_packed_targets_layout_and_padding(tiny_tokenizer, dataset):
    rows = [[0, 1], [2]]
    n0, n1, n2 = dataset.lengths[0], dataset.lengths[1], dataset.lengths[2]
    T = n0 + n1 + 5
    b = collate(dataset, rows, pad_id(tiny_tokenizer), row_len=T)
    assert b["inputs"].shape == (2, T)
    # The layout comes from the plan's rows, on the host: each conversation and each row's
    # padding is a segment; positions restart at 0 in each.
    layout = b["layout"]
    assert layout.cu_seqlens.tolist() == [0, n0, n0 + n1, T, T + n2, 2 * T] and layout.max_seqlen == max(n0, n1, n2, 5)
    assert layout.positions[0].tolist() == list(range(n0)) + list(range(n1)) + list(range(5))
    assert layout.positions[1].tolist() == list(range(n2)) + list(range(T - n2))
    flat_targets = b["targets"].reshape(-1)
    assert torch.equal(b["supervised_index"], (flat_targets != -1).nonzero().squeeze(1))
    # inputs are ids[:-1] back to back; targets ids[1:] where supervised, else -1
    assert b["inputs"][0, :n0 + n1].tolist() == dataset.ids[0][:-1] + dataset.ids[1][:-1]
    expect0 = [t if m else -1 for t, m in zip(dataset.ids[0][1:], dataset.masks[0][1:], strict=True)]
    assert b["targets"][0, :n0].tolist() == expect0
    # the last position of conversation 0 predicts its own <|assistant_end|>, never the next <|bos|>
    assert b["targets"][0, n0 - 1].item() == tiny_tokenizer.encode_special("<|assistant_end|>")
    assert (b["targets"][0, n0 + n1:] == -1).all() and (b["targets"][1, n2:] == -1).all()
    assert b["num_supervised"] == dataset.supervised[0] + dataset.supervised[1] + dataset.supervised[2]
    assert b["num_tokens"] == n0 + n1 + n2 and b["num_positions"] == 2 * T
    # without row_len: as wide as the longest row; single-doc rows need no doc_ids (causal is exact)
    assert collate(dataset, rows, 0)["inputs"].shape == (2, n0 + n1)
    assert collate(dataset, [[0], [2]], 0)["layout"] is None
    with pytest.raises(ValueError, match="more than row_len"):
        collate(dataset, rows, 0, row_len=n0)


def test_plan_packs_rows_to_a_budget_of_positions(dataset):
    examples = list(range(len(dataset)))
    plan = arrange_step(dataset, examples, device_batch_size=1)
    assert plan.row_len % ROW_MULTIPLE == 0 or plan.row_len == dataset.max_seq_len
    rows = [row for mb in plan.micro_batches for row in mb]
    assert all(sum(dataset.lengths[i] for i in row) <= plan.row_len for row in rows)
    # 1 row of max_seq_len positions per micro-batch = max_seq_len // row_len rows of row_len
    per_micro = max(1, dataset.max_seq_len // plan.row_len)
    assert all(len(mb) <= per_micro for mb in plan.micro_batches) and len(plan.micro_batches[0]) == per_micro
    narrow = arrange_step(dataset, examples, device_batch_size=1, pack_len=16)
    assert narrow.row_len <= plan.row_len and narrow.row_len >= max(dataset.lengths)
    batches = step_batches(dataset, plan, 0)
    assert all(b["inputs"].shape[1] == plan.row_len for b in batches)
    assert sum(b["num_supervised"] for b in batches) == plan.num_supervised == dataset.total_supervised()


def test_packing_does_not_leak_between_conversations(tiny_tokenizer, dataset, model):
    n0, n2 = dataset.lengths[0], dataset.lengths[2]
    b = collate(dataset, [[0, 2]], pad_id(tiny_tokenizer), row_len=n0 + n2 + 3)
    with torch.no_grad():
        logits = model(b["inputs"], layout=b["layout"])
        changed = b["inputs"].clone()
        changed[0, 1:n0] = torch.randint(0, 300, (n0 - 1,), generator=torch.Generator().manual_seed(3))
        logits_changed = model(changed, layout=b["layout"])
        alone = model(torch.tensor([dataset.ids[2][:-1]]))
    assert not torch.allclose(logits[0, :n0], logits_changed[0, :n0])  # the change does matter...
    assert torch.equal(logits[0, n0:n0 + n2], logits_changed[0, n0:n0 + n2])  # ...but not to the other one
    # and the second conversation sees exactly what it would see alone (positions restart at 0)
    torch.testing.assert_close(logits[0, n0:n0 + n2], alone[0], atol=1e-5, rtol=1e-5)


def efficiency(batches):
    """Real positions / processed positions (1.0 = no padding)."""
    return sum(b["num_tokens"] for b in batches) / sum(b["num_positions"] for b in batches)


def test_packed_and_padded_sum_loss_are_equal(tiny_tokenizer, dataset, model, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "bench"))
    from baselines import padded_batches  # nanochat's batching, which the benchmarks time ours against

    examples = list(range(len(dataset)))
    plan = arrange_step(dataset, examples, device_batch_size=2, packed=True)
    packed = step_batches(dataset, plan, pad_id(tiny_tokenizer))
    padded = padded_batches(dataset, examples, 3, pad_id(tiny_tokenizer))
    with torch.no_grad():
        def total(batches):
            return sum(model(b["inputs"], b["targets"], loss_reduction="sum", layout=b["layout"]).item()
                       for b in batches)
        packed_loss, padded_loss = total(packed), total(padded)
    assert sum(b["num_supervised"] for b in packed) == sum(b["num_supervised"] for b in padded) == plan.num_supervised
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert len(packed) < len(padded)
    real = dataset.total_tokens()
    assert efficiency(padded) == real / sum(b["inputs"].numel() for b in padded)
    assert efficiency(packed) == real / sum(b["inputs"].numel() for b in packed)


# --- steps, epochs, ranks

def test_steps_per_epoch_counts_like_nanochat():
    assert steps_per_epoch(12000, 64) == 187  # x 4 epochs = the seed's 748 steps
    assert steps_per_epoch(10, 64) == 1
    assert steps_per_epoch(0, 64) == 0


def test_reshuffle_is_deterministic_and_differs_per_epoch():
    assert epoch_order(50, 0, 42) == epoch_order(50, 0, 42)
    assert epoch_order(50, 0, 42) != epoch_order(50, 1, 42)
    assert epoch_order(50, 0, 42) != epoch_order(50, 0, 7)
    assert sorted(epoch_order(50, 3, 42)) == list(range(50))
    seen = []
    for step in range(steps_per_epoch(50, 8)):  # 6 steps of 8: each example at most once
        epoch, examples = step_examples(50, step, 8, seed=42)
        assert epoch == 0 and len(examples) == 8
        seen += examples
    assert len(set(seen)) == 48
    assert step_examples(50, 6, 8, 42)[0] == 1  # step 6 starts epoch 1
    assert step_examples(50, 6, 8, 42)[1] == list(epoch_order(50, 1, 42)[:8])


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_is_disjoint_with_equal_micro_steps(dataset, packed, world_size):
    examples = list(range(len(dataset)))
    plans = [arrange_step(dataset, examples, device_batch_size=1, world_size=world_size, rank=r, packed=packed)
             for r in range(world_size)]
    per_rank = [[i for mb in p.micro_batches for row in mb for i in row] for p in plans]
    flat = [i for ids in per_rank for i in ids]
    assert sorted(flat) == examples  # every conversation exactly once over all ranks
    assert len({len(p.micro_batches) for p in plans}) == 1
    assert len({p.num_supervised for p in plans}) == 1 and plans[0].num_supervised == dataset.total_supervised()
    with pytest.raises(ValueError, match="rank"):
        arrange_step(dataset, examples, 1, world_size=2, rank=2)


def test_micro_batch_without_supervision_contributes_zero(tiny_tokenizer, dataset, model):
    # more ranks than rows: some ranks get an empty micro-batch to stay in step with the others
    plan = arrange_step(dataset, [1], device_batch_size=4, world_size=2, rank=1)
    assert plan.micro_batches == [[]]
    empty = collate(dataset, [], pad_id(tiny_tokenizer))
    assert empty["num_supervised"] == 0 and (empty["targets"] == -1).all()
    # a real row whose targets are all ignored behaves the same
    masked = collate(dataset, [[0]], pad_id(tiny_tokenizer))
    masked["targets"].fill_(-1)
    model.zero_grad(set_to_none=True)
    for b in (empty, masked):
        loss_sum = model(b["inputs"], b["targets"], loss_reduction="sum", layout=b["layout"])
        loss = loss_sum / max(1, plan.num_supervised)
        assert loss.item() == 0.0
        loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(torch.isfinite(g).all() and g.abs().sum() == 0 for g in grads)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kernel", ["loop", "dense"])
def test_training_forward_reads_nothing_back_from_the_device(tiny_tokenizer, dataset, model, kernel, monkeypatch):
    """The training forward and backward run on the meta device, where tensors hold no data:
    any read-back (.item(), .tolist(), a boolean mask, a data-dependent shape) raises there.
    Only the collator's host-side description (the layout's cu_seqlens) is real."""
    from nanochat import attention
    monkeypatch.setattr(attention, "check_kernel", lambda *args: None)  # the check reads numbers: not on meta
    b = collate(dataset, [[0, 1, 2], [3, 4]], pad_id(tiny_tokenizer), row_len=128)
    meta = torch.device("meta")
    on_meta = copy.deepcopy(model).to(meta)
    on_meta.attention_kernel = kernel
    inputs, targets = b["inputs"].to(meta), b["targets"].to(meta)
    loss = on_meta(inputs, targets, loss_reduction="sum", layout=b["layout"].to(meta),
                   supervised_index=b["supervised_index"].to(meta))
    assert loss.device == meta and loss.shape == ()
    loss.backward()
    assert all(p.grad is not None and p.grad.device == meta for p in on_meta.parameters())
    # The same batch described the other ways does read back, so the meta device catches it.
    with pytest.raises((NotImplementedError, RuntimeError)):
        on_meta(inputs, targets, loss_reduction="sum", layout=b["layout"].to(meta))  # boolean mask of targets
    doc_ids = torch.zeros(inputs.shape, dtype=torch.long, device=meta)
    with pytest.raises((NotImplementedError, RuntimeError)):
        on_meta(inputs, targets, loss_reduction="sum", doc_ids=doc_ids, supervised_index=b["supervised_index"].to(meta))

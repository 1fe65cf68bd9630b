"""Shared fixtures: a tiny tokenizer and a tiny checkpoint in nanochat's published layout."""

import json
import os
from pathlib import Path

# The hub is never reached from the tests: libraries that would retry it (sentence-transformers
# for --explain's similarity) fail at once instead. Set before huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import sciassist.checkpoints

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SCIENCEQA = REPO_ROOT.parent / "shared" / "scienceqa"

# Text to train the tiny tokenizer on: enough variety for every byte-level piece the tests
# use (letters, digits, punctuation, the answer format).
TOKENIZER_TEXTS = [
    "The correct answer is A. Explanation: plants need sunlight to make food.",
    "The correct answer is B. Background: a magnet attracts iron and steel.",
    "The correct answer is C. Which of these states is farthest north? Maine, Texas, Ohio.",
    "The correct answer is D. Context: Select the living thing. Options: rock, tree, cloud.",
    "The correct answer is E. Water freezes at 0 degrees Celsius and boils at 100 degrees.",
    "You are a helpful science tutor for elementary through high school students. "
    "Explain concepts clearly with examples.",
    "Which word would you find on a dictionary page? Which tense does the sentence use?",
    "What is the capital of France? Paris is the capital. 12 + 30 = 42; 7 x 6 = 42!",
    "Hello, how are you today? I'm fine, thanks. Let's learn about the solar system.",
]


@pytest.fixture(autouse=True)
def no_hub_downloads(monkeypatch):
    """Tests never reach the Hugging Face hub: a hub repo id resolves to an offline error unless a
    test puts its own stand-in in place."""
    def offline(*args, **kwargs):
        raise OSError("the hub is not reached from the tests (offline)")

    monkeypatch.setattr(sciassist.checkpoints, "snapshot_download", offline)


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny models: a second thread only adds synchronisation,
    and on a shared, oversubscribed machine it makes every small op many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sample_dir():
    return REPO_ROOT / "sciassist" / "data" / "sample"


@pytest.fixture(scope="session")
def scienceqa_dir():
    if not (SHARED_SCIENCEQA / "problems.json").exists():
        pytest.skip(f"ScienceQA local copy not found at {SHARED_SCIENCEQA}")
    return SHARED_SCIENCEQA


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from nanochat.tokenizer import Tokenizer
    return Tokenizer.train_from_iterator(TOKENIZER_TEXTS * 20, vocab_size=512)


def tiny_gpt_config(vocab_size):
    from nanochat.gpt import GPTConfig
    return GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)


def nontrivial_gpt(vocab_size, seed, projection_std, lm_head_std=0.3):
    """A tiny_gpt_config GPT whose blocks do something: nanochat initialises the output
    projections to zero (every block the identity), so they and lm_head are drawn at random."""
    from nanochat.gpt import GPT
    torch.manual_seed(seed)
    model = GPT(tiny_gpt_config(vocab_size))
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, projection_std)
            block.mlp.c_proj.weight.normal_(0.0, projection_std)
        model.lm_head.weight.normal_(0.0, lm_head_std)
    return model


def write_published_checkpoint(checkpoint_dir, model, step, extra_meta=None):
    """Write a checkpoint the way the published files are: wte in bf16, the rest fp32,
    keys prefixed with `_orig_mod.` (saved from a compiled model)."""
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        state["_orig_mod." + k] = v.bfloat16() if k == "transformer.wte.weight" else v.float()
    torch.save(state, checkpoint_dir / f"model_{step:06d}.pt")
    c = model.config
    meta = {
        "step": step,
        "val_bpb": 3.21,
        "model_config": {"sequence_len": c.sequence_len, "vocab_size": c.vocab_size, "n_layer": c.n_layer,
                         "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd},
        "user_config": {"depth": c.n_layer},
        "device_batch_size": 4,
        "max_seq_len": c.sequence_len,
    }
    meta.update(extra_meta or {})
    (checkpoint_dir / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
    return checkpoint_dir


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory, tiny_tokenizer):
    """A nanochat base dir holding tokenizer/ and base_checkpoints/d2/ (random init)."""
    from nanochat.gpt import GPT
    base_dir = tmp_path_factory.mktemp("nanochat_base")
    tiny_tokenizer.save(base_dir / "tokenizer")
    torch.manual_seed(1234)
    model = GPT(tiny_gpt_config(tiny_tokenizer.get_vocab_size()))
    model.init_weights()
    write_published_checkpoint(base_dir / "base_checkpoints" / "d2", model, step=0)
    return base_dir

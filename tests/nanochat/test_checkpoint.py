import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
import torch

from nanochat.checkpoint import (
    CheckpointError,
    clean_state_dict_keys,
    find_checkpoint,
    find_last_step,
    load_model,
    load_model_from,
    load_optimizer_state,
    model_steps,
    save_checkpoint,
)
from nanochat.files import load_tensors_file, remove_partial_files
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 256 + len(SPECIAL_TOKENS)  # a byte-level tokenizer: no training needed
CONFIG = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=64)


def byte_tokenizer():
    ranks = {bytes([i]): i for i in range(256)}
    specials = {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    byte_tokenizer().save(path)
    return path


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**CONFIG))
    model.init_weights()
    with torch.no_grad():  # non-zero output projections so every weight affects the logits
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.2)
            block.mlp.c_proj.weight.normal_(0, 0.2)
        model.lm_head.weight.normal_(0, 0.5)
    return model


def make_base_dir(tmp_path, tokenizer_dir, source_dir="chatsft_checkpoints", tag="d2"):
    base = tmp_path / "base"
    (base / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        (base / "tokenizer" / name).write_bytes((tokenizer_dir / name).read_bytes())
    checkpoint_dir = base / source_dir / tag
    checkpoint_dir.mkdir(parents=True)
    return base, checkpoint_dir


def published_state_dict(model):
    """Like the files nanochat wrote: compiled-model key prefix, wte bf16, the rest fp32."""
    sd = {}
    for k, v in model.state_dict().items():
        sd["_orig_mod." + k] = v.bfloat16() if k == "transformer.wte.weight" else v.clone()
    return sd


def write_published(checkpoint_dir, step, state_dict, model_config=None, **meta_extra):
    torch.save(state_dict, checkpoint_dir / f"model_{step:06d}.pt")
    meta = dict(model_config=model_config or CONFIG, step=step, val_bpb=1.23, user_config={"depth": 2},
                device_batch_size=32, max_seq_len=32, **meta_extra)
    (checkpoint_dir / f"meta_{step:06d}.json").write_text(json.dumps(meta))


FIXED_INPUT = torch.tensor([[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])


def test_save_then_load_is_bit_exact(tmp_path, tokenizer_dir):
    base, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir)
    model = tiny_model()
    model.eval()
    save_checkpoint(checkpoint_dir, 7, model, {"val_loss": 1.5, "mmlu_acc": 0.25})
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000007.json", "model_000007.pt"]

    loaded, tokenizer, meta = load_model(checkpoint_dir, device="cpu")
    assert not loaded.training
    assert tokenizer.get_vocab_size() == VOCAB
    assert meta == {"val_loss": 1.5, "mmlu_acc": 0.25, "model_config": CONFIG, "step": 7}
    original = model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys() and len(restored) == 2 + 6 * CONFIG["n_layer"]
    for k in original:
        assert restored[k].dtype == original[k].dtype and torch.equal(restored[k], original[k]), k
    # rotary tables are rebuilt, not left on the meta device
    assert torch.equal(loaded.cos, model.cos) and torch.equal(loaded.sin, model.sin)
    with torch.no_grad():
        assert torch.equal(loaded(FIXED_INPUT), model(FIXED_INPUT))

    # the same checkpoint through the base-dir layout (tokenizer found in <base>/tokenizer)
    loaded2, _, meta2 = load_model_from(base, "sft", device="cpu")
    assert meta2["step"] == 7 and torch.equal(loaded2.lm_head.weight, model.lm_head.weight)


def test_saved_keys_are_clean_and_optimizer_state_round_trips(tmp_path):
    model = tiny_model()
    optimizers = model.setup_optimizers()
    loss = model(FIXED_INPUT[:, :-1], targets=FIXED_INPUT[:, 1:])
    loss.backward()
    for opt in optimizers:
        opt.step()
    prefixed = {"module._orig_mod." + k: v for k, v in model.state_dict().items()}
    states = [opt.state_dict() for opt in optimizers]
    save_checkpoint(tmp_path, 3, prefixed, {"model_config": CONFIG}, optimizer_state=states)
    keys = torch.load(tmp_path / "model_000003.pt", weights_only=True).keys()
    assert set(keys) == set(model.state_dict().keys())

    restored = load_optimizer_state(tmp_path, 3)
    fresh = tiny_model().setup_optimizers()
    for opt, state in zip(fresh, restored, strict=True):
        opt.load_state_dict(state)
    muon_param = model.transformer.h[0].attn.c_q.weight
    fresh_buf = fresh[1].state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(fresh_buf, optimizers[1].state[muon_param]["momentum_buffer"])
    assert fresh[0].param_groups[1]["initial_lr"] == optimizers[0].param_groups[1]["initial_lr"]
    with pytest.raises(CheckpointError, match="optim_000004.pt"):
        load_optimizer_state(tmp_path, 4)


def test_published_format_loads(tmp_path, tokenizer_dir):
    base, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir, "base_checkpoints", "d2")
    model = tiny_model()
    write_published(checkpoint_dir, 650, published_state_dict(model))
    loaded, _, meta = load_model_from(base, "base", device="cpu")
    assert meta["val_bpb"] == 1.23 and meta["step"] == 650
    assert all(p.dtype == torch.float32 for p in loaded.parameters())  # CPU runs in fp32
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight.bfloat16().float())
    assert torch.equal(loaded.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)
    assert torch.equal(loaded.cos, model.cos)
    with torch.no_grad():
        logits = loaded(FIXED_INPUT)
    assert logits.shape == (1, FIXED_INPUT.size(1), VOCAB) and torch.isfinite(logits).all()


def test_tokenizer_beside_the_model_and_explicit_dir(tmp_path, tokenizer_dir):
    # the Hugging Face repos keep tokenizer.pkl next to model_<step>.pt
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        (flat / name).write_bytes((tokenizer_dir / name).read_bytes())
    write_published(flat, 1, published_state_dict(tiny_model()))
    _, tokenizer, _ = load_model(flat, device="cpu")
    assert tokenizer.get_vocab_size() == VOCAB
    bare = tmp_path / "bare"
    bare.mkdir()
    write_published(bare, 1, published_state_dict(tiny_model()))
    with pytest.raises(CheckpointError, match="no tokenizer.pkl found.*make download"):
        load_model(bare, device="cpu")
    _, tokenizer, _ = load_model(bare, device="cpu", tokenizer_dir=tokenizer_dir)
    assert tokenizer.get_vocab_size() == VOCAB


def test_truncated_and_non_tensor_files_are_refused(tmp_path, tokenizer_dir):
    _, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir)
    write_published(checkpoint_dir, 1, published_state_dict(tiny_model()))
    path = checkpoint_dir / "model_000001.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model_000001.pt.*truncated or corrupt"):
        load_model(checkpoint_dir, device="cpu")
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 2080000000\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer.*make download"):
        load_model(checkpoint_dir, device="cpu")
    torch.save({"model": object.__new__(GPTConfig)}, path)  # a pickled Python object, not weights
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_model(checkpoint_dir, device="cpu")


def test_wrong_keys_and_shapes_are_named(tmp_path, tokenizer_dir):
    _, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir)
    sd = published_state_dict(tiny_model())
    sd["_orig_mod.transformer.h.0.attn.c_query.weight"] = sd.pop("_orig_mod.transformer.h.0.attn.c_q.weight")
    write_published(checkpoint_dir, 1, sd)
    expected = (r"missing keys \[transformer.h.0.attn.c_q.weight\]"
                r".*unexpected keys \[transformer.h.0.attn.c_query.weight\]")
    with pytest.raises(CheckpointError, match=expected):
        load_model(checkpoint_dir, device="cpu")

    sd = published_state_dict(tiny_model())
    sd["_orig_mod.transformer.h.1.mlp.c_fc.weight"] = torch.zeros(128, 64)
    write_published(checkpoint_dir, 1, sd)
    expected = r"shapes.*transformer.h.1.mlp.c_fc.weight: file \[128, 64\], config \[256, 64\]"
    with pytest.raises(CheckpointError, match=expected):
        load_model(checkpoint_dir, device="cpu")

    write_published(checkpoint_dir, 1, published_state_dict(tiny_model()), model_config={**CONFIG, "n_layer": 3})
    with pytest.raises(CheckpointError, match=r"missing keys \[transformer.h.2"):
        load_model(checkpoint_dir, device="cpu")


def test_later_era_checkpoints_are_refused(tmp_path, tokenizer_dir):
    _, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir)
    sd = published_state_dict(tiny_model())
    sd["_orig_mod.resid_lambdas"] = torch.ones(2)
    sd["_orig_mod.x0_lambdas"] = torch.zeros(2)
    sd["_orig_mod.value_embeds.0.weight"] = torch.zeros(VOCAB, 64)
    sd["_orig_mod.transformer.h.0.attn.ve_gate.weight"] = torch.zeros(2, 32)
    write_published(checkpoint_dir, 1, sd)
    with pytest.raises(CheckpointError, match="later nanochat version") as info:
        load_model(checkpoint_dir, device="cpu")
    message = str(info.value)
    for key in ("resid_lambdas", "x0_lambdas", "value_embeds.0.weight", "transformer.h.0.attn.ve_gate.weight"):
        assert key in message
    assert "Oct 2025 - Jan 2026" in message

    later_config = {**CONFIG, "window_pattern": "SSSL"}
    write_published(checkpoint_dir, 1, published_state_dict(tiny_model()), model_config=later_config)
    with pytest.raises(CheckpointError, match="later nanochat version.*window_pattern.*Oct 2025 - Jan 2026"):
        load_model(checkpoint_dir, device="cpu")


def test_vocab_mismatch_and_missing_files(tmp_path, tokenizer_dir):
    _, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir)
    config = {**CONFIG, "vocab_size": 300}
    torch.manual_seed(0)
    write_published(checkpoint_dir, 1, published_state_dict(GPT(GPTConfig(**config))), model_config=config)
    with pytest.raises(CheckpointError, match="tokenizer vocab size 265 does not match the model's vocab_size 300"):
        load_model(checkpoint_dir, device="cpu")

    write_published(checkpoint_dir, 1, published_state_dict(tiny_model()))
    (checkpoint_dir / "meta_000001.json").unlink()
    with pytest.raises(CheckpointError, match="meta_000001.json is missing.*make download MODEL=d20"):
        load_model(checkpoint_dir, device="cpu")
    (checkpoint_dir / "meta_000001.json").write_text('{"step": 1}')
    with pytest.raises(CheckpointError, match="no 'model_config'"):
        load_model(checkpoint_dir, device="cpu")
    (checkpoint_dir / "meta_000001.json").write_text(json.dumps({"model_config": {**CONFIG, "n_embd": "64"}}))
    with pytest.raises(CheckpointError, match=r"meta_000001.json: model_config fields \['n_embd'\] must be positive"):
        load_model(checkpoint_dir, device="cpu")
    (checkpoint_dir / "meta_000001.json").write_text(json.dumps({"model_config": {**CONFIG, "n_head": 3}}))
    with pytest.raises(CheckpointError, match="does not describe a valid GPT"):
        load_model(checkpoint_dir, device="cpu")
    with pytest.raises(CheckpointError, match="model_000002.pt does not exist.*make download"):
        load_model(checkpoint_dir, step=2, device="cpu")
    with pytest.raises(CheckpointError, match="nowhere.*does not exist.*python -m sciassist.hub"):
        load_model(tmp_path / "nowhere", device="cpu")


def touch_checkpoint(directory, step):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"model_{step:06d}.pt").write_bytes(b"")


def test_find_checkpoint_defaults(tmp_path):
    root = tmp_path / "chatsft_checkpoints"
    for tag, steps in (("d4", [5]), ("d12", [100, 2000, 650]), ("d2", [9]), ("notes", [1])):
        for step in steps:
            touch_checkpoint(root / tag, step)
    (root / "d12" / "model_final.pt").write_bytes(b"")  # not a step: ignored
    assert find_checkpoint(tmp_path, "sft") == (root / "d12", 2000)
    assert find_checkpoint(tmp_path, "chatsft", model_tag="d4") == (root / "d4", 5)
    assert find_checkpoint(tmp_path, "sft", "d12", step=650) == (root / "d12", 650)
    assert find_last_step(root / "d12") == 2000
    with pytest.raises(CheckpointError, match="model_000007.pt does not exist.*latest step present: 2000"):
        find_checkpoint(tmp_path, "sft", "d12", step=7)
    with pytest.raises(CheckpointError, match="'d99' not found.*available: d12, d2, d4, notes"):
        find_checkpoint(tmp_path, "sft", "d99")
    with pytest.raises(CheckpointError, match="unknown checkpoint source 'pretrain'.*base, mid, sft, rl"):
        find_checkpoint(tmp_path, "pretrain")
    with pytest.raises(CheckpointError, match="chatrl_checkpoints does not exist.*make download"):
        find_checkpoint(tmp_path, "rl")
    with pytest.raises(CheckpointError, match="no model_<step>.pt file"):
        find_last_step(tmp_path)

    # no d<N> folder: the only folder, else the most recently modified one
    touch_checkpoint(tmp_path / "mid_checkpoints" / "experiment", 3)
    assert find_checkpoint(tmp_path, "mid") == (tmp_path / "mid_checkpoints" / "experiment", 3)
    touch_checkpoint(tmp_path / "base_checkpoints" / "old", 1)
    touch_checkpoint(tmp_path / "base_checkpoints" / "new", 2)
    os.utime(tmp_path / "base_checkpoints" / "old", (1_000_000, 1_000_000))
    assert find_checkpoint(tmp_path, "base") == (tmp_path / "base_checkpoints" / "new", 2)


def test_atomic_save_leaves_no_partial_files(tmp_path, monkeypatch):
    model = tiny_model()
    save_checkpoint(tmp_path, 1, model, {}, optimizer_state={"x": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["meta_000001.json", "model_000001.pt", "optim_000001.pt"]

    # meta that cannot be written fails before any file is touched
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_checkpoint(tmp_path, 2, model, {"bad": object()})
    # a crash while writing the weights leaves neither a temp file nor a meta for that step
    import nanochat.checkpoint as checkpoint_module

    def crashing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 3, model, {})
    assert sorted(os.listdir(tmp_path)) == ["meta_000001.json", "model_000001.pt", "optim_000001.pt"]


def test_clean_state_dict_keys():
    keys = {"_orig_mod.lm_head.weight": 1, "module._orig_mod.transformer.wte.weight": 2, "lm": 3}
    cleaned = clean_state_dict_keys(keys)
    assert cleaned == {"lm_head.weight": 1, "transformer.wte.weight": 2, "lm": 3}


@pytest.mark.parametrize("change, problem", [
    ({"sequence_len": 10**12}, "out of bounds: sequence_len 1,000,000,000,000 (at most 1,048,576)"),
    ({"n_layer": 5000, "vocab_size": 10**7},
     "vocab_size 10,000,000 (at most 2,097,152); n_layer 5,000 (at most 1,024)"),
    ({"n_embd": 2**20}, "n_embd 1,048,576 (at most 65,536)"),
    ({"n_head": 128}, "does not describe a valid GPT: n_head 128 is more than n_embd 64"),
    ({"n_kv_head": 4}, "does not describe a valid GPT: n_kv_head 4 is more than n_head 2"),
    ({"n_head": 3, "n_kv_head": 3}, "does not describe a valid GPT: n_embd 64 is not divisible by n_head 3"),
    ({"n_head": 64, "n_kv_head": 1}, "does not describe a valid GPT: the head dim n_embd / n_head = 1 is odd"),
    ({"n_head": 4, "n_kv_head": 3}, "does not describe a valid GPT: n_head 4 is not divisible by n_kv_head 3"),
    ({"sequence_len": 1_048_576, "n_embd": 512, "n_head": 2}, "sequence_len 1,048,576 x head dim 256 is more than"),
])
def test_model_config_is_bounded_before_anything_is_allocated(tmp_path, tokenizer_dir, change, problem):
    _, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir)
    write_published(checkpoint_dir, 1, published_state_dict(tiny_model()), model_config={**CONFIG, **change})
    with pytest.raises(CheckpointError) as info:
        load_model(checkpoint_dir, device="cpu")
    message = str(info.value)
    assert message.startswith(f"{checkpoint_dir / 'meta_000001.json'}: model_config ") and problem in message
    assert "\n" not in message and "()" not in message


@pytest.mark.parametrize("content, problem", [
    (b"", "model file {path} is empty (0 bytes; a write that was cut short?); re-download or re-save it"),
    (b"PK\x03\x04 not really a zip", "model file {path} (21 bytes) is unreadable: truncated or corrupt "
                                   "(PytorchStreamReader failed reading zip archive: not a ZIP archive); "
                                   "re-download or re-save it"),
    (None, "{path} holds Python objects other than tensors and plain data (nanochat.gpt.GPTConfig); refusing to "
           "unpickle it for safety; re-download or re-save it"),
])
def test_unreadable_model_files_are_one_line(tmp_path, tokenizer_dir, content, problem):
    _, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir)
    write_published(checkpoint_dir, 1, published_state_dict(tiny_model()))
    path = checkpoint_dir / "model_000001.pt"
    if content is None:
        torch.save({"transformer.wte.weight": torch.zeros(2), "config": GPTConfig()}, path)
    else:
        path.write_bytes(content)
    for load in (lambda: load_model(checkpoint_dir, device="cpu"), lambda: load_tensors_file(path, what="model")):
        with pytest.raises(CheckpointError) as info:
            load()
        message = str(info.value)
        assert problem.format(path=path) in message and "\n" not in message and "weights_only" not in message


KILLED_SAVE = """
import os, signal, sys
import torch
import nanochat.checkpoint as checkpoint
from nanochat.gpt import GPT, GPTConfig

real_replace = os.replace

def replace(src, dst):
    if os.path.basename(dst) == "model_000005.pt":  # meta is in place, the model not yet: killed here
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

checkpoint.os.replace = replace
torch.manual_seed(0)
checkpoint.save_checkpoint(sys.argv[1], 5, GPT(GPTConfig(**{config})), {{}})
"""


def test_a_save_killed_midway_leaves_no_model_without_meta(tmp_path, tokenizer_dir):
    _, checkpoint_dir = make_base_dir(tmp_path, tokenizer_dir)
    save_checkpoint(checkpoint_dir, 1, tiny_model(), {})
    script = KILLED_SAVE.format(config=CONFIG)
    result = subprocess.run([sys.executable, "-c", script, str(checkpoint_dir)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    names = sorted(os.listdir(checkpoint_dir))
    temp = [n for n in names if n.startswith(".model_000005.pt.") and n.endswith(".tmp")]
    assert len(temp) == 1 and "meta_000005.json" in names and "model_000005.pt" not in names
    # readers see the complete checkpoint only
    assert model_steps(checkpoint_dir) == [1] and find_last_step(checkpoint_dir) == 1
    _, _, meta = load_model(checkpoint_dir, device="cpu")
    assert meta["step"] == 1
    # and the next run in the folder sweeps what the killed save left
    (checkpoint_dir / "model_000009.pt").write_bytes(b"an older version's model without meta")
    (checkpoint_dir / "optim_000007.pt").write_bytes(b"")
    assert remove_partial_files(checkpoint_dir) == sorted(
        [temp[0], "meta_000005.json", "model_000009.pt", "optim_000007.pt"])
    assert sorted(os.listdir(checkpoint_dir)) == ["meta_000001.json", "model_000001.pt"]
    assert remove_partial_files(tmp_path / "nowhere") == []

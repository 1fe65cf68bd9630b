"""
Find, load and save checkpoints in nanochat's directory layout:

    <base_dir>/tokenizer/{tokenizer.pkl, token_bytes.pt}
    <base_dir>/{base,mid,chatsft,chatrl}_checkpoints/<tag>/model_<step:06d>.pt + meta_<step:06d>.json

The files are the ones nanochat wrote between Oct 2025 and Jan 2026 (a flat state dict of
2 + 6*n_layer tensors, wte in bf16, the rest fp32; meta with `model_config`). Checkpoints of
later nanochat versions add tensors and change the math: they are refused, never loaded wrongly.
"""

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from nanochat.files import (
    DOWNLOAD_HINT,
    CheckpointError,
    atomic_write,
    fsync_dir,
    load_tensors_file,
    remove_if_present,
    write_temp,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer

SOURCE_DIRS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
# nanochat's own folder names are accepted as source names too
SOURCE_ALIASES = {"chatsft": "sft", "chatrl": "rl"}

# what later nanochat versions (from Jan 2026) added; their presence means different math
LATER_ERA_KEY_PATTERNS = [
    re.compile(r"(^|\.)resid_lambdas$"),
    re.compile(r"(^|\.)x0_lambdas$"),
    re.compile(r"(^|\.)value_embeds\."),
    re.compile(r"\.attn\.ve_gate\.weight$"),
    re.compile(r"(^|\.)smear_"),
    re.compile(r"(^|\.)backout_lambda$"),
]
LATER_ERA_CONFIG_KEYS = {"window_pattern"}
SUPPORTED_FORMAT = "only the Oct 2025 - Jan 2026 nanochat checkpoint format is supported"
CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
# A checkpoint is untrusted input: these upper bounds are checked before anything is allocated
# (GPT.init_rotary alone allocates 10 x sequence_len x head_dim / 2 values per table, so
# `sequence_len: 10**12` would ask for terabytes). Each is far above any nanochat model (d32:
# sequence_len 2048, n_layer 32, n_embd 2048, vocab 65,536). n_head and n_kv_head are bounded
# by n_embd (a head has at least one channel), and n_head must divide n_embd (into an even head
# dim, for rotary) and be a multiple of n_kv_head.
CONFIG_LIMITS = {"sequence_len": 1_048_576, "vocab_size": 2_097_152, "n_layer": 1024, "n_embd": 65_536}
# the rotary tables: sequence_len x head dim at most that of 1,048,576 positions of 128-channel heads
MAX_ROTARY_SIZE = 1_048_576 * 128


def default_base_dir():
    """nanochat's base dir: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    env = os.environ.get("NANOCHAT_BASE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nanochat"


def model_path(checkpoint_dir, step):
    return Path(checkpoint_dir) / f"model_{step:06d}.pt"


def meta_path(checkpoint_dir, step):
    return Path(checkpoint_dir) / f"meta_{step:06d}.json"


def optim_path(checkpoint_dir, step):
    return Path(checkpoint_dir) / f"optim_{step:06d}.pt"


# -----------------------------------------------------------------------------
# finding checkpoints

MODEL_FILE = re.compile(r"^model_(\d+)\.pt$")


def parse_model_file(name):
    """The step of a file named model_<step>.pt (any zero padding), else None."""
    match = MODEL_FILE.match(name)
    return int(match.group(1)) if match else None


def model_steps(checkpoint_dir):
    """Steps of the model_<step>.pt files in a directory, ascending ([] for a missing one)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    steps = (parse_model_file(path.name) for path in checkpoint_dir.iterdir() if path.is_file())
    return sorted(step for step in steps if step is not None)


def find_last_step(checkpoint_dir):
    """The largest <step> of the model_<step>.pt files in checkpoint_dir."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist; {DOWNLOAD_HINT}")
    steps = model_steps(checkpoint_dir)
    if not steps:
        raise CheckpointError(f"no model_<step>.pt file in {checkpoint_dir}; {DOWNLOAD_HINT}")
    return steps[-1]


def _default_model_tag(checkpoints_root):
    """The largest d<N> folder (numerically: d12 beats d4), else the only or most recent folder."""
    tags = [p for p in checkpoints_root.iterdir() if p.is_dir()]
    if not tags:
        raise CheckpointError(f"no model folders (like d20/) in {checkpoints_root}; {DOWNLOAD_HINT}")
    depth_tags = [p for p in tags if re.fullmatch(r"d\d+", p.name)]
    if depth_tags:
        return max(depth_tags, key=lambda p: int(p.name[1:])).name
    return max(tags, key=lambda p: (p.stat().st_mtime, p.name)).name


def find_checkpoint(base_dir, source, model_tag=None, step=None):
    """
    Locate a checkpoint under a nanochat base dir. source is base|mid|sft|rl. Default tag:
    the largest d<N> folder; default step: the largest step present. Returns (dir, step).
    """
    source = SOURCE_ALIASES.get(source, source)
    if source not in SOURCE_DIRS:
        raise CheckpointError(f"unknown checkpoint source {source!r}; expected one of {', '.join(SOURCE_DIRS)}")
    base_dir = Path(base_dir).expanduser()
    checkpoints_root = base_dir / SOURCE_DIRS[source]
    if not checkpoints_root.is_dir():
        raise CheckpointError(
            f"{checkpoints_root} does not exist (no {source} checkpoints in {base_dir}); {DOWNLOAD_HINT}"
        )
    if model_tag is None:
        model_tag = _default_model_tag(checkpoints_root)
    checkpoint_dir = checkpoints_root / model_tag
    if not checkpoint_dir.is_dir():
        available = sorted(p.name for p in checkpoints_root.iterdir() if p.is_dir())
        raise CheckpointError(
            f"model tag {model_tag!r} not found in {checkpoints_root} (available: {', '.join(available) or 'none'})"
        )
    if step is None:
        step = find_last_step(checkpoint_dir)
    elif not model_path(checkpoint_dir, step).is_file():
        latest = find_last_step(checkpoint_dir)
        raise CheckpointError(f"{model_path(checkpoint_dir, step)} does not exist (latest step present: {latest})")
    return checkpoint_dir, step


# -----------------------------------------------------------------------------
# reading files

def read_meta(path):
    """meta_<step>.json as a dict; CheckpointError when it is missing, not JSON or has no model_config."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"metadata file {path} is missing (a checkpoint is model_<step>.pt plus meta_<step>.json); {DOWNLOAD_HINT}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(
            f"{path} has no 'model_config' object (expected the fields {', '.join(CONFIG_FIELDS)})"
        )
    return meta


def _later_era_keys(keys):
    return [k for k in keys if any(p.search(k) for p in LATER_ERA_KEY_PATTERNS)]


def _check_model_config(model_config, path):
    later = sorted(LATER_ERA_CONFIG_KEYS & set(model_config))
    if later:
        raise CheckpointError(
            f"{path} is from a later nanochat version (model_config has {', '.join(later)}); {SUPPORTED_FORMAT}"
        )
    missing = [k for k in CONFIG_FIELDS if k not in model_config]
    unknown = sorted(set(model_config) - set(CONFIG_FIELDS))
    if missing or unknown:
        raise CheckpointError(
            f"{path}: model_config must have exactly the fields {', '.join(CONFIG_FIELDS)}; "
            f"missing {missing}, unexpected {unknown}"
        )
    not_positive = [k for k in CONFIG_FIELDS if type(model_config[k]) is not int or model_config[k] <= 0]
    if not_positive:
        raise CheckpointError(f"{path}: model_config fields {not_positive} must be positive integers")
    too_large = [f"{k} {model_config[k]:,} (at most {limit:,})" for k, limit in CONFIG_LIMITS.items()
                 if model_config[k] > limit]
    if too_large:
        raise CheckpointError(f"{path}: model_config is out of bounds: {'; '.join(too_large)}; a checkpoint this "
                              f"large cannot be a nanochat model, refusing to allocate it")
    problem = _config_inconsistency(model_config)
    if problem:
        raise CheckpointError(f"{path}: model_config does not describe a valid GPT: {problem}")


def _config_inconsistency(c):
    """What makes the head counts of a bounded model_config unusable, or None."""
    if c["n_head"] > c["n_embd"]:
        return f"n_head {c['n_head']} is more than n_embd {c['n_embd']}"
    if c["n_kv_head"] > c["n_head"]:
        return f"n_kv_head {c['n_kv_head']} is more than n_head {c['n_head']}"
    if c["n_embd"] % c["n_head"]:
        return f"n_embd {c['n_embd']} is not divisible by n_head {c['n_head']}"
    head_dim = c["n_embd"] // c["n_head"]
    if head_dim % 2:
        return f"the head dim n_embd / n_head = {head_dim} is odd (rotary embeddings need an even one)"
    if c["n_head"] % c["n_kv_head"]:
        return f"n_head {c['n_head']} is not divisible by n_kv_head {c['n_kv_head']}"
    if c["sequence_len"] * head_dim > MAX_ROTARY_SIZE:
        return (f"sequence_len {c['sequence_len']:,} x head dim {head_dim} is more than {MAX_ROTARY_SIZE:,} "
                f"(the rotary tables would not fit)")
    return None


def clean_state_dict_keys(state_dict):
    """Drop the `_orig_mod.` (torch.compile) and leading `module.` (DDP) parts of the keys."""
    cleaned = {}
    for key, value in state_dict.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        cleaned[key] = value
    return cleaned


def find_tokenizer_dir(checkpoint_dir, tokenizer_dir=None):
    """The folder holding tokenizer.pkl for a checkpoint: tokenizer_dir when given, else
    <checkpoint_dir>/tokenizer (fine-tuned runs carry theirs), else checkpoint_dir itself (the
    Hugging Face repos keep tokenizer.pkl beside the model), else <base_dir>/tokenizer."""
    if tokenizer_dir is not None:
        tokenizer_dir = Path(tokenizer_dir)
        if not (tokenizer_dir / "tokenizer.pkl").is_file():
            raise CheckpointError(f"no tokenizer.pkl in {tokenizer_dir}; {DOWNLOAD_HINT}")
        return tokenizer_dir
    checkpoint_dir = Path(checkpoint_dir)
    candidates = [checkpoint_dir / "tokenizer", checkpoint_dir, checkpoint_dir.parent.parent / "tokenizer"]
    for candidate in candidates:
        if (candidate / "tokenizer.pkl").is_file():
            return candidate
    looked_in = ", ".join(str(c) for c in candidates)
    raise CheckpointError(f"no tokenizer.pkl found for {checkpoint_dir} (looked in {looked_in}); {DOWNLOAD_HINT}")


def _load_tokenizer(tokenizer_dir):
    try:
        return Tokenizer.from_directory(tokenizer_dir)
    except Exception as e:  # any failure here is "this tokenizer file is unusable"
        raise CheckpointError(f"could not load the tokenizer from {tokenizer_dir}: {e}") from e


def _default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -----------------------------------------------------------------------------
# loading

def _few(items, n=5):
    items = sorted(items)
    return ", ".join(items[:n]) + (f" (and {len(items) - n} more)" if len(items) > n else "")


def load_model(checkpoint_dir, step=None, device=None, tokenizer_dir=None):
    """
    Load model_<step>.pt + meta_<step>.json (default: the latest step) and the tokenizer
    (tokenizer_dir, else <checkpoint_dir>/tokenizer, else tokenizer.pkl beside the model,
    else <base_dir>/tokenizer). Returns (model in eval mode, tokenizer, meta).
    Off CUDA the bf16 tensors become fp32 (CPU/MPS run in fp32); on CUDA the stored dtypes
    are kept, as nanochat does, since forward runs under bf16 autocast there.
    """
    checkpoint_dir = Path(checkpoint_dir).expanduser()
    device = torch.device(device) if device is not None else _default_device()
    if step is None:
        step = find_last_step(checkpoint_dir)
    mpath, jpath = model_path(checkpoint_dir, step), meta_path(checkpoint_dir, step)
    if not mpath.is_file():
        raise CheckpointError(f"model file {mpath} does not exist; {DOWNLOAD_HINT}")

    # cheap checks first, so a wrong tokenizer or a newer format fails before reading gigabytes
    meta = read_meta(jpath)
    model_config = meta["model_config"]
    _check_model_config(model_config, jpath)
    tokenizer = _load_tokenizer(find_tokenizer_dir(checkpoint_dir, tokenizer_dir))
    if tokenizer.get_vocab_size() != model_config["vocab_size"]:
        raise CheckpointError(
            f"tokenizer vocab size {tokenizer.get_vocab_size()} does not match the model's vocab_size "
            f"{model_config['vocab_size']} ({jpath}); use the tokenizer that was published with this model"
        )

    state_dict = load_tensors_file(mpath, device, "model")
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{mpath} is not a state dict (expected a flat dict of parameter name -> tensor)")
    state_dict = clean_state_dict_keys(state_dict)
    later = _later_era_keys(state_dict)
    if later:
        raise CheckpointError(f"{mpath} is from a later nanochat version (found {_few(later)}); {SUPPORTED_FORMAT}")

    # build on the meta device: no memory and no random init for weights we overwrite anyway
    config = GPTConfig(**model_config)
    try:
        with torch.device("meta"):
            model = GPT(config)
    except (AssertionError, ValueError) as e:  # what _check_model_config does not know of
        raise CheckpointError(f"{jpath}: model_config {model_config} does not describe a valid GPT "
                              f"({e or type(e).__name__})") from e
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = set(expected) - set(state_dict), set(state_dict) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{mpath} does not match the model described by {jpath.name}: "
            f"missing keys [{_few(missing)}], unexpected keys [{_few(unexpected)}]"
        )
    wrong_shapes = [
        f"{k}: file {list(v.shape)}, config {list(expected[k])}"
        for k, v in state_dict.items()
        if v.shape != expected[k]
    ]
    if wrong_shapes:
        raise CheckpointError(
            f"{mpath}: tensor shapes do not match {jpath.name}'s model_config: {'; '.join(wrong_shapes[:5])}"
        )

    if device.type != "cuda":
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    state_dict = {k: v.to(device) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    _materialize_buffers(model, device)
    model.eval()
    return model, tokenizer, meta


def _materialize_buffers(model, device):
    """Non-persistent buffers (rotary tables) are not in the file: rebuild them on `device`."""
    model.init_rotary(device=device)
    still_meta = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    assert not still_meta, f"tensors left on the meta device after loading: {still_meta[:5]}"


def load_model_from(base_dir, source, model_tag=None, step=None, device=None):
    """find_checkpoint + load_model: (model, tokenizer, meta) from a nanochat base dir."""
    checkpoint_dir, step = find_checkpoint(base_dir, source, model_tag, step)
    return load_model(checkpoint_dir, step, device=device)


def load_optimizer_state(checkpoint_dir, step, device=None):
    """The optimizer state saved by save_checkpoint at `step` (tensors mapped to `device`, default CPU)."""
    return load_tensors_file(optim_path(checkpoint_dir, step), device or "cpu", "optimizer state")


# -----------------------------------------------------------------------------
# saving

def _unwrap(model):
    # torch.compile wraps in ._orig_mod, DDP in .module
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _json_default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise TypeError(f"meta value of type {type(obj).__name__} is not JSON serializable")


def save_checkpoint(checkpoint_dir, step, model, meta, optimizer_state=None):
    """
    Write model_<step:06d>.pt (+ optim_<step:06d>.pt) and meta_<step:06d>.json, each atomically,
    so that a reader never sees a model without its meta: the weights go to a temp file first,
    then optim and meta are put in place, and the model file is renamed into place last. A kill
    mid-save leaves at most a temp file and a meta without its model, both invisible to readers
    (they look for model_<step>.pt) and removed by remove_partial_files. `model` is a GPT
    (possibly compiled / DDP-wrapped) or a state dict; keys are saved without
    `_orig_mod.`/`module.` so nanochat can read the file.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    meta = dict(meta)
    if isinstance(model, nn.Module):
        model = _unwrap(model)
        if "model_config" not in meta and hasattr(model, "config"):
            meta["model_config"] = dataclasses.asdict(model.config)
        state_dict = model.state_dict()
    else:
        state_dict = model
    if not isinstance(meta.get("model_config"), dict):
        raise ValueError("meta needs a 'model_config' dict (the GPTConfig fields) so the checkpoint can be loaded")
    meta.setdefault("step", step)
    state_dict = {k: v.detach().cpu() for k, v in clean_state_dict_keys(state_dict).items()}
    meta_text = json.dumps(meta, indent=2, default=_json_default)  # fail before writing anything

    mpath = model_path(checkpoint_dir, step)
    model_tmp = write_temp(mpath, lambda f: torch.save(state_dict, f), "wb")
    try:
        if optimizer_state is not None:
            atomic_write(optim_path(checkpoint_dir, step), lambda f: torch.save(optimizer_state, f), "wb")
        atomic_write(meta_path(checkpoint_dir, step), lambda f: f.write(meta_text), "w")
        os.replace(model_tmp, mpath)
    except BaseException:
        remove_if_present(model_tmp)
        raise
    fsync_dir(checkpoint_dir)

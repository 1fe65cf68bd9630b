"""
Import a Hugging Face transformers NanoChat folder (what `python -m sciassist.export` writes, or a
hub repo of transformers' NanoChat architecture) into nanochat's checkpoint layout:

  <folder>/config.json        model_type "nanochat": the sizes -> meta_000000.json's model_config
  <folder>/model.safetensors  transformers' names -> nanochat's (model_000000.pt), shapes checked
  <folder>/tokenizer.json     the byte-level BPE -> tiktoken ranks (tokenizer/tokenizer.pkl, token_bytes.pt)

The converted copy is written once into <folder>/.sciassist_nanochat/ (or, when the folder cannot
be written, a folder named after it under the nanochat base dir) with a marker file recording the
sizes and mtimes of the source files; it is reused while they are unchanged. sciassist.checkpoints
calls convert_folder for a folder holding such a config.json and no model_<step>.pt.

What nanochat's math cannot compute is refused with one line naming the file and the field (a
CheckpointError): an MLP width other than 4 x hidden_size, an activation other than relu2, a logit
softcap other than 15, tied embeddings, biases, rope theta other than 10000, a tokenizer with a
different split regex or other special tokens. transformers is not imported: the three files are
read with json, safetensors and tokenizers, and only nanochat is imported from this project (the
same layer as sciassist.common, which it may not import). The weight names (weight_names) are
defined here once; sciassist.export, a higher layer, turns them around.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import tiktoken
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer as FastTokenizer

from nanochat.checkpoint import CheckpointError, default_base_dir, save_checkpoint
from nanochat.gpt import GPT, SOFTCAP, GPTConfig
from nanochat.tokenizer import ENCODING_NAME, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "tokenizer.json"
SOURCE_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)
# what a hub repo is downloaded with (the three above plus what transformers reads beside them)
HUB_FILES = (*SOURCE_FILES, "tokenizer_config.json", "generation_config.json")
MODEL_TYPE = "nanochat"
CACHE_NAME = ".sciassist_nanochat"
MARKER = "sciassist_import.json"
STEP = 0
ROPE_THETA = 10000.0  # nanochat.gpt.GPT.init_rotary's base
# the sizes: nanochat's model_config field <- transformers' config field
SIZE_FIELDS = {"sequence_len": "max_position_embeddings", "vocab_size": "vocab_size",
               "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
               "n_kv_head": "num_key_value_heads", "n_embd": "hidden_size"}
# Texts the converted tokenizer must encode exactly as tokenizer.json does (no special-token text:
# the `tokenizers` library matches it, nanochat never does).
CHECK_TEXTS = [
    "The correct answer is A. Explanation: plants need sunlight to make food.",
    "1234567890 12 345 6789 3.14159 1,000,000",
    "spaces   and\ttabs\t\t and\n\nnewlines \r\n  \n   end   ",
    "naïve café Ünïcödé — “quotes” 東京 中文字符 😀🚀 ñ",
    "it's we'll THEY'RE you've I'D don't",
    "!!!???...,,,;;; ((())) {}[] @#$%^&*",
    "\u00a0\u2003odd spaces\u200b",
    "Hello, how are you today? I'm fine, thanks. Let's learn about the solar system.",
]


def weight_names(n_layer: int) -> dict[str, str]:
    """transformers' NanoChatForCausalLM key -> nanochat's state-dict key; the export uses it inverted."""
    names = {"model.embed_tokens.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}
    per_layer = {"self_attn.q_proj": "attn.c_q", "self_attn.k_proj": "attn.c_k", "self_attn.v_proj": "attn.c_v",
                 "self_attn.o_proj": "attn.c_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(n_layer):
        for theirs, ours in per_layer.items():
            names[f"model.layers.{i}.{theirs}.weight"] = f"transformer.h.{i}.{ours}.weight"
    return names


def byte_symbols() -> dict[int, str]:
    """The byte-level alphabet of `tokenizers`' ByteLevel (GPT-2's), as in sciassist.export."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    symbols, shifted = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return symbols


# ----------------------------------------------------------------------------- detection and config

def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def is_transformers_folder(path) -> bool:
    """A folder whose config.json says model_type "nanochat"."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == MODEL_TYPE
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _rope_theta(config: dict):
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        return "rope_parameters", rope
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return "rope_parameters.rope_type", rope.get("rope_type", rope.get("type"))
    if "rope_theta" in rope:
        return "rope_parameters.rope_theta", rope["rope_theta"]
    return "rope_theta", config.get("rope_theta", ROPE_THETA)


def model_config_from(config: dict, path: Path) -> dict:
    """nanochat's model_config for a transformers NanoChat config.json, or a one-line CheckpointError
    naming the field that nanochat's math does not match. Missing fields take NanoChatConfig's defaults."""
    model_config = {}
    for ours, theirs in SIZE_FIELDS.items():
        value = config.get(theirs)
        if value is None and theirs == "num_key_value_heads":
            value = config.get("num_attention_heads")
        if type(value) is not int or value <= 0:
            raise CheckpointError(f"{path}: {theirs} must be a positive integer, got {value!r}")
        model_config[ours] = value
    n_embd = model_config["n_embd"]
    mismatches = [
        ("intermediate_size", config.get("intermediate_size"), 4 * n_embd, "4 x hidden_size"),
        ("hidden_act", config.get("hidden_act", "relu2"), "relu2", "nanochat's ReLU^2"),
        ("final_logit_softcapping", config.get("final_logit_softcapping", 15.0), SOFTCAP, "nanochat's logit softcap"),
        ("tie_word_embeddings", config.get("tie_word_embeddings", False), False, "nanochat's untied embeddings"),
        ("attention_bias", config.get("attention_bias", False), False, "nanochat's bias-free attention"),
        ("mlp_bias", config.get("mlp_bias", False), False, "nanochat's bias-free MLP"),
        (*_rope_theta(config), ROPE_THETA, "nanochat's rotary base"),
    ]
    head_dim = config.get("head_dim")
    if head_dim is not None and n_embd % model_config["n_head"] == 0:
        mismatches.append(("head_dim", head_dim, n_embd // model_config["n_head"], "hidden_size / num_attention_heads"))
    for field, value, expected, what in mismatches:
        if value != expected or type(value) is bool and type(expected) is not bool:
            raise CheckpointError(f"{path}: {field} is {value!r}, nanochat's model needs {expected!r} ({what}); "
                                  f"this model cannot be imported")
    return model_config


def _check_sizes(model_config: dict, path: Path) -> None:
    """nanochat's own bounds and consistency checks (as load_model does), naming config.json."""
    try:
        with torch.device("meta"):
            GPT(GPTConfig(**model_config))
    except (AssertionError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the sizes {model_config} do not describe a nanochat GPT "
                              f"({e or type(e).__name__})") from e


# ----------------------------------------------------------------------------- weights

def state_dict_from(tensors: dict, model_config: dict, path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors' tensors under nanochat's names, every one present and of the right shape."""
    names = weight_names(model_config["n_layer"])
    missing, extra = sorted(set(names) - set(tensors)), sorted(set(tensors) - set(names))
    if missing or extra:
        raise CheckpointError(f"{path}: the tensors are not a NanoChat model's: missing {missing[:5]}, "
                              f"extra {extra[:5]} ({len(missing)} missing, {len(extra)} extra)")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(GPTConfig(**model_config)).state_dict().items()}
    state = {names[k]: v for k, v in tensors.items()}
    wrong = [f"{k} {list(v.shape)} (config.json: {list(expected[names[k]])})" for k, v in tensors.items()
             if v.shape != expected[names[k]]]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not match config.json: {'; '.join(wrong[:3])}")
    not_float = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if not_float:
        raise CheckpointError(f"{path}: tensors {not_float[:3]} are not floating point")
    return state


def read_weights(path: Path, model_config: dict) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (a transformers NanoChat folder holds {', '.join(SOURCE_FILES)})")
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
    return state_dict_from(tensors, model_config, path)


# ----------------------------------------------------------------------------- tokenizer

def _split_pattern(pre: dict | None, path: Path) -> str:
    """The split regex of nanochat's pre-tokenizer (Split(regex), then ByteLevel without its own regex)."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not (isinstance(steps, list) and len(steps) == 2 and all(isinstance(s, dict) for s in steps)):
        raise CheckpointError(f"{path}: pre_tokenizer must be a Sequence of Split(regex) and ByteLevel "
                              f"(nanochat's), got {json.dumps(pre)[:120]}")
    split, byte_level = steps
    pattern = split.get("pattern") if split.get("type") == "Split" else None
    if not isinstance(pattern, dict) or "Regex" not in pattern:
        raise CheckpointError(f"{path}: pre_tokenizer's first step must be a Split on a regex, got "
                              f"{json.dumps(split)[:120]}")
    if pattern["Regex"] != SPLIT_PATTERN or split.get("behavior") != "Isolated" or split.get("invert"):
        raise CheckpointError(f"{path}: pre_tokenizer's split regex is not nanochat's (nanochat.tokenizer."
                              f"SPLIT_PATTERN, isolated); this tokenizer cannot be imported")
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True) \
            or byte_level.get("add_prefix_space", False):
        raise CheckpointError(f"{path}: pre_tokenizer's second step must be ByteLevel with use_regex false and "
                              f"add_prefix_space false, got {json.dumps(byte_level)[:120]}")
    return pattern["Regex"]


def encoding_from(data: dict, path: Path) -> tiktoken.Encoding:
    """tokenizer.json (a byte-level BPE) as nanochat's tiktoken Encoding: ranks = bytes -> id of the
    non-special tokens, then the nine special tokens with the ids right after them."""
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path}: model must be a BPE with a vocab, got type {model.get('type')!r}")
    if data.get("normalizer") is not None:
        raise CheckpointError(f"{path}: normalizer must be null (nanochat does not normalize text), got "
                              f"{json.dumps(data['normalizer'])[:80]}")
    pattern = _split_pattern(data.get("pre_tokenizer"), path)
    added = data.get("added_tokens") or []
    specials = {t.get("content"): t.get("id") for t in added if isinstance(t, dict)}
    if set(specials) != set(SPECIAL_TOKENS):
        raise CheckpointError(f"{path}: added_tokens must be nanochat's special tokens {SPECIAL_TOKENS}; missing "
                              f"{sorted(set(SPECIAL_TOKENS) - set(specials))}, extra "
                              f"{sorted(set(specials) - set(SPECIAL_TOKENS))[:5]}")
    alphabet = {symbol: b for b, symbol in byte_symbols().items()}
    ranks = {}
    for text, token_id in model["vocab"].items():
        if text in specials:
            if token_id != specials[text]:
                raise CheckpointError(f"{path}: {text} has id {token_id} in the vocab and {specials[text]} in "
                                      f"added_tokens")
            continue
        try:
            ranks[bytes(alphabet[c] for c in text)] = token_id
        except KeyError as e:
            raise CheckpointError(f"{path}: vocab entry {text!r} has a character outside the byte-level "
                                  f"alphabet ({e}); not a byte-level BPE") from e
    if not all(type(i) is int for i in ranks.values()) or sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: the vocab's ids are not 0..{len(ranks) - 1} (one per token)")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise CheckpointError(f"{path}: the vocab lacks {len(missing_bytes)} of the 256 single bytes; not a "
                              f"byte-level BPE nanochat can use")
    if sorted(specials.values()) != list(range(len(ranks), len(ranks) + len(SPECIAL_TOKENS))):
        raise CheckpointError(f"{path}: the special tokens' ids must follow the vocab's "
                              f"({len(ranks)}..{len(ranks) + len(SPECIAL_TOKENS) - 1}), "
                              f"got {sorted(specials.values())}")
    return tiktoken.Encoding(ENCODING_NAME, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)


def read_tokenizer(path: Path) -> Tokenizer:
    """nanochat's Tokenizer for tokenizer.json, checked to give its ids on CHECK_TEXTS."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (a transformers NanoChat folder holds {', '.join(SOURCE_FILES)})")
    data = read_json(path)
    tokenizer = Tokenizer(encoding_from(data, path))
    try:
        fast = FastTokenizer.from_file(str(path))
    except Exception as e:  # the library's parse errors have no common type
        raise CheckpointError(f"{path}: the tokenizers library cannot load it ({type(e).__name__}: {e})") from e
    for text in CHECK_TEXTS:
        theirs, ours = fast.encode(text, add_special_tokens=False).ids, tokenizer.encode(text)
        if theirs != ours:
            raise CheckpointError(f"{path}: converted to tiktoken it tokenizes {text[:30]!r} differently "
                                  f"({theirs[:8]} vs {ours[:8]}); its merges are not tiktoken's ranks")
    return tokenizer


# ----------------------------------------------------------------------------- the converted folder

def fingerprint(folder: Path) -> dict:
    """The source files' sizes and mtimes (what makes a converted copy stale)."""
    found = {}
    for name in SOURCE_FILES:
        stat = (folder / name).stat()
        found[name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return found


def cache_dir_for(folder: Path) -> Path:
    """<folder>/.sciassist_nanochat, or, when the folder is not writable, one under the nanochat base dir."""
    if os.access(folder, os.W_OK):
        return folder / CACHE_NAME
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
    return default_base_dir() / "transformers_imports" / f"{folder.name}-{key}"


def is_converted(cache: Path, source: Path) -> bool:
    marker = cache / MARKER
    if not (marker.is_file() and (cache / f"model_{STEP:06d}.pt").is_file()):
        return False
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
        return record.get("source") == str(source.resolve()) and record.get("files") == fingerprint(source)
    except (OSError, ValueError, AttributeError):
        return False


def convert_folder(folder, cache: Path | None = None) -> Path:
    """Convert a transformers NanoChat folder into nanochat's layout (model_000000.pt, meta_000000.json,
    tokenizer/) and return that folder; an up-to-date earlier conversion is reused."""
    folder = Path(folder).expanduser()
    for name in SOURCE_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} does not exist (a transformers NanoChat folder holds "
                                  f"{', '.join(SOURCE_FILES)})")
    cache = Path(cache) if cache is not None else cache_dir_for(folder)
    if is_converted(cache, folder):
        return cache
    config_path = folder / CONFIG_FILE
    config = read_json(config_path)
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{config_path}: model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    model_config = model_config_from(config, config_path)
    _check_sizes(model_config, config_path)
    tokenizer = read_tokenizer(folder / TOKENIZER_FILE)
    if tokenizer.get_vocab_size() != model_config["vocab_size"]:
        raise CheckpointError(f"{config_path}: vocab_size {model_config['vocab_size']} does not match "
                              f"{TOKENIZER_FILE}'s {tokenizer.get_vocab_size()} tokens")
    files = fingerprint(folder)
    state = read_weights(folder / WEIGHTS_FILE, model_config)
    staging = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        tokenizer.save(staging / "tokenizer")
        meta = {"step": STEP, "model_config": model_config, "imported_from": str(folder.resolve()),
                "imported_by": "sciassist.hf_import"}
        save_checkpoint(staging, STEP, state, meta)
        marker = {"source": str(folder.resolve()), "files": files}  # staged: it appears with the rest
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(staging, cache)
    except OSError as e:
        raise CheckpointError(f"converting {folder} into {cache} failed: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache

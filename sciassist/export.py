"""
Export a nanochat checkpoint to a Hugging Face transformers folder, loadable with no custom code:

    python -m sciassist.export --checkpoint finetuned_model_checkpoint/sciassist --out_dir hf/sciassist
    python -m sciassist.export --checkpoint sft:d20 --out_dir hf/d20 --dtype bfloat16 --push_to_hub me/d20

The folder (transformers' NanoChat architecture, `model_type: nanochat`):

  config.json             NanoChatConfig: the sizes, rope theta 10000, logit softcap 15, RMSNorm eps =
                          float32 machine epsilon (what F.rms_norm uses), untied embeddings
  model.safetensors       the weights under transformers' names (sciassist.hf_import.weight_names)
  generation_config.json  the stop tokens (<|assistant_end|>, <|bos|>) and the chat's sampling defaults
  tokenizer.json          the tiktoken BPE as a byte-level BPE of the `tokenizers` library: the same
                          split regex, vocabulary and merges, the special tokens with their ids
  tokenizer_config.json, chat_template.jinja
                          the chat template renders exactly what nanochat's tokenizer renders
  README.md               a model card: the model, the run's settings, the evaluation table
  sciassist_export.json   what was exported from where (and the mark that lets a later export
                          replace this folder: a non-empty folder without it is never touched)

The math is the same in both implementations, checked by tests/test_export.py: transformers'
NanoChat rotates q and k with rotate_half(x) = (x2, -x1) and cos/sin repeated over both halves,
which is y1 = x1*cos + x2*sin, y2 = x2*cos - x1*sin: nanochat's rotation by minus theta with the
half split, so the q/k projection rows are copied unchanged. One difference remains: nanochat
rounds its rotary cos/sin tables to bf16, transformers keeps them in fp32: logits differ by 3e-4 to 8e-3 on
the small models tested (more for larger logits); with fp32 tables on both sides, ~5e-6.

The tokenizer follows transformers' conventions where they differ from nanochat's:
`tokenizer(text)` turns the text of a special token ("<|bos|>") into that token, as every
Hugging Face tokenizer does (chat templates rely on it). nanochat's `encode` never does; the
same ids come from `tokenizer(text, split_special_tokens=True)`, and
`apply_chat_template(..., sanitize_control_tokens=True)` keeps such text in messages as text
(transformers >= 5.20; older releases, Colab's 5.15 among them, accept the keyword and ignore it).

Only this command imports transformers, tokenizers and safetensors (at the top of this file).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from nanochat.checkpoint import CheckpointError
from nanochat.gpt import SOFTCAP
from nanochat.tokenizer import SPECIAL_TOKENS
from sciassist.checkpoints import CheckpointSettings, resolve_from_settings
from sciassist.common import (
    UserError,
    check_fields,
    missing_extra_message,
    print_error,
    setting,
    settings_from_namespace,
    settings_parser,
    write_json,
)
from sciassist.hf_import import byte_symbols, weight_names
from sciassist.model_card import model_card

try:  # the export extra; without it `python -m sciassist.export` says so in one line, as `sciassist export` does
    from transformers import GenerationConfig, NanoChatConfig, PreTrainedTokenizerFast
except ModuleNotFoundError as missing:
    message = missing_extra_message("python -m sciassist.export", missing)
    if __name__ != "__main__" or message is None:
        raise  # imported: sciassist.cli (or the importer) reports it
    sys.exit(print_error(message))

EXPORT_MARK = "sciassist_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROPE_THETA = 10000.0  # nanochat.gpt.GPT.init_rotary's base
# F.rms_norm(x, shape) with eps=None uses the machine epsilon of x's dtype; nanochat runs fp32
# (off CUDA) and transformers' NanoChatRMSNorm computes in fp32 whatever the weights' dtype.
RMS_NORM_EPS = torch.finfo(torch.float32).eps
# The chat's sampling defaults (sciassist.serve.generation.ChatSettings), which serve may not be imported here.
SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 50, "max_new_tokens": 512}
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")  # where nanochat.engine.Engine stops
PAD_TOKEN = "<|assistant_end|>"  # nanochat's SFT pads with it; <|bos|> would mask every prompt's first token


class ExportError(UserError):
    """An export that cannot go ahead; the message says why."""


@dataclass
class ExportSettings(CheckpointSettings):
    """`python -m sciassist.export`: the model flags, where to write, the precision, the hub repo."""

    out_dir: str = setting("", "the folder to write: new, empty, or an earlier export, which is replaced "
                               "(default: none, required)", required=True)
    dtype: str = setting("float32", "weights' precision in model.safetensors (float32 is exact)",
                         choices=list(DTYPES))
    push_to_hub: str | None = setting(None, "then upload the folder to this Hugging Face model repo (user/name)")
    private: bool = setting(False, "with --push_to_hub: create the repo as private (an existing repo keeps its "
                                   "visibility)")
    device: str = setting("cpu", "where the checkpoint is read: cpu | cuda | cuda:N | mps | auto")


# ----------------------------------------------------------------------------- weights and config

def hf_state_dict(state_dict: dict, n_layer: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The weights under transformers' names, on the CPU in `dtype`. Rows are copied as they are:
    both implementations rotate q and k the same way (the module docstring)."""
    names = {ours: theirs for theirs, ours in weight_names(n_layer).items()}  # nanochat's key -> transformers'
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    missing, unexpected = sorted(set(names) - set(state_dict)), sorted(set(state_dict) - set(names))
    if missing or unexpected:
        raise ExportError(f"the checkpoint's tensors are not nanochat's: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return {names[k]: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}


def special_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.encode_special(name) for name in SPECIAL_TOKENS}


def hf_config(gpt_config, tokenizer, dtype: str = "float32", intermediate_size: int | None = None) -> NanoChatConfig:
    """transformers' NanoChatConfig for a nanochat GPTConfig."""
    ids = special_ids(tokenizer)
    return NanoChatConfig(
        vocab_size=gpt_config.vocab_size,
        hidden_size=gpt_config.n_embd,
        intermediate_size=intermediate_size or 4 * gpt_config.n_embd,
        num_hidden_layers=gpt_config.n_layer,
        num_attention_heads=gpt_config.n_head,
        num_key_value_heads=gpt_config.n_kv_head,
        max_position_embeddings=gpt_config.sequence_len,
        hidden_act="relu2",
        rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        final_logit_softcapping=SOFTCAP,
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        bos_token_id=ids["<|bos|>"],
        eos_token_id=ids["<|assistant_end|>"],
        pad_token_id=ids[PAD_TOKEN],
        architectures=["NanoChatForCausalLM"],
        dtype=dtype,
    )


def generation_config(tokenizer) -> GenerationConfig:
    ids = special_ids(tokenizer)
    return GenerationConfig(bos_token_id=ids["<|bos|>"], eos_token_id=[ids[t] for t in STOP_TOKENS],
                            pad_token_id=ids[PAD_TOKEN], **SAMPLING)


# ----------------------------------------------------------------------------- tokenizer

def bpe_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken's ranks as a byte-level BPE. tiktoken merges, in each piece, the adjacent pair whose
    concatenation has the lowest rank; so every split of a token into two tokens is a merge, ranked
    by the token's rank (ties: the parts' ranks)."""
    symbols = byte_symbols()

    def text(token: bytes) -> str:
        return "".join(symbols[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]


def fast_tokenizer(tokenizer) -> FastTokenizer:
    """nanochat's tiktoken encoding as a `tokenizers` Tokenizer with the same ids: the split regex,
    then byte-level BPE that first looks a whole piece up in the vocabulary (ignore_merges, as
    tiktoken does), and every special token of the encoding with its id."""
    enc = tokenizer.enc
    ranks, specials = dict(enc._mergeable_ranks), dict(enc._special_tokens)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ExportError("the tokenizer's ranks are not the ids 0..N-1; cannot write a BPE vocabulary")
    single = [bytes([b]) for b in range(256)]
    if any(b not in ranks for b in single):
        raise ExportError("the tokenizer does not have all 256 single bytes as tokens; not a byte-level BPE")
    by_id = sorted(specials.items(), key=lambda item: item[1])
    if [i for _, i in by_id] != list(range(len(ranks), len(ranks) + len(specials))):
        raise ExportError("the tokenizer's special tokens do not follow its ranks; cannot assign their ids")
    vocab, merges = bpe_vocab_and_merges(ranks)
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False,
                                    byte_fallback=False))
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(name, special=True, normalized=False) for name, _ in by_id])
    wrong = [name for name, i in by_id if fast.token_to_id(name) != i]
    if wrong:
        raise ExportError(f"special tokens {wrong} did not get their ids in tokenizer.json")
    return fast


# The chat format of nanochat.tokenizer.Tokenizer: render_conversation without
# add_generation_prompt (for string content), render_for_completion with it (which leaves out a
# final assistant message and appends <|assistant_start|>). Assistant content may be nanochat's
# list of parts (text, python, python_output).
CHAT_TEMPLATE = (
    "{%- macro text_of(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'python' -%}<|python_start|>{{- part['text'] -}}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- part['text'] -}}<|output_end|>"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if add_generation_prompt and turns and turns[-1]['role'] == 'assistant' -%}"
    "{%- set turns = turns[:-1] -%}{%- endif -%}"
    "{%- if not turns -%}{{- raise_exception('a conversation needs a user message (after the system message)') -}}"
    "{%- endif -%}"
    "<|bos|>"
    "{%- for message in turns -%}"
    "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}"
    "{%- if message['role'] != expected -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ': expected role ' ~ expected ~ ', got ' ~ message['role'] ~ "
    "' (only the first message may be a system message; then roles alternate user/assistant)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user_start|>{%- if loop.first and system is not none -%}{{- system ~ '\\n\\n' -}}{%- endif -%}"
    "{{- text_of(message['content']) -}}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>{{- text_of(message['content']) -}}<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def hf_tokenizer(tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    """The transformers tokenizer: fast_tokenizer plus the special-token roles and the chat template."""
    extra = [name for name in SPECIAL_TOKENS if name not in ("<|bos|>", PAD_TOKEN)]
    return PreTrainedTokenizerFast(
        tokenizer_object=fast_tokenizer(tokenizer),
        bos_token="<|bos|>", eos_token="<|assistant_end|>", pad_token=PAD_TOKEN,
        extra_special_tokens=extra,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decode must give back the text exactly
        model_max_length=model_max_length,
    )


# ----------------------------------------------------------------------------- the folder

def check_out_dir(out_dir: Path) -> None:
    """Refuse a file, or a non-empty folder that an earlier export did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out_dir {out_dir} is a file, not a folder; give a new or empty folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_MARK).is_file():
        raise ExportError(f"--out_dir {out_dir} is not empty and was not written by sciassist.export (no "
                          f"{EXPORT_MARK}); give a new or empty folder, nothing was written")


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Put the finished staging folder in place of out_dir (empty, missing or an earlier export)."""
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        else:
            out_dir.rmdir()
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_folder(loaded, folder: Path, dtype: str, repo_id: str | None = None) -> dict:
    """Every file of the export into `folder` (which exists); returns the export's record."""
    model, tokenizer = loaded.model, loaded.tokenizer
    config = model.config
    state = hf_state_dict(model.state_dict(), config.n_layer, DTYPES[dtype])
    intermediate = state["model.layers.0.mlp.fc1.weight"].shape[0] if config.n_layer else None
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    num_params = sum(t.numel() for t in state.values())
    del state
    hf_config(config, tokenizer, dtype, intermediate).save_pretrained(folder)
    generation_config(tokenizer).save_pretrained(folder)
    hf_tokenizer(tokenizer, config.sequence_len).save_pretrained(folder)
    (folder / "README.md").write_text(model_card(loaded, dtype, repo_id, num_params, SAMPLING), encoding="utf-8")
    record = {
        "exported_by": "sciassist.export",
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": str(loaded.choice.checkpoint_dir),
        "step": loaded.choice.step,
        "kind": loaded.choice.kind,
        "source": loaded.choice.source,
        "dtype": dtype,
        "num_params": num_params,
        "model_config": dataclasses.asdict(config),
        "files": sorted(p.name for p in folder.iterdir()) + [EXPORT_MARK],
    }
    write_json(folder / EXPORT_MARK, record)
    return record


def push_folder(folder: Path, repo_id: str, private: bool = False, api: HfApi | None = None) -> str:
    """Upload the folder to a Hugging Face model repo (created when missing); returns the commit URL."""
    api = api or HfApi()
    try:
        # private=None: public unless the organisation's default is private (ignored for an existing repo)
        api.create_repo(repo_id=repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message="Upload nanochat model exported by sciassist.export")
    except Exception as e:  # network, auth, a bad repo id: one line, and the folder is kept
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"pushing {folder} to {repo_id} failed ({type(e).__name__}: {reason}); the exported "
                          f"folder is complete, push it again later (log in with `hf auth login`)") from e
    return str(getattr(commit, "commit_url", None) or commit)


def export(settings: ExportSettings, api: HfApi | None = None) -> dict:
    """Choose and load the checkpoint, write the folder (staged, then put in place), push it when
    asked. Returns the export's record (as in sciassist_export.json), with "out_dir" and "pushed"."""
    if not settings.out_dir:
        raise ExportError("--out_dir is required: the folder to write")
    out_dir = Path(settings.out_dir).expanduser()
    check_out_dir(out_dir)
    check_fields(settings, ExportError)
    loaded = resolve_from_settings(settings)
    staging = out_dir.with_name(f".{out_dir.name}.export-{os.getpid()}")
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        record = write_folder(loaded, staging, settings.dtype, settings.push_to_hub)
        _replace_dir(staging, out_dir)
    except OSError as e:
        raise ExportError(f"writing {out_dir} failed: {e}") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record["out_dir"] = str(out_dir)
    record["pushed"] = None
    if settings.push_to_hub:
        record["pushed"] = push_folder(out_dir, settings.push_to_hub, settings.private, api=api)
    return record


def main(argv=None) -> int:
    parser = settings_parser(ExportSettings, "python -m sciassist.export",
                             "Export a nanochat checkpoint to a Hugging Face transformers folder "
                             "(config.json, model.safetensors, tokenizer, chat template, model card).")
    settings = settings_from_namespace(ExportSettings, parser.parse_args(argv))
    try:
        record = export(settings)
    except (UserError, CheckpointError) as e:
        return print_error(e)
    print(f"exported {record['checkpoint']} step {record['step']} ({record['num_params']:,} parameters, "
          f"{record['dtype']}) to {record['out_dir']}")
    if record["pushed"]:
        print(f"pushed to https://huggingface.co/{settings.push_to_hub} ({record['pushed']})")
    print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({record['out_dir']!r}), "
          f"or serve it: vllm serve {record['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

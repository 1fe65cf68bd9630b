"""LoRA fine-tuning and RL (--lora_rank R > 0), built on peft: low-rank adapters are injected into the
block projections of the GPT (peft.inject_adapter_in_model, so the model stays our GPT with its
config, loss and optimizer-free helpers), the base weights are frozen, and only the adapters train.

What a LoRA run writes differs from a full fine-tune only by additions:
  model_<step>.pt, meta_<step>.json  the MERGED model (W + alpha/r B A), exactly the keys and shapes
                                     of a full fine-tune, so chat, eval and export work unchanged;
                                     the meta gains "lora": {rank, alpha, dropout, targets}
  adapter/                           the best (RL: the latest) checkpoint's adapter in peft's format
                                     (adapter_model.safetensors + adapter_config.json), loadable by
                                     peft.PeftModel.from_pretrained / set_peft_model_state_dict
The merge is done on CPU copies of the weights (in the checkpoint writer's thread), never on the
live training model. The resume point holds the whole state dict (frozen base + adapters) and the
adapter optimizer's state, so --resume continues bit for bit as for full fine-tuning.

Optimizer: Muon (nanochat.optim.muon, as nanochat.optim sets it up for the transformer matrices:
momentum 0.95, Nesterov, 5 Newton-Schulz steps, --weight_decay) on every adapter matrix (A and B;
nothing else trains), at --lora_lr x --init_lr_frac with the linear decay of every run. Measured
against AdamW on the same matrices (bench/bench_lora.py optimizers, bench/RESULTS.md "LoRA": 16 steps
from the same tiny ScienceQA base, three learning rates each): Muon reached the lower validation
loss (4.204 vs 4.427 at each one's best lr, from 5.086) and did not diverge at the lr where AdamW
did; it is also what the full fine-tune uses for the same layers.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import muon
from sciassist.common import check_fields
from sciassist.train.settings import TrainError, TrainSettings, lora_target_names

ADAPTER_NAME = "default"  # peft's name of the one adapter
ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# peft's keys in adapter_model.safetensors are those of a PeftModel wrapping the model
PEFT_PREFIX = "base_model.model."
# the adapters' optimizer (chosen over AdamW, see the module docstring; bench/bench_lora.py measures both)
OPTIMIZER = "muon"


def lora_alpha(settings: TrainSettings) -> float:
    return float(settings.lora_alpha) if settings.lora_alpha is not None else 2.0 * settings.lora_rank


def lora_meta(settings: TrainSettings) -> dict:
    """The "lora" entry of a checkpoint's meta."""
    return {"rank": settings.lora_rank, "alpha": lora_alpha(settings), "dropout": settings.lora_dropout,
            "targets": lora_target_names(settings.lora_targets)}


def lora_config(settings: TrainSettings):
    # peft is imported here, not at the top: it (and the transformers it imports) takes seconds to
    # load and only LoRA runs need it, so full fine-tuning, chat and eval never import it
    from peft import LoraConfig
    return LoraConfig(r=settings.lora_rank, lora_alpha=lora_alpha(settings), lora_dropout=settings.lora_dropout,
                      target_modules=lora_target_names(settings.lora_targets), bias="none")


def add_adapters(model: GPT, settings: TrainSettings):
    """Inject the adapters of --lora_rank/--lora_alpha/--lora_dropout/--lora_targets into `model`
    (in place; peft initialises A randomly from torch's generator and B to zero, so the model's
    output is unchanged) and freeze everything else. Returns the peft LoraConfig."""
    # peft: a heavy optional dependency, imported only by LoRA runs (see lora_config)
    from peft import inject_adapter_in_model

    check_fields(settings, TrainError)  # --lora_targets among them: names of nanochat's block projections
    config = lora_config(settings)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():  # peft froze the base; make sure nothing else trains
        p.requires_grad_(is_adapter_key(name))
    return config


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def adapter_optimizers(model, settings: TrainSettings) -> list:
    """The adapters' optimizer: Muon on all of them (OPTIMIZER), at lora_lr x init_lr_frac, with
    'initial_lr' set for the schedule."""
    params = [p for _, p in adapter_parameters(model)]
    if not params:
        raise TrainError("LoRA: no adapter parameter to train (check --lora_targets)")
    lr = settings.lora_lr * settings.init_lr_frac
    optimizers = [muon(params, lr=lr, weight_decay=settings.weight_decay, dtype=settings.muon_torch_dtype())]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers


def merged_state_dict(state_dict: dict, model_config: GPTConfig, config) -> dict:
    """The weights of the merged model (W + alpha/r B A in every adapted layer) from a CPU copy of
    a LoRA model's state dict: the keys and shapes of a plain GPT. The merge is peft's
    (merge_and_unload) on a model built on the meta device around these tensors, so neither the
    live model nor `state_dict` is changed."""
    # peft: a heavy optional dependency, imported only by LoRA runs (see lora_config)
    from peft.tuners.lora import LoraModel

    with torch.device("meta"):
        shell = GPT(model_config)
    tuner = LoraModel(shell, config, ADAPTER_NAME, low_cpu_mem_usage=True)
    tuner.model.load_state_dict(state_dict, assign=True, strict=True)
    # safe_merge: each merged weight is a new tensor (W + delta), `state_dict`'s stay as they were
    merged = tuner.merge_and_unload(progressbar=False, safe_merge=True)
    return {k: v.detach() for k, v in merged.state_dict().items()}


def save_lora_checkpoint(run_dir, step, model, state_dict: dict, config, meta: dict) -> None:
    """What a LoRA run saves at `step`: the adapter to <run_dir>/adapter/ and the merged model as
    model_<step>.pt + meta_<step>.json, from `state_dict`, a CPU copy of `model`'s (the live model
    is not touched)."""
    save_adapter(Path(run_dir) / ADAPTER_DIR, model, state_dict, config)
    save_checkpoint(run_dir, step, merged_state_dict(state_dict, model.config, config), meta)


def save_adapter(folder, model, state_dict: dict, config) -> Path:
    """Write the adapter in peft's format to `folder`, as PeftModel.save_pretrained does:
    adapter_model.safetensors (peft's get_peft_model_state_dict of `state_dict`, a CPU copy of
    `model`'s, with a PeftModel's key prefix) + adapter_config.json. The weights file is written
    atomically (a temp file renamed into place)."""
    # peft: a heavy optional dependency, imported only by LoRA runs (see lora_config)
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME,
                                        save_embedding_layers=False)
    tensors = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in adapter.items()}
    weights = folder / ADAPTER_WEIGHTS
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, weights)
    config.save_pretrained(str(folder))
    return folder

"""The one checkpoint resolver: which model a command means, decided before any weights are read.

Every command names a model the same way (`--checkpoint`, and the values of evaluation's
`--base` / `--finetuned`):

  a folder            exactly that folder's model_<step>.pt (the latest step, or --model_step)
  a model_<step>.pt   that file's folder and step
  source[:tag[:step]] nanochat's layout under --base_dir, e.g. sft:d20, base:d4:1000
                      ({base,mid,chatsft,chatrl}_checkpoints/<tag>/; default tag: the largest
                      d<N>; default step: the latest)
  newest              the newest fine-tuned run (below), and nothing else
  a transformers folder  config.json (model_type nanochat) + model.safetensors + tokenizer.json, as
                      `python -m sciassist.export` writes it: converted once into nanochat's layout
                      (sciassist.hf_import; the copy in <folder>/.sciassist_nanochat/ is reused while
                      the files are unchanged), then loaded from there
  owner/name          a Hugging Face hub repo of such a folder: downloaded into
                      <base_dir>/hf_models/owner--name/, then treated as a folder. Only a spec of
                      exactly that shape that cannot be a local path goes to the hub (looks_local:
                      not an existing path, no ./ ../ / ~ start, no file suffix such as .pt,
                      owner not an existing local folder nor one of this project's folder
                      names); a missing local path is "no such folder", and its name never
                      leaves the machine
  nothing             --source / --model_tag under --base_dir when given; else the newest
                      fine-tuned run (the most recently written model_*.pt under
                      finetuned_dir/*/), else the base dir's sft model, else its base model

Choosing (choose_checkpoint) is separate from loading (load_choice), so a choice can be
tested and printed without reading gigabytes (except a transformers folder's first conversion).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import snapshot_download

from nanochat.checkpoint import (
    SOURCE_ALIASES,
    SOURCE_DIRS,
    CheckpointError,
    default_base_dir,
    find_checkpoint,
    find_tokenizer_dir,
    load_model,
    meta_path,
    model_path,
    model_steps,
    parse_model_file,
)
from sciassist.common import resolve_device, setting
from sciassist.hf_import import HUB_FILES, SOURCE_FILES, convert_folder, is_transformers_folder

DEFAULT_FINETUNED_DIR = "finetuned_model_checkpoint"
# Sources tried, in order, when nothing was asked for and no fine-tuned run exists:
# a chat-tuned model answers questions, a base model only continues text.
FALLBACK_SOURCES = ("sft", "base")
SOURCES = tuple(SOURCE_DIRS)
NEWEST = "newest"
SPEC_HELP = ("a checkpoint folder, a model_<step>.pt file, source[:tag[:step]] such as sft:d20, newest (the "
             "newest fine-tuned run), a transformers NanoChat folder or a Hugging Face repo id of one (owner/name)")
TRANSFORMERS = "transformers"
HUB_MODELS_DIR = "hf_models"  # under the base dir: hub repos downloaded by their id
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The first part of a path that is this project's (or nanochat's) folder, never a hub owner.
LOCAL_FOLDER_NAMES = (DEFAULT_FINETUNED_DIR, HUB_MODELS_DIR, *SOURCE_DIRS.values())
# The end of a file name: a model, meta or tokenizer file, never a hub repo's name.
FILE_SUFFIXES = (".pt", ".json", ".safetensors", ".pkl")


@dataclass
class CheckpointChoice:
    """Where a model will be loaded from."""

    kind: str  # "checkpoint" (named by the user), "finetuned" (the newest run), "base_dir" or "transformers"
    checkpoint_dir: Path
    step: int
    tokenizer_dir: Path | None = None  # None: nanochat.checkpoint looks beside the model
    source: str | None = None  # base|mid|sft|rl when kind == "base_dir"
    base_dir: Path | None = None
    origin: str | None = None  # kind "transformers": the folder (or hub repo id) that was converted

    @property
    def model_file(self) -> Path:
        return model_path(self.checkpoint_dir, self.step)

    @property
    def name(self) -> str:
        """A short label for a page header: the run name, or e.g. "sft d20"."""
        if self.kind == "base_dir":
            return f"{self.source} {self.checkpoint_dir.name}"
        if self.kind == TRANSFORMERS and self.origin:
            return Path(self.origin).name
        return self.checkpoint_dir.name

    def describe(self) -> str:
        where = f"{self.checkpoint_dir} step {self.step}"
        if self.kind == "base_dir":
            return f"{self.source} checkpoint {where}"
        if self.kind == "finetuned":
            return f"fine-tuned checkpoint {where}"
        if self.kind == TRANSFORMERS:
            return f"transformers model {self.origin} (converted to {self.checkpoint_dir})"
        return f"checkpoint {where}"


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer and meta, and where they came from."""

    model: object  # nanochat.gpt.GPT
    tokenizer: object  # nanochat.tokenizer.Tokenizer
    meta: dict
    choice: CheckpointChoice

    @property
    def sequence_len(self) -> int:
        return int(self.model.config.sequence_len)

    def info(self) -> dict:
        """Plain-data summary (for /health and the chat banner)."""
        config = self.model.config
        return {
            "name": self.choice.name,
            "checkpoint": str(self.choice.checkpoint_dir),
            "step": self.choice.step,
            "kind": self.choice.kind,
            "source": self.choice.source,
            "n_layer": int(config.n_layer),
            "n_embd": int(config.n_embd),
            "sequence_len": int(config.sequence_len),
            "vocab_size": int(config.vocab_size),
            "device": str(self.model.get_device()),
        }


@dataclass
class CheckpointSettings:
    """The model flags, with the same names in every command that loads one."""

    checkpoint: str | None = setting(None, f"the model: {SPEC_HELP} (default: the newest fine-tuned run, else "
                                           f"the base dir's sft model, else its base model)")
    source: str | None = setting(None, "nanochat source in --base_dir: base | mid | sft | rl",
                                 choices=[None, *SOURCES])
    model_tag: str | None = setting(None, "model folder in --base_dir, e.g. d20 (default: the largest d<N>)")
    model_step: int | None = setting(None, "checkpoint step (default: the latest)")
    base_dir: str | None = setting(None, "nanochat base dir (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    finetuned_dir: str = setting(DEFAULT_FINETUNED_DIR, "where fine-tuned runs live")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)")


def complete_steps(checkpoint_dir) -> list[int]:
    """The steps of a folder whose model_<step>.pt has its meta_<step>.json; a model without
    one (a save cut short by an older version) is passed over with a note, not a refusal."""
    steps = []
    for step in model_steps(checkpoint_dir):
        if meta_path(checkpoint_dir, step).is_file():
            steps.append(step)
        else:
            print(f"note: {model_path(checkpoint_dir, step)} has no {meta_path(checkpoint_dir, step).name} (a save "
                  f"cut short?); passed over", file=sys.stderr)
    return steps


def latest_finetuned(finetuned_dir: str | Path = DEFAULT_FINETUNED_DIR) -> tuple[Path, int] | None:
    """(run_dir, step) of the most recently written model_*.pt under finetuned_dir/*/.

    Newest by modification time rather than by step: a user who just trained a short run
    after a long one wants to talk to the run they just made."""
    finetuned_dir = Path(finetuned_dir)
    if not finetuned_dir.is_dir():
        return None
    best = None  # (mtime, run_dir, step)
    for run_dir in sorted(finetuned_dir.iterdir()):
        if not run_dir.is_dir():
            continue
        for step in complete_steps(run_dir):
            mtime = model_path(run_dir, step).stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, run_dir, step)
    return None if best is None else (best[1], best[2])


def _tokenizer_dir(checkpoint_dir: Path) -> Path | None:
    try:
        return find_tokenizer_dir(checkpoint_dir)
    except CheckpointError:
        return None  # loading says where it looked


def _in_folder(path: Path, model_step: int | None, kind: str = "checkpoint") -> CheckpointChoice:
    file_step = parse_model_file(path.name)
    if file_step is not None and path.is_file():
        # A model file was named: its folder and its step.
        if model_step is not None and model_step != file_step:
            raise CheckpointError(f"{path}: --model_step {model_step} disagrees with the file's step {file_step}")
        path, model_step = path.parent, file_step
    if not path.is_dir():
        missing = "not a folder" if path.exists() else "no such file" if file_step is not None else "no such folder"
        raise CheckpointError(f"{missing}: {path} (expected {SPEC_HELP})")
    steps = complete_steps(path)
    if not steps:
        orphans = model_steps(path)  # model files whose meta_<step>.json is missing
        if orphans:
            raise CheckpointError(f"{path}: {meta_path(path, orphans[-1]).name} is missing beside "
                                  f"{model_path(path, orphans[-1]).name} (a checkpoint is model_<step>.pt plus "
                                  f"meta_<step>.json, its config)")
        raise CheckpointError(f"{path}: no model_<step>.pt files in this directory")
    step = steps[-1] if model_step is None else int(model_step)
    if step not in steps:
        raise CheckpointError(f"{path}: no model file for step {step} (steps present: {steps})")
    return CheckpointChoice(kind, path, step, tokenizer_dir=_tokenizer_dir(path))


def _from_transformers(folder: Path, model_step: int | None, origin: str | None = None) -> CheckpointChoice:
    """A transformers NanoChat folder, converted (or its earlier conversion reused)."""
    if model_step not in (None, 0):
        raise CheckpointError(f"{origin or folder}: a transformers model has one step (0); --model_step {model_step} "
                              f"does not apply")
    converted = convert_folder(folder)
    return CheckpointChoice(TRANSFORMERS, converted, 0, tokenizer_dir=converted / "tokenizer",
                            origin=origin or str(folder))


def looks_local(spec: str, finetuned_dir: str | Path | None = None) -> bool:
    """Whether `spec` can only mean a local path: it exists; it starts with / . ~ or holds a
    backslash or ".."; it ends like a file (FILE_SUFFIXES); or its first part is an existing
    folder, this project's folder names (LOCAL_FOLDER_NAMES) or `finetuned_dir` (a typo in the
    rest of a path, or a run not trained yet)."""
    first = spec.split("/")[0]
    local_names = {*LOCAL_FOLDER_NAMES, *([Path(finetuned_dir).name] if finetuned_dir else [])}
    return (spec.startswith(("/", ".", "~")) or "\\" in spec or ".." in spec or spec.lower().endswith(FILE_SUFFIXES)
            or first in local_names or Path(spec).exists() or Path(first).is_dir())


def is_repo_id(spec: str, finetuned_dir: str | Path | None = None) -> bool:
    """owner/name that cannot be a local path (looks_local): what goes to the hub."""
    return bool(REPO_ID.match(spec)) and not looks_local(spec, finetuned_dir)


def _from_hub(repo_id: str, base: Path, model_step: int | None) -> CheckpointChoice:
    """Download a hub repo's transformers files into <base>/hf_models/owner--name/ and convert them."""
    local_dir = base / HUB_MODELS_DIR / repo_id.replace("/", "--")
    try:
        snapshot_download(repo_id=repo_id, allow_patterns=list(HUB_FILES), local_dir=str(local_dir))
    except Exception as e:  # offline, no such repo, no access: one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if all((local_dir / name).is_file() for name in SOURCE_FILES):
            print(f"note: could not reach the hub for {repo_id} ({type(e).__name__}); using the copy downloaded "
                  f"earlier in {local_dir}", file=sys.stderr)
        else:
            raise CheckpointError(f"{repo_id}: neither a local path nor a Hugging Face hub repo that could be "
                                  f"downloaded ({type(e).__name__}: {reason[:160]}); check the path, the network "
                                  f"or, for a private repo, `hf auth login`") from e
    if not is_transformers_folder(local_dir):
        raise CheckpointError(f"{repo_id}: the hub repo has no config.json with model_type nanochat (not a "
                              f"transformers NanoChat model; nanochat's own checkpoints: python -m sciassist.hub)")
    return _from_transformers(local_dir, model_step, origin=repo_id)


def parse_spec(spec: str) -> tuple[str, str | None, int | None] | None:
    """"source[:tag[:step]]" -> (source, tag, step); None when `spec` does not have that form."""
    parts = str(spec).split(":")
    source = SOURCE_ALIASES.get(parts[0], parts[0])
    if source not in SOURCE_DIRS or len(parts) > 3:
        return None
    tag = parts[1] if len(parts) > 1 and parts[1] else None
    step = None
    if len(parts) > 2 and parts[2]:
        if not parts[2].isdigit():
            raise CheckpointError(f"{spec!r}: the step must be a number, got {parts[2]!r}")
        step = int(parts[2])
    return source, tag, step


def _in_base_dir(base: Path, source: str, model_tag: str | None, step: int | None) -> CheckpointChoice:
    checkpoint_dir, step = find_checkpoint(base, source, model_tag=model_tag, step=step)
    return CheckpointChoice("base_dir", Path(checkpoint_dir), int(step), source=SOURCE_ALIASES.get(source, source),
                            base_dir=base)


def choose_checkpoint(
    checkpoint: str | Path | None = None,
    source: str | None = None,
    model_tag: str | None = None,
    model_step: int | None = None,
    base_dir: str | Path | None = None,
    finetuned_dir: str | Path | None = DEFAULT_FINETUNED_DIR,
) -> CheckpointChoice:
    """Decide which checkpoint to load (the module docstring gives the order).

    finetuned_dir None: never pick a fine-tuned run by itself (training starts from a base
    dir's model unless told otherwise). Raises CheckpointError saying where it looked."""
    base = Path(base_dir).expanduser() if base_dir is not None else default_base_dir()
    if checkpoint is not None:
        if source is not None or model_tag is not None:
            raise CheckpointError("give either --checkpoint or --source/--model_tag, not both")
        path = Path(checkpoint).expanduser()
        if str(checkpoint) == NEWEST and not path.exists():
            found = latest_finetuned(finetuned_dir or DEFAULT_FINETUNED_DIR)
            if found is None:
                raise CheckpointError(f"{NEWEST}: no fine-tuned run in {finetuned_dir or DEFAULT_FINETUNED_DIR}/ "
                                      f"(train one with make finetune, or name the run's folder)")
            return _in_folder(found[0], found[1] if model_step is None else model_step, kind="finetuned")
        if path.is_dir() and not model_steps(path) and is_transformers_folder(path):
            return _from_transformers(path, model_step)
        spec = None if path.exists() else parse_spec(str(checkpoint))
        if spec is None:
            if is_repo_id(str(checkpoint), finetuned_dir):
                return _from_hub(str(checkpoint), base, model_step)
            return _in_folder(path, model_step)
        spec_source, spec_tag, spec_step = spec
        if model_step is not None and spec_step is not None and model_step != spec_step:
            raise CheckpointError(f"{checkpoint!r}: --model_step {model_step} disagrees with the step it names")
        return _in_base_dir(base, spec_source, spec_tag, spec_step if spec_step is not None else model_step)

    looked = []
    if source is None and model_tag is None and finetuned_dir is not None:
        found = latest_finetuned(finetuned_dir)
        if found is not None:
            run_dir, step = found
            return _in_folder(run_dir, step if model_step is None else model_step, kind="finetuned")
        looked.append(f"{finetuned_dir}/*/model_*.pt (no fine-tuned run)")

    for name in (source,) if source is not None else FALLBACK_SOURCES:
        try:
            return _in_base_dir(base, name, model_tag, model_step)
        except CheckpointError as err:
            if source is not None:
                raise  # the user asked for this source: its own message is the most precise
            looked.append(f"{name} in {base}: {err}")
    raise CheckpointError(
        "no checkpoint found. Looked at:\n  - "
        + "\n  - ".join(looked)
        + "\nTrain one (make finetune), download one (make download), or pass --checkpoint DIR / --base_dir DIR."
    )


def load_choice(choice: CheckpointChoice, device="auto") -> LoadedModel:
    """The weights and tokenizer of a choice, on `device` (see common.resolve_device), in eval mode."""
    model, tokenizer, meta = load_model(choice.checkpoint_dir, step=choice.step, device=resolve_device(device),
                                        tokenizer_dir=choice.tokenizer_dir)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, meta=dict(meta or {}), choice=choice)


def resolve_model(checkpoint=None, source=None, model_tag=None, model_step=None, base_dir=None,
                  finetuned_dir=DEFAULT_FINETUNED_DIR, device="auto") -> LoadedModel:
    """choose_checkpoint + load_choice: the model the user most likely means, loaded."""
    choice = choose_checkpoint(checkpoint, source, model_tag, model_step, base_dir, finetuned_dir)
    return load_choice(choice, device=device)


def resolve_from_settings(settings: CheckpointSettings) -> LoadedModel:
    """resolve_model for a command whose settings extend CheckpointSettings."""
    return resolve_model(settings.checkpoint, settings.source, settings.model_tag, settings.model_step,
                         settings.base_dir, settings.finetuned_dir, settings.device)

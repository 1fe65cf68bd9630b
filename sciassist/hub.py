"""
Fetch a published nanochat checkpoint from the Hugging Face hub into nanochat's layout.

    python -m sciassist.hub --model d20 [--base_dir DIR]      (what `make download` runs)

The hub repos keep four files at their root; nanochat (and nanochat.checkpoint) expect
them under a base dir ($NANOCHAT_BASE_DIR, default ~/.cache/nanochat):

    <base_dir>/tokenizer/tokenizer.pkl
    <base_dir>/tokenizer/token_bytes.pt
    <base_dir>/chatsft_checkpoints/<tag>/model_000650.pt
    <base_dir>/chatsft_checkpoints/<tag>/meta_000650.json

Sizes come from the hub's file listing; a file already in place with the right size is
skipped, one with the wrong size is fetched again, and every download is size-checked
before it is moved into place. Downloads go to <base_dir>/.hub_downloads/ first (same
disk, so the final move is a rename, not a 7 GB copy) and only complete, verified files
ever appear in the layout. Within a run the hub client retries and resumes after
transient network errors; a run that is killed starts the unfinished file again.
"""

import os
import re
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_session, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from nanochat.checkpoint import default_base_dir
from sciassist.common import print_error, setting, settings_from_namespace, settings_parser

STAGING_DIR = ".hub_downloads"
# One request to see whether the hub answers at all: its clients retry a refused or timed-out
# connection for about 23 s (five retries, waiting 1, 2, 4, 8, 8 s) before they give up.
PROBE_TIMEOUT_S = 5


@dataclass(frozen=True)
class HubModel:
    name: str  # what --model takes
    repo_id: str
    model_tag: str  # the folder under chatsft_checkpoints/
    step: int
    source_dir: str = "chatsft_checkpoints"  # both published models are chat-SFT checkpoints


MODELS = {
    "d20": HubModel("d20", "sdobson/nanochat", "d20", 650),
    "d32": HubModel("d32", "karpathy/nanochat-d32", "d32", 650),
}


@dataclass
class PlannedFile:
    remote_path: str  # path inside the hub repo
    local_path: Path  # where nanochat looks for it
    size: int | None  # bytes, from the hub's listing (None: the hub did not say)


class HubError(Exception):
    """A download that cannot go ahead; the message says what to do."""


class HubOfflineError(HubError):
    """The hub cannot be reached (no network, HF_HUB_OFFLINE=1, wrong HF_ENDPOINT)."""


def _connection_errors():
    """Exception classes that mean "could not reach the hub".

    huggingface_hub < 1.0 talks through `requests`, 1.x through `httpx`, 2.x through
    `httpx2`; its API calls let those libraries' transport errors through unwrapped, while
    hf_hub_download turns them into LocalEntryNotFoundError. Only what is installed is
    listed, and HTTP answers from the hub (401, 404, ...) are deliberately not in here.
    """
    errors = [OfflineModeIsEnabled, LocalEntryNotFoundError, ConnectionError, TimeoutError, socket.gaierror]
    for module_name, class_names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                                     ("requests", ("ConnectionError", "Timeout"))):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        errors.extend(getattr(module, n) for n in class_names if hasattr(module, n))
    return tuple(errors)


CONNECTION_ERRORS = _connection_errors()


def hub_unreachable(endpoint=None, timeout_s=PROBE_TIMEOUT_S):
    """Why the hub at `endpoint` (default: $HF_ENDPOINT or huggingface.co) cannot be reached, or None
    when it answers. One HEAD request through the hub client's own session (its proxies and
    certificates), no retries; any HTTP answer, even an error status, means it can be reached."""
    endpoint = endpoint or constants.ENDPOINT
    try:
        get_session().head(endpoint, timeout=timeout_s)
    except CONNECTION_ERRORS as e:
        return f"{type(e).__name__}: {e}"
    return None


def expected_layout(model, base_dir):
    """[(file name in the hub repo, local path)] for the four files of `model`."""
    base_dir = Path(base_dir)
    checkpoint_dir = base_dir / model.source_dir / model.model_tag
    return [
        ("tokenizer.pkl", base_dir / "tokenizer" / "tokenizer.pkl"),
        ("token_bytes.pt", base_dir / "tokenizer" / "token_bytes.pt"),
        (f"model_{model.step:06d}.pt", checkpoint_dir / f"model_{model.step:06d}.pt"),
        (f"meta_{model.step:06d}.json", checkpoint_dir / f"meta_{model.step:06d}.json"),
    ]


def _layout_text(model, base_dir):
    lines = [f"  {local}   <- {model.repo_id}: {remote}" for remote, local in expected_layout(model, base_dir)]
    return "\n".join(lines)


def offline_message(model, base_dir, error, endpoint=None):
    endpoint = endpoint or constants.ENDPOINT
    return (
        f"no connection to the Hugging Face hub ({endpoint}): {type(error).__name__}: {error}\n"
        f"Set HF_ENDPOINT to a hub mirror you can reach (and unset HF_HUB_OFFLINE), or copy the files "
        f"of https://huggingface.co/{model.repo_id} into {base_dir} by hand in this layout:\n"
        f"{_layout_text(model, base_dir)}"
    )


def remote_file_sizes(repo_id, revision="main", endpoint=None):
    """{path in repo: size in bytes (or None)} from one model_info(files_metadata=True) call."""
    info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision, files_metadata=True)
    return {sibling.rfilename: sibling.size for sibling in (info.siblings or [])}


def _find_remote(name, remote_sizes):
    """The repo path of `name`: at the root if there, else the shallowest path ending in /name
    (a repo that keeps nanochat's folders, like the workshop layout)."""
    if name in remote_sizes:
        return name
    nested = sorted((p for p in remote_sizes if p.endswith("/" + name)), key=lambda p: (p.count("/"), p))
    return nested[0] if nested else None


def _resolve_step(model, remote_sizes):
    """The published step, else the latest step that has both model and meta files (a repo
    that re-published a later step should still download, with a note)."""
    model_name, meta_name = f"model_{model.step:06d}.pt", f"meta_{model.step:06d}.json"
    if _find_remote(model_name, remote_sizes) and _find_remote(meta_name, remote_sizes):
        return model.step
    steps = []
    for path in remote_sizes:
        m = re.fullmatch(r"model_(\d+)\.pt", path.rsplit("/", 1)[-1])
        if m and _find_remote(f"meta_{m.group(1)}.json", remote_sizes):
            steps.append(int(m.group(1)))
    if not steps:
        listing = ", ".join(sorted(remote_sizes)) or "no files"
        raise HubError(f"{model.repo_id} has no model_<step>.pt + meta_<step>.json pair (it has: {listing})")
    step = max(steps)
    print(f"note: {model.repo_id} has no step {model.step}; using step {step}")
    return step


def plan_download(model, base_dir, remote_sizes):
    """Match the repo's files to their places in the layout. Returns [PlannedFile]."""
    step = _resolve_step(model, remote_sizes)
    if step != model.step:
        model = HubModel(model.name, model.repo_id, model.model_tag, step, model.source_dir)
    planned = []
    for name, local_path in expected_layout(model, base_dir):
        remote = _find_remote(name, remote_sizes)
        if remote is None:
            listing = ", ".join(sorted(remote_sizes)) or "no files"
            raise HubError(f"{model.repo_id} has no file {name} (it has: {listing})")
        planned.append(PlannedFile(remote, Path(local_path), remote_sizes[remote]))
    return planned


def is_complete(planned):
    """The local file exists and has the hub's size (any size when the hub gave none)."""
    path = planned.local_path
    if not path.is_file():
        return False
    return planned.size is None or path.stat().st_size == planned.size


def _human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def _check_free_space(todo, base_dir):
    # fail before the first byte rather than after an hour of downloading the d32 weights
    needed = sum(p.size or 0 for p in todo)
    free = shutil.disk_usage(base_dir).free
    if needed > free:
        raise HubError(f"not enough disk space in {base_dir}: the download needs {_human(needed)}, "
                       f"{_human(free)} is free; free some space or choose another --base_dir")


def _fetch(model, planned, staging, revision, endpoint):
    """Download one file into the staging folder, check its size, move it into place."""
    path = Path(hf_hub_download(model.repo_id, planned.remote_path, revision=revision,
                                local_dir=staging, endpoint=endpoint))
    got = path.stat().st_size
    if planned.size is not None and got != planned.size:
        path.unlink(missing_ok=True)
        raise HubError(f"{model.repo_id}: {planned.remote_path} arrived with {got} bytes, the hub lists "
                       f"{planned.size}; the partial file was removed, run the download again")
    planned.local_path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, planned.local_path)  # same disk: a rename, and atomic


def download_model(name, base_dir=None, revision="main", endpoint=None):
    """
    Make sure the four files of published model `name` (d20|d32) are in `base_dir`
    (default: default_base_dir()) in nanochat's layout. Returns [local Path] in the order
    tokenizer.pkl, token_bytes.pt, model, meta. Raises HubOfflineError when the hub cannot
    be reached and the files are not already in place, HubError for anything else.
    """
    if name not in MODELS:
        raise HubError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    model = MODELS[name]
    base_dir = Path(base_dir).expanduser() if base_dir is not None else default_base_dir()
    base_dir.mkdir(parents=True, exist_ok=True)

    try:
        remote_sizes = remote_file_sizes(model.repo_id, revision, endpoint)
    except CONNECTION_ERRORS as e:
        # Files in the layout were either verified by an earlier run (partial downloads never
        # leave the staging folder) or put there by hand, so they are usable without the hub.
        local = [path for _, path in expected_layout(model, base_dir)]
        if all(p.is_file() and p.stat().st_size > 0 for p in local):
            print(f"hub unreachable ({type(e).__name__}); the {name} files are already in {base_dir}, "
                  "using them unverified")
            return local
        raise HubOfflineError(offline_message(model, base_dir, e, endpoint)) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise HubError(f"{model.repo_id}@{revision} not found on the hub ({type(e).__name__}); "
                       f"check the name and revision, or HF_TOKEN if the repo is private") from e
    except HfHubHTTPError as e:
        raise HubError(f"the hub refused the file listing of {model.repo_id}: {e}") from e

    planned = plan_download(model, base_dir, remote_sizes)
    todo = []
    for i, p in enumerate(planned, 1):
        where = p.local_path.relative_to(base_dir)
        if is_complete(p):
            print(f"[{i}/{len(planned)}] {where}: complete ({_human(p.local_path.stat().st_size)}), skipped")
            continue
        if p.local_path.exists():
            print(f"[{i}/{len(planned)}] {where}: {p.local_path.stat().st_size} bytes, "
                  f"the hub lists {p.size}; fetching again")
        todo.append(p)
    if todo:
        _check_free_space(todo, base_dir)
    staging = base_dir / STAGING_DIR / model.repo_id.replace("/", "--")
    for p in todo:
        size = _human(p.size) if p.size is not None else "size unknown"
        print(f"downloading {model.repo_id}: {p.remote_path} ({size}) -> {p.local_path}")
        try:
            _fetch(model, p, staging, revision, endpoint)  # huggingface_hub draws the progress bar
        except CONNECTION_ERRORS as e:
            raise HubOfflineError(offline_message(model, base_dir, e, endpoint) +
                                  "\nFiles already complete are kept; run again to fetch the rest.") from e
        except EntryNotFoundError as e:
            raise HubError(f"{model.repo_id}: {p.remote_path} disappeared from the hub during the download: {e}") from e
    if todo:
        shutil.rmtree(base_dir / STAGING_DIR, ignore_errors=True)  # only small hub metadata is left in it
    return [p.local_path for p in planned]


@dataclass
class DownloadSettings:
    model: str = setting("d20", "d20: sdobson/nanochat (561M); d32: karpathy/nanochat-d32 (1.9B)",
                         choices=sorted(MODELS))
    base_dir: str | None = setting(None, "nanochat base dir (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    revision: str = setting("main", "hub branch, tag or commit")


def main(argv=None):
    parser = settings_parser(DownloadSettings, "python -m sciassist.hub",
                             "Download a published nanochat checkpoint into nanochat's layout.")
    args = settings_from_namespace(DownloadSettings, parser.parse_args(argv))
    base_dir = Path(args.base_dir).expanduser() if args.base_dir else default_base_dir()
    try:
        download_model(args.model, base_dir, revision=args.revision)
    except HubError as e:
        return print_error(e)  # one `error:` line, exit code 2
    model = MODELS[args.model]
    print(f"{args.model} is ready in {base_dir} ({model.source_dir}/{model.model_tag}); "
          f"load it with nanochat.checkpoint.load_model_from({str(base_dir)!r}, 'sft', {model.model_tag!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

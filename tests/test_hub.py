"""sciassist.hub against a local stand-in of the Hugging Face hub.

The two huggingface_hub calls hub.py makes (HfApi().model_info for sizes, hf_hub_download
for bytes) are replaced by fakes that serve files from a tmp "remote" folder; the offline
tests also run the real client with offline mode on or a closed port as endpoint, so they
need no network either.
"""

import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoSibling

from sciassist import hub

# distinct sizes so a file put in the wrong place is caught by the size check
REMOTE_FILES = {
    "tokenizer.pkl": b"P" * 300,
    "token_bytes.pt": b"T" * 120,
    "model_000650.pt": b"M" * 5000,
    "meta_000650.json": b'{"model_config": {}}',
    "README.md": b"# readme",
}


class FakeHub:
    """Serves files of a tmp folder the way the two huggingface_hub calls would."""

    def __init__(self, root, files=REMOTE_FILES, listed_sizes=None):
        self.root = Path(root)
        for name, data in files.items():
            path = self.root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        self.listed_sizes = listed_sizes or {}  # lie about a size to simulate a bad transfer
        self.downloads = []
        self.info_error = None
        self.download_error = None

    def model_info(self, repo_id, revision=None, files_metadata=False):
        if self.info_error is not None:
            raise self.info_error
        assert files_metadata, "sizes are only listed with files_metadata=True"
        siblings = [RepoSibling(rfilename=p.relative_to(self.root).as_posix(),
                                size=self.listed_sizes.get(p.name, p.stat().st_size))
                    for p in sorted(self.root.rglob("*")) if p.is_file()]
        return SimpleNamespace(siblings=siblings)

    def hf_hub_download(self, repo_id, filename, revision=None, local_dir=None, endpoint=None):
        if self.download_error is not None:
            raise self.download_error
        self.downloads.append(filename)
        dest = Path(local_dir) / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.root / filename, dest)
        return str(dest)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "remote")
    monkeypatch.setattr(hub, "HfApi", lambda endpoint=None: fake)
    monkeypatch.setattr(hub, "hf_hub_download", fake.hf_hub_download)
    return fake


def layout(base_dir, tag="d20"):
    return {
        "tokenizer.pkl": base_dir / "tokenizer" / "tokenizer.pkl",
        "token_bytes.pt": base_dir / "tokenizer" / "token_bytes.pt",
        "model_000650.pt": base_dir / "chatsft_checkpoints" / tag / "model_000650.pt",
        "meta_000650.json": base_dir / "chatsft_checkpoints" / tag / "meta_000650.json",
    }


def test_models_point_at_the_published_repos():
    assert hub.MODELS["d20"].repo_id == "sdobson/nanochat"
    assert hub.MODELS["d32"].repo_id == "karpathy/nanochat-d32"
    assert {m.step for m in hub.MODELS.values()} == {650}


def test_default_base_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nc"))
    assert hub.default_base_dir() == tmp_path / "nc"
    monkeypatch.delenv("NANOCHAT_BASE_DIR")
    assert hub.default_base_dir() == Path.home() / ".cache" / "nanochat"


def test_expected_layout_is_nanochats(tmp_path):
    got = dict(hub.expected_layout(hub.MODELS["d32"], tmp_path))
    assert got == layout(tmp_path, "d32")


def test_remote_file_sizes(fake_hub):
    sizes = hub.remote_file_sizes("sdobson/nanochat")
    assert sizes == {name: len(data) for name, data in REMOTE_FILES.items()}


def test_download_writes_the_layout(fake_hub, tmp_path, capsys):
    base = tmp_path / "base"
    paths = hub.download_model("d20", base)
    expected = layout(base)
    assert paths == list(expected.values())
    for name, path in expected.items():
        assert path.read_bytes() == REMOTE_FILES[name]
    assert sorted(fake_hub.downloads) == sorted(expected)  # README.md not fetched
    assert not (base / hub.STAGING_DIR).exists()  # staging cleaned up after success


def test_complete_files_are_skipped(fake_hub, tmp_path, capsys):
    base = tmp_path / "base"
    hub.download_model("d20", base)
    fake_hub.downloads.clear()
    capsys.readouterr()
    hub.download_model("d20", base)
    assert fake_hub.downloads == []
    assert capsys.readouterr().out.count("skipped") == 4


def test_wrong_size_file_is_fetched_again(fake_hub, tmp_path):
    base = tmp_path / "base"
    model_file = layout(base)["model_000650.pt"]
    model_file.parent.mkdir(parents=True)
    model_file.write_bytes(b"M" * 100)  # an interrupted copy
    hub.download_model("d20", base)
    assert model_file.read_bytes() == REMOTE_FILES["model_000650.pt"]
    assert "model_000650.pt" in fake_hub.downloads


def test_is_complete(tmp_path):
    path = tmp_path / "f.bin"
    planned = hub.PlannedFile("f.bin", path, 3)
    assert not hub.is_complete(planned)
    path.write_bytes(b"abc")
    assert hub.is_complete(planned)
    path.write_bytes(b"ab")
    assert not hub.is_complete(planned)
    assert hub.is_complete(hub.PlannedFile("f.bin", path, None))


def test_size_mismatch_after_download_is_an_error(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "remote", listed_sizes={"model_000650.pt": 9999})
    monkeypatch.setattr(hub, "HfApi", lambda endpoint=None: fake)
    monkeypatch.setattr(hub, "hf_hub_download", fake.hf_hub_download)
    base = tmp_path / "base"
    with pytest.raises(hub.HubError, match=r"model_000650.pt arrived with 5000 bytes, the hub lists 9999"):
        hub.download_model("d20", base)
    # a bad file never reaches the place nanochat loads from
    assert not layout(base)["model_000650.pt"].exists()


def test_plan_finds_files_in_a_nested_layout_and_a_later_step(tmp_path, capsys):
    # a repo that keeps the workshop's folders and re-published step 700
    sizes = {
        "models/pretrained/tokenizer/tokenizer.pkl": 1,
        "models/pretrained/tokenizer/token_bytes.pt": 2,
        "models/pretrained/chatsft_checkpoints/d32/model_000700.pt": 3,
        "models/pretrained/chatsft_checkpoints/d32/meta_000700.json": 4,
        "old/model_000500.pt": 5,  # no meta: not a candidate
    }
    planned = hub.plan_download(hub.MODELS["d32"], tmp_path, sizes)
    assert [(p.remote_path, p.size) for p in planned] == sorted(
        [(k, v) for k, v in sizes.items() if not k.startswith("old/")], key=lambda kv: kv[1])
    assert planned[2].local_path == tmp_path / "chatsft_checkpoints" / "d32" / "model_000700.pt"
    assert "using step 700" in capsys.readouterr().out


def test_plan_names_what_the_repo_has_when_a_file_is_missing(tmp_path):
    sizes = {"model_000650.pt": 1, "meta_000650.json": 2, "tokenizer.pkl": 3}
    with pytest.raises(hub.HubError, match=r"has no file token_bytes.pt \(it has: meta_000650.json, model_000650.pt"):
        hub.plan_download(hub.MODELS["d20"], tmp_path, sizes)
    with pytest.raises(hub.HubError, match="no model_<step>.pt"):
        hub.plan_download(hub.MODELS["d20"], tmp_path, {"tokenizer.pkl": 1})


@pytest.mark.parametrize("error", [
    httpx2.ConnectError("[Errno -2] Name or service not known"),  # what 2.x's API calls raise
    OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled."),
    ConnectionError("connection reset"),  # requests.ConnectionError derives from it on 0.x
])
def test_offline_listing_gives_the_manual_layout(fake_hub, tmp_path, error):
    fake_hub.info_error = error
    base = tmp_path / "base"
    with pytest.raises(hub.HubOfflineError) as info:
        hub.download_model("d20", base)
    message = str(info.value)
    assert message.startswith("no connection to the Hugging Face hub")
    assert "HF_ENDPOINT" in message
    for name, path in layout(base).items():
        assert f"{path}   <- sdobson/nanochat: {name}" in message
    assert fake_hub.downloads == []


def test_offline_during_download_keeps_complete_files(fake_hub, tmp_path):
    base = tmp_path / "base"
    hub.download_model("d20", base)
    layout(base)["model_000650.pt"].unlink()
    # what hf_hub_download raises once its retries to reach the hub are used up
    fake_hub.download_error = LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
    with pytest.raises(hub.HubOfflineError, match="run again to fetch the rest"):
        hub.download_model("d20", base)
    assert layout(base)["tokenizer.pkl"].read_bytes() == REMOTE_FILES["tokenizer.pkl"]


def test_offline_with_every_file_in_place_succeeds(fake_hub, tmp_path, capsys):
    base = tmp_path / "base"
    hub.download_model("d20", base)
    fake_hub.info_error = httpx2.ConnectError("down")
    assert hub.download_model("d20", base) == list(layout(base).values())
    assert "using them unverified" in capsys.readouterr().out


def test_real_client_in_offline_mode(tmp_path, monkeypatch):
    # no fakes: the installed huggingface_hub with HF_HUB_OFFLINE on
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubOfflineError, match="OfflineModeIsEnabled"):
        hub.download_model("d32", tmp_path)


def test_real_client_with_an_unreachable_endpoint(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.raises(hub.HubOfflineError) as info:
        hub.download_model("d20", tmp_path, endpoint=endpoint)
    assert f"no connection to the Hugging Face hub ({endpoint})" in str(info.value)
    assert str(tmp_path / "tokenizer" / "tokenizer.pkl") in str(info.value)


def test_offline_message(tmp_path):
    message = hub.offline_message(hub.MODELS["d20"], tmp_path, TimeoutError("timed out"), "https://mirror.example")
    assert "(https://mirror.example): TimeoutError: timed out" in message
    assert message.count("<- sdobson/nanochat:") == 4


def test_missing_repo_is_not_reported_as_offline(fake_hub, tmp_path):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/x")
    fake_hub.info_error = RepositoryNotFoundError("404", response=httpx2.Response(404, request=request))
    with pytest.raises(hub.HubError, match="not found on the hub") as info:
        hub.download_model("d20", tmp_path)
    assert not isinstance(info.value, hub.HubOfflineError)


def test_not_enough_disk_space(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: SimpleNamespace(free=10))
    with pytest.raises(hub.HubError, match="not enough disk space"):
        hub.download_model("d20", tmp_path)
    assert fake_hub.downloads == []


def test_unknown_model(tmp_path):
    with pytest.raises(hub.HubError, match="unknown model 'd99'"):
        hub.download_model("d99", tmp_path)


def test_main(fake_hub, tmp_path, capsys):
    base = tmp_path / "base"
    assert hub.main(["--model", "d32", "--base_dir", str(base)]) == 0
    assert "d32 is ready in" in capsys.readouterr().out
    assert layout(base, "d32")["model_000650.pt"].is_file()
    fake_hub.info_error = OfflineModeIsEnabled("offline")
    shutil.rmtree(base)
    assert hub.main(["--model", "d32", "--base_dir", str(base)]) == 2
    assert capsys.readouterr().err.startswith("error: no connection to the Hugging Face hub")

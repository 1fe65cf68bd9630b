"""sciassist.hf_import through the resolver: a transformers NanoChat folder (written by sciassist.export)
or a hub repo id of one loads as the same model, tokenizer and first training step as the original."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanochat.checkpoint import CheckpointError, load_model
from sciassist import checkpoints as checkpoints_module
from sciassist import export as export_module
from sciassist.checkpoints import choose_checkpoint, is_repo_id, load_choice
from sciassist.data.conversations import write_conversations
from sciassist.export import hf_state_dict
from sciassist.export import main as export_main
from sciassist.hf_import import CACHE_NAME, HUB_FILES, MARKER, convert_folder, weight_names
from sciassist.train.loop import train
from tests.conftest import nontrivial_gpt, write_published_checkpoint
from tests.test_export import TEXTS
from tests.train.test_train import arithmetic_conversations, resume_weights, tiny_settings

CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 x 6?"}, {"role": "assistant", "content": "The correct answer is 42."}],
    [{"role": "system", "content": "You are a helpful science tutor."},
     {"role": "user", "content": "Which is a solid?\n\nA. water\nB. rock"},
     {"role": "assistant", "content": [{"type": "text", "text": "Let me check. "},
                                       {"type": "python", "text": "print('rock')"},
                                       {"type": "python_output", "text": "rock"},
                                       {"type": "text", "text": "The correct answer is B."}]}],
    [{"role": "user", "content": "naïve <|user_end|> café 😀"}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "again?"}, {"role": "assistant", "content": "Yes."}],
]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tiny_tokenizer):
    """nanochat's layout with non-trivial weights (as tests/test_export.py builds it)."""
    base_dir = tmp_path_factory.mktemp("import_base")
    tiny_tokenizer.save(base_dir / "tokenizer")
    model = nontrivial_gpt(tiny_tokenizer.get_vocab_size(), seed=11, projection_std=0.2)
    write_published_checkpoint(base_dir / "base_checkpoints" / "d2", model, step=0)
    return base_dir


@pytest.fixture(scope="module")
def checkpoint_dir(base_dir):
    return base_dir / "base_checkpoints" / "d2"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, checkpoint_dir):
    out_dir = tmp_path_factory.mktemp("hf") / "sciassist-d2"
    assert export_main(["--checkpoint", str(checkpoint_dir), "--out_dir", str(out_dir)]) == 0
    return out_dir


@pytest.fixture(scope="module")
def ours(checkpoint_dir):
    model, tokenizer, _ = load_model(checkpoint_dir, device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def imported(hf_dir):
    choice = choose_checkpoint(str(hf_dir))
    return choice, load_choice(choice, device="cpu")


def copy_of(hf_dir, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(hf_dir, folder, ignore=shutil.ignore_patterns(CACHE_NAME))
    return folder


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ----------------------------------------------------------------------------- the choice and the files

def test_a_transformers_folder_is_converted_into_nanochats_layout(hf_dir, imported):
    choice, loaded = imported
    assert choice.kind == "transformers" and choice.step == 0
    assert choice.checkpoint_dir == hf_dir / CACHE_NAME and choice.name == "sciassist-d2"
    assert choice.origin == str(hf_dir) and str(hf_dir) in choice.describe()
    files = {p.name for p in choice.checkpoint_dir.iterdir()}
    assert {"model_000000.pt", "meta_000000.json", "tokenizer", MARKER} <= files
    assert {p.name for p in (choice.checkpoint_dir / "tokenizer").iterdir()} == {"tokenizer.pkl", "token_bytes.pt"}
    assert loaded.info()["name"] == "sciassist-d2" and loaded.info()["kind"] == "transformers"
    meta = json.loads((choice.checkpoint_dir / "meta_000000.json").read_text())
    assert meta["model_config"] == {"sequence_len": 256, "vocab_size": 512, "n_layer": 2, "n_head": 2,
                                    "n_kv_head": 2, "n_embd": 64}


def test_the_conversion_is_reused_until_the_files_change(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    first = choose_checkpoint(str(folder)).model_file
    written = first.stat().st_mtime_ns
    assert choose_checkpoint(str(folder)).model_file.stat().st_mtime_ns == written  # reused
    os.utime(folder / "model.safetensors", ns=(written + 10**9, written + 10**9))
    assert choose_checkpoint(str(folder)).model_file.stat().st_mtime_ns != written  # converted again


def test_weights_and_logits_are_the_originals(ours, imported):
    model, tokenizer = ours
    theirs = imported[1].model
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs.state_dict()[name], tensor), name
    ids = torch.tensor([tokenizer.encode(" ".join(TEXTS[1:6]), prepend="<|bos|>")[:200]])
    with torch.no_grad():
        expected, got = model(ids), theirs(ids)
    assert expected.abs().max() > 1 and torch.equal(got, expected)  # fp32 export, a renaming: exact


def test_the_tokenizer_gives_the_same_ids(ours, imported):
    _, tokenizer = ours
    theirs = imported[1].tokenizer
    assert theirs.get_vocab_size() == tokenizer.get_vocab_size()
    assert dict(theirs.enc._mergeable_ranks) == dict(tokenizer.enc._mergeable_ranks)
    assert theirs.enc._special_tokens == tokenizer.enc._special_tokens
    assert theirs.enc._pat_str == tokenizer.enc._pat_str
    for text in TEXTS:
        assert theirs.encode(text) == tokenizer.encode(text), text
        assert theirs.decode(theirs.encode(text)) == text
    for conversation in CONVERSATIONS:
        assert theirs.render_conversation(conversation) == tokenizer.render_conversation(conversation)
        assert theirs.render_for_completion(conversation) == tokenizer.render_for_completion(conversation)
    assert torch.equal(theirs.token_bytes(), tokenizer.token_bytes())


def test_the_first_training_step_is_the_same(tmp_path, checkpoint_dir, hf_dir, one_thread):
    data = tmp_path / "arith.jsonl"
    write_conversations(data, arithmetic_conversations(40))
    weights = []
    for name, checkpoint in (("original", checkpoint_dir), ("imported", hf_dir)):
        settings = tiny_settings(tmp_path / "none", data, tmp_path / name, checkpoint=str(checkpoint),
                                 num_iterations=1, eval_every=0)
        assert train(settings)["status"] == "completed"
        weights.append(resume_weights(tmp_path / name / "run"))
    original, imported = weights
    assert original.keys() == imported.keys()
    start, _, _ = load_model(checkpoint_dir, device="cpu")
    assert not torch.equal(original["lm_head.weight"], start.lm_head.weight)  # the step changed the weights
    for name in original:
        assert torch.equal(original[name], imported[name]), name


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("field, value", [
    ("intermediate_size", 128),
    ("hidden_act", "gelu"),
    ("final_logit_softcapping", 30.0),
    ("tie_word_embeddings", True),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 500000.0}),
    ("num_hidden_layers", 0),
])
def test_a_config_nanochat_cannot_compute_is_refused_in_one_line(hf_dir, tmp_path, field, value):
    folder = copy_of(hf_dir, tmp_path)
    edit_json(folder / "config.json", **{field: value})
    with pytest.raises(CheckpointError) as caught:
        choose_checkpoint(str(folder))
    message = str(caught.value)
    assert "\n" not in message and str(folder / "config.json") in message
    assert field.split("_parameters")[0] in message
    assert not (folder / CACHE_NAME).exists()


def test_extra_or_missing_tensors_are_refused(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the tensors are not a NanoChat model's: "
                                              r"missing \['lm_head.weight'\], extra \['model.layers.0.self_attn"):
        choose_checkpoint(str(folder))


def test_a_wrong_shape_is_refused(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.fc1.weight"] = torch.zeros(128, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor shapes do not match config.json: "
                                              r"model.layers.1.mlp.fc1.weight \[128, 64\]"):
        choose_checkpoint(str(folder))


def test_a_tokenizer_with_another_split_regex_or_specials_is_refused(hf_dir, tmp_path):
    folder = copy_of(hf_dir, tmp_path)
    original = (folder / "tokenizer.json").read_text()
    data = json.loads(original)
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: pre_tokenizer's split regex is not nanochat's"):
        choose_checkpoint(str(folder))
    data = json.loads(original)
    data["added_tokens"][0]["content"] = "<|endoftext|>"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"added_tokens must be nanochat's special tokens"):
        choose_checkpoint(str(folder))


def test_a_folder_of_neither_layout_gets_the_resolvers_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no model_<step>.pt files in this directory"):
        choose_checkpoint(str(tmp_path))


def test_a_folder_with_both_layouts_is_nanochats(hf_dir, tmp_path, checkpoint_dir):
    folder = copy_of(hf_dir, tmp_path)
    for name in ("model_000000.pt", "meta_000000.json"):
        shutil.copy(checkpoint_dir / name, folder / name)
    choice = choose_checkpoint(str(folder))
    assert choice.kind == "checkpoint" and choice.checkpoint_dir == folder


# ----------------------------------------------------------------------------- hub repo ids

def test_repo_ids_are_told_from_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert is_repo_id("you/sciassist-d20") and is_repo_id("karpathy/nanochat-d32")
    assert not is_repo_id("runs/typo")  # a path whose folder exists: the folder error, not a download
    assert not is_repo_id("a/b/c") and not is_repo_id("sft:d20") and not is_repo_id("../x")


def test_a_hub_repo_id_is_downloaded_then_imported(hf_dir, tmp_path, monkeypatch, ours):
    calls = []

    def fake_download(repo_id, allow_patterns, local_dir, **kwargs):
        calls.append((repo_id, sorted(allow_patterns), kwargs))
        for name in allow_patterns:
            if (hf_dir / name).is_file():
                Path(local_dir).mkdir(parents=True, exist_ok=True)
                shutil.copy(hf_dir / name, Path(local_dir) / name)
        return local_dir

    monkeypatch.setattr(checkpoints_module, "snapshot_download", fake_download)
    choice = choose_checkpoint("you/sciassist-d2", base_dir=tmp_path)
    assert calls == [("you/sciassist-d2", sorted(HUB_FILES), {})]
    assert sorted(HUB_FILES) == sorted(["config.json", "model.safetensors", "tokenizer.json",
                                        "tokenizer_config.json", "generation_config.json"])
    local_dir = tmp_path / "hf_models" / "you--sciassist-d2"
    assert choice.kind == "transformers" and choice.checkpoint_dir == local_dir / CACHE_NAME
    assert choice.origin == "you/sciassist-d2" and choice.name == "sciassist-d2"
    loaded = load_choice(choice, device="cpu")
    assert torch.equal(loaded.model.lm_head.weight, ours[0].lm_head.weight)


def test_an_offline_hub_download_is_one_line(tmp_path, monkeypatch, hf_dir, capsys):
    def offline(**kwargs):
        raise OSError("Cannot reach https://huggingface.co: offline\nmore details")

    monkeypatch.setattr(checkpoints_module, "snapshot_download", lambda *a, **k: offline(**k))
    with pytest.raises(CheckpointError) as caught:
        choose_checkpoint("you/missing-model", base_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("you/missing-model: neither a local path nor a Hugging Face hub repo that could be "
                              "downloaded (OSError: Cannot reach https://huggingface.co: offline); check the path")
    # a copy downloaded earlier is used, with a note
    local_dir = tmp_path / "hf_models" / "you--earlier"
    local_dir.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(hf_dir / name, local_dir / name)
    assert choose_checkpoint("you/earlier", base_dir=tmp_path).kind == "transformers"
    assert "could not reach the hub for you/earlier" in capsys.readouterr().err


def test_convert_folder_names_a_missing_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nanochat"}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not exist"):
        convert_folder(tmp_path)


def test_weight_names_are_the_exports_names_turned_around():
    state = {ours: torch.full((1,), float(i)) for i, ours in enumerate(weight_names(3).values())}
    exported = hf_state_dict(state, n_layer=3)
    assert sorted(exported) == sorted(weight_names(3)) and len(exported) == 2 + 6 * 3
    assert all(torch.equal(exported[theirs], state[ours]) for theirs, ours in weight_names(3).items())
    assert export_module.weight_names is weight_names  # one definition, imported by the export
    names = weight_names(2)
    assert names["model.layers.1.self_attn.q_proj.weight"] == "transformer.h.1.attn.c_q.weight"
    assert names["model.layers.0.mlp.fc2.weight"] == "transformer.h.0.mlp.c_proj.weight"
    assert names["model.embed_tokens.weight"] == "transformer.wte.weight" and len(names) == 2 + 6 * 2

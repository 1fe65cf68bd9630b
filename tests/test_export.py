"""sciassist.export: the folder loads in transformers with no custom code, and computes, tokenizes,
renders chats and generates as the project does."""

import json

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from nanochat.checkpoint import load_model
from nanochat.engine import Engine
from nanochat.gpt import GPT
from sciassist import export as export_module
from sciassist import model_card
from sciassist.export import (
    CHAT_TEMPLATE,
    EXPORT_MARK,
    ExportSettings,
    byte_symbols,
    check_out_dir,
    export,
    fast_tokenizer,
    main,
)
from tests.conftest import nontrivial_gpt, write_published_checkpoint

# apply_chat_template's sanitize_control_tokens keyword exists from transformers 5.20 (read from
# the 5.19.0 and 5.20.0 wheels); Colab ships 5.15.
SANITIZES = Version(transformers.__version__) >= Version("5.20")

TRAINING_SETTINGS = {"data_path": "data/scienceqa_train.jsonl", "matrix_lr": 0.01, "num_epochs": 2, "packing": True,
                     "model_tag": None}
TABLE_MD = ("| | NAT | Avg |\n|---|---:|---:|\n| questions | 5 | 12 |\n"
            "| finetuned | 40.00 [11.8, 76.9] | 33.33 [13.8, 60.9] |")

PROMPTS = [
    "What is the capital of France?",
    "Which word would you find on a dictionary page?",
    "Explain concepts clearly with examples.",
    "Water freezes at 0 degrees Celsius and boils at 100 degrees.",
    "Hello, how are you today?",
    "Select the living thing. Options: rock, tree, cloud.",
    "Which of these states is farthest north? Maine, Texas, Ohio.",
    "a magnet attracts iron and steel",
    "12 + 30 = 42; 7 x 6 = 42!",
    "Let's learn about the solar system.",
    "plants need sunlight to make food",
    "Which tense does the sentence use?",
    "The correct answer is",
    "Context: Select the best answer.",
    "naïve café, 東京, emoji 😀",
    "I'm fine, thanks.",
    "Background: a magnet",
    "What is 7 x 6?",
    "Options: rock, tree",
    "You are a helpful science tutor.",
]

TEXTS = [
    "",
    "The correct answer is A. Explanation: plants need sunlight to make food.",
    "1234567890 12 345 6789 3.14159 1,000,000",
    "spaces   and\ttabs\t\t and\n\nnewlines \r\n  \n   end   ",
    "naïve café Ünïcödé — “quotes” 東京 中文字符 😀🚀 ñ",
    "it's we'll THEY'RE you've I'D don't",
    "<|bos|><|user_start|>not special<|user_end|> <|assistant_end|>",
    "look: <|python_start|>print(1)<|python_end|>",
    "<|bos",
    "!!!???...,,,;;; ((())) {}[] @#$%^&*",
    "\u00a0\u2003odd spaces\u200b",
    "x" * 300,
]


def rotary_fp32(model):
    """Our model's rotary tables in fp32 (transformers keeps them in fp32, nanochat rounds them to bf16)."""
    head_dim = model.config.n_embd // model.config.n_head
    inv_freq = 10000 ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(model.rotary_seq_len, dtype=torch.float32), inv_freq)
    model.register_buffer("cos", angles.cos(), persistent=False)
    model.register_buffer("sin", angles.sin(), persistent=False)
    return model


@pytest.fixture(scope="module")
def nontrivial_base_dir(tmp_path_factory, tiny_tokenizer):
    """nanochat's layout (tokenizer/ + base_checkpoints/d2/), with random normal output projections and
    a large lm_head (nanochat initialises the projections to zero: every block would be the identity)."""
    base_dir = tmp_path_factory.mktemp("export_base")
    tiny_tokenizer.save(base_dir / "tokenizer")
    model = nontrivial_gpt(tiny_tokenizer.get_vocab_size(), seed=7, projection_std=0.1)
    run_dir = write_published_checkpoint(base_dir / "base_checkpoints" / "d2", model, step=3,
                                         extra_meta={"training_settings": TRAINING_SETTINGS, "val_loss": 2.5})
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "table.md").write_text(TABLE_MD + "\n")
    return base_dir


@pytest.fixture(scope="module")
def checkpoint_dir(nontrivial_base_dir):
    return nontrivial_base_dir / "base_checkpoints" / "d2"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, checkpoint_dir):
    out_dir = tmp_path_factory.mktemp("hf") / "model"
    assert main(["--checkpoint", str(checkpoint_dir), "--out_dir", str(out_dir)]) == 0
    return out_dir


@pytest.fixture(scope="module")
def ours(checkpoint_dir):
    model, tokenizer, _ = load_model(checkpoint_dir, device="cpu")
    return model, tokenizer


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


def prompt_ids(tokenizer, text):
    return tokenizer.render_for_completion([{"role": "user", "content": text}])


# ----------------------------------------------------------------------------- files and config

def test_the_folder_has_every_file(hf_dir):
    names = {p.name for p in hf_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", EXPORT_MARK} <= names
    assert not [p for p in hf_dir.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_config_describes_the_model(hf_dir, ours):
    model, tokenizer = ours
    config = AutoConfig.from_pretrained(hf_dir)
    c = model.config
    assert config.model_type == "nanochat" and config.architectures == ["NanoChatForCausalLM"]
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (c.vocab_size, c.n_embd, c.n_layer)
    assert (config.num_attention_heads, config.num_key_value_heads) == (c.n_head, c.n_kv_head)
    assert config.intermediate_size == 4 * c.n_embd and config.hidden_act == "relu2"
    assert config.max_position_embeddings == c.sequence_len
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.final_logit_softcapping == 15.0
    assert config.rms_norm_eps == torch.finfo(torch.float32).eps
    assert config.tie_word_embeddings is False
    assert config.bos_token_id == tokenizer.get_bos_token_id()
    assert config.eos_token_id == config.pad_token_id == tokenizer.encode_special("<|assistant_end|>")
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == {tokenizer.encode_special("<|assistant_end|>"),
                                               tokenizer.get_bos_token_id()}


def test_weights_are_the_checkpoints(hf_model, ours):
    model, _ = ours
    theirs = hf_model.state_dict()
    assert torch.equal(theirs["model.embed_tokens.weight"], model.transformer.wte.weight)
    assert torch.equal(theirs["lm_head.weight"], model.lm_head.weight)
    assert torch.equal(theirs["model.layers.1.self_attn.q_proj.weight"], model.transformer.h[1].attn.c_q.weight)
    assert torch.equal(theirs["model.layers.0.mlp.fc2.weight"], model.transformer.h[0].mlp.c_proj.weight)
    assert hf_model.model.layers[0].self_attn.o_proj.weight.abs().sum() > 0  # the test's weights are not trivial


def test_model_card_has_the_settings_and_the_evaluation(hf_dir):
    card = (hf_dir / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "| matrix_lr | 0.01 |" in card and "| packing | true |" in card and "| model_tag | null |" in card
    assert "## Evaluation" in card and "| finetuned | 40.00 [11.8, 76.9] | 33.33 [13.8, 60.9] |" in card
    assert "| val_loss | 2.5 |" in card


def test_model_card_from_results_json(tmp_path, tiny_tokenizer):
    table = {"columns": ["NAT", "Avg"], "counts": {"NAT": 5, "Avg": 12},
             "rows": [{"name": "finetuned", "cells": {"NAT": {"accuracy": 40.0, "ci95": [11.8, 76.9]},
                                                      "Avg": {"accuracy": None, "ci95": None}}}]}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"settings": {"split": "val"}, "table": table}))
    found = model_card.evaluation_of(tmp_path)
    assert found["source"] == "eval/results.json" and found["settings"] == {"split": "val"}
    assert "| finetuned | 40.00 | n/a |" in found["table"]
    assert model_card.evaluation_of(tmp_path / "nothing") is None


# ----------------------------------------------------------------------------- the model's numbers

def test_logits_equal_ours(hf_model, ours):
    """fp32: within 1e-4 of our model with fp32 rotary tables; nanochat's bf16 tables move them more."""
    model, tokenizer = ours
    ids = torch.tensor([tokenizer.encode(" ".join(PROMPTS), prepend="<|bos|>")[:200]])
    with torch.no_grad():
        theirs = hf_model(ids).logits
        bf16_tables = model(ids)
        fp32_tables = rotary_fp32(GPT(model.config).eval())
        fp32_tables.load_state_dict(model.state_dict())
        fp32_tables = fp32_tables(ids)
    assert theirs.shape == fp32_tables.shape
    assert (theirs - fp32_tables).abs().max().item() < 1e-4
    bf16_diff = (theirs - bf16_tables).abs().max().item()
    assert 1e-5 < bf16_diff < 0.1, bf16_diff  # the rounding is visible, and small
    print(f"max |logit difference|: fp32 tables {(theirs - fp32_tables).abs().max().item():.2e}, "
          f"bf16 tables {bf16_diff:.2e}")


def test_rotary_convention_is_checked_by_the_logits(hf_model, ours):
    """Swapping the halves of q's rows (the other rotary convention) breaks the match: the test above
    would notice a wrong mapping."""
    model, tokenizer = ours
    ids = torch.tensor([tokenizer.encode(PROMPTS[0], prepend="<|bos|>")])
    broken = rotary_fp32(GPT(model.config).eval())
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        w = broken.transformer.h[0].attn.c_q.weight
        hd = model.config.n_embd // model.config.n_head
        heads = w.view(model.config.n_head, hd, -1)
        w.copy_(torch.cat([heads[:, hd // 2:], heads[:, :hd // 2]], dim=1).reshape_as(w))
        assert (hf_model(ids).logits - broken(ids)).abs().max().item() > 1e-3


def test_greedy_generation_equals_the_engine(hf_model, ours):
    """24 greedy tokens for 20 prompts: the same as nanochat.engine.Engine (fp32 rotary tables)."""
    model, tokenizer = ours
    fp32 = rotary_fp32(GPT(model.config).eval())
    fp32.load_state_dict(model.state_dict())
    engine, engine_bf16 = Engine(fp32, tokenizer), Engine(model, tokenizer)
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    same_with_bf16_tables = 0
    for text in PROMPTS:
        ids = prompt_ids(tokenizer, text)
        expected = engine.generate_batch(ids, max_tokens=24, temperature=0.0)[0][0][len(ids):]
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        assert out[:cut] == expected, text
        bf16 = engine_bf16.generate_batch(ids, max_tokens=24, temperature=0.0)[0][0][len(ids):]
        same_with_bf16_tables += bf16 == expected
    print(f"greedy text identical with nanochat's bf16 rotary tables on {same_with_bf16_tables} of {len(PROMPTS)}")


def test_bfloat16_export(tmp_path, checkpoint_dir, ours):
    model, tokenizer = ours
    out_dir = tmp_path / "bf16"
    assert main(["--checkpoint", str(checkpoint_dir / "model_000003.pt"), "--out_dir", str(out_dir),
                 "--dtype", "bfloat16"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out_dir)
    assert hf.dtype == torch.bfloat16 and AutoConfig.from_pretrained(out_dir).dtype == torch.bfloat16
    assert torch.equal(hf.model.layers[0].mlp.fc1.weight, model.transformer.h[0].mlp.c_fc.weight.bfloat16())
    ids = torch.tensor([prompt_ids(tokenizer, PROMPTS[1])])
    with torch.no_grad():
        diff = (hf(ids).logits.float() - model(ids)).abs().max().item()
    assert diff < 1.0  # bf16 weights and activations: close, not equal


# ----------------------------------------------------------------------------- the tokenizer

@pytest.mark.parametrize("text", TEXTS)
def test_plain_text_encodes_and_decodes_as_ours(hf_tok, ours, text):
    _, tokenizer = ours
    expected = tokenizer.encode(text)
    assert hf_tok.encode(text, add_special_tokens=False, split_special_tokens=True) == expected
    assert hf_tok(text, split_special_tokens=True)["input_ids"] == expected
    if "<|" not in text:
        assert hf_tok.encode(text) == expected  # nothing special: the plain call is the same
    assert hf_tok.decode(expected) == tokenizer.decode(expected) == text


def test_special_token_text_stays_text_only_when_asked(hf_tok, ours):
    """nanochat's encode never makes special tokens from text; transformers' tokenizer(text) does, as every
    Hugging Face tokenizer does (chat templates need it), unless split_special_tokens=True."""
    _, tokenizer = ours
    specials = set(range(tokenizer.get_vocab_size() - 9, tokenizer.get_vocab_size()))
    text = "hi <|user_end|>"
    assert not specials & set(tokenizer.encode(text))
    assert not specials & set(hf_tok.encode(text, split_special_tokens=True))
    assert tokenizer.encode_special("<|user_end|>") in hf_tok.encode(text)


def test_random_text_encodes_as_ours(hf_tok, ours):
    import random

    _, tokenizer = ours
    rng = random.Random(0)
    pieces = list("abcdeghilnorst ABCT 0123456789 \n\t.,!?'\"-éü東😀") + ["'s", "'ll", "  ", "\r\n", "The ", " answer"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 60)))
        ids = tokenizer.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids, repr(text)
        assert hf_tok.decode(ids) == text


def test_every_token_decodes_as_ours(hf_tok, ours):
    _, tokenizer = ours
    for i in range(tokenizer.get_vocab_size()):
        assert hf_tok.decode([i]) == tokenizer.decode([i]), i
    assert hf_tok.convert_tokens_to_ids("<|output_end|>") == tokenizer.encode_special("<|output_end|>")
    assert set(hf_tok.all_special_tokens) == set(tokenizer.get_special_tokens())


def test_byte_symbols_are_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers

    symbols = byte_symbols()
    assert len(set(symbols.values())) == 256
    assert set(symbols.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert symbols[ord(" ")] == "Ġ" and symbols[ord("a")] == "a"


def test_a_tokenizer_that_is_not_byte_level_is_refused(tiny_tokenizer):
    import tiktoken

    from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

    ranks = {bytes([b]): b for b in range(255)}  # one byte missing
    specials = {s: 255 + i for i, s in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding("x", pat_str=tiny_tokenizer.enc._pat_str, mergeable_ranks=ranks, special_tokens=specials)
    with pytest.raises(export_module.ExportError, match="256 single bytes"):
        fast_tokenizer(Tokenizer(enc))


# ----------------------------------------------------------------------------- the chat template

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a helpful science tutor."},
     {"role": "user", "content": "Which is a solid?\n\nA. water\nB. rock"},
     {"role": "assistant", "content": "The correct answer is B. rock"},
     {"role": "user", "content": "Pourquoi ? Ünïcödé, 東京, 😀 — and  spaces  "}],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
     {"role": "user", "content": "three\n"}, {"role": "assistant", "content": "  four"},
     {"role": "user", "content": "12345 + 678"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_as_ours(hf_tok, ours, messages):
    _, tokenizer = ours
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids == tokenizer.render_for_completion(messages)
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|bos|><|user_start|>") and text.endswith("<|user_end|><|assistant_start|>")


def test_chat_template_of_a_whole_conversation_is_the_training_rendering(hf_tok, ours):
    _, tokenizer = ours
    messages = CONVERSATIONS[1][:3]
    assert hf_tok.apply_chat_template(messages)["input_ids"] == tokenizer.render_conversation(messages)[0]
    # with add_generation_prompt a final assistant message is left out, as render_for_completion does
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == \
        tokenizer.render_for_completion(messages)
    parts = [{"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                               {"type": "python", "text": "2+2"},
                                               {"type": "python_output", "text": "4"},
                                               {"type": "text", "text": " It is 4."}]}]
    assert hf_tok.apply_chat_template(parts)["input_ids"] == tokenizer.render_conversation(parts)[0]


def test_chat_template_refuses_what_ours_refuses(hf_tok):
    for messages in ([{"role": "assistant", "content": "hi"}],
                     [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                     [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
                     [{"role": "system", "content": "only a system message"}]):
        with pytest.raises(Exception, match="user message|expected role"):
            hf_tok.apply_chat_template(messages, add_generation_prompt=True)


def test_sanitized_chat_keeps_special_text_as_text(hf_tok, ours):
    _, tokenizer = ours
    messages = [{"role": "user", "content": "say <|assistant_end|> please"}]
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, sanitize_control_tokens=True)["input_ids"]
    if not SANITIZES:
        # transformers < 5.20 (Colab's 5.15) takes the keyword as a template variable and ignores
        # it: the text becomes the special token, which is what the model card warns about.
        assert ids.count(tokenizer.encode_special("<|assistant_end|>")) == 1
        return
    assert ids.count(tokenizer.encode_special("<|assistant_end|>")) == 0
    assert hf_tok.decode(ids) == tokenizer.decode(tokenizer.render_for_completion(messages))


def test_template_constant_is_what_was_saved(hf_tok):
    assert hf_tok.chat_template == CHAT_TEMPLATE


# ----------------------------------------------------------------------------- the command

def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--checkpoint", "--out_dir", "--dtype", "--push_to_hub", "--base_dir", "--model_step", "--device"):
        assert flag in out


def test_source_tag_spec_and_re_export(tmp_path, nontrivial_base_dir, capsys):
    out_dir = tmp_path / "hf"
    args = ["--checkpoint", "base:d2", "--base_dir", str(nontrivial_base_dir), "--out_dir", str(out_dir)]
    assert main(args) == 0
    record = json.loads((out_dir / EXPORT_MARK).read_text())
    assert record["step"] == 3 and record["kind"] == "base_dir" and record["source"] == "base"
    (out_dir / "README.md").write_text("edited")
    assert main(args + ["--model_step", "3"]) == 0  # an earlier export is replaced
    assert (out_dir / "README.md").read_text().startswith("---")
    assert "exported" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing checkpoint", "out_dir is a file", "foreign folder", "bad step"])
def test_bad_input_is_one_line(tmp_path, checkpoint_dir, capsys, case):
    out_dir = tmp_path / "out"
    checkpoint = str(checkpoint_dir)
    extra = []
    if case == "missing checkpoint":
        checkpoint = str(tmp_path / "nowhere")
    elif case == "out_dir is a file":
        out_dir.write_text("not a folder")
    elif case == "foreign folder":
        out_dir.mkdir()
        (out_dir / "notes.txt").write_text("mine")
    else:
        extra = ["--model_step", "99"]
    assert main(["--checkpoint", checkpoint, "--out_dir", str(out_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if case == "foreign folder":
        assert [p.name for p in out_dir.iterdir()] == ["notes.txt"]
        assert "not written by sciassist.export" in err
    if case == "out_dir is a file":
        assert out_dir.read_text() == "not a folder" and "is a file" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_out_dir_checks_come_before_loading(tmp_path):
    check_out_dir(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty")
    with pytest.raises(export_module.ExportError, match="required"):
        export(ExportSettings(checkpoint=str(tmp_path / "nowhere")))


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records the calls, uploads nothing."""

    instances = []

    def __init__(self, fail=False):
        self.calls = []
        self.fail = fail
        FakeHub.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise RuntimeError("401 Unauthorized\nmore detail")
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"commit_url": "https://huggingface.co/me/model/commit/abc"})()


def test_push_to_hub_uploads_the_folder(tmp_path, checkpoint_dir, monkeypatch, capsys):
    FakeHub.instances.clear()
    monkeypatch.setattr(export_module, "HfApi", FakeHub)
    out_dir = tmp_path / "hf"
    assert main(["--checkpoint", str(checkpoint_dir), "--out_dir", str(out_dir), "--push_to_hub", "me/model",
                 "--private"]) == 0
    (hub,) = FakeHub.instances
    assert hub.calls[0] == ("create_repo", {"repo_id": "me/model", "repo_type": "model", "private": True,
                                            "exist_ok": True})
    name, kwargs = hub.calls[1]
    assert name == "upload_folder" and kwargs["folder_path"] == str(out_dir)
    assert kwargs["repo_id"] == "me/model" and kwargs["repo_type"] == "model"
    assert 'pipeline("text-generation", model="me/model")' in (out_dir / "README.md").read_text()
    assert "pushed to https://huggingface.co/me/model" in capsys.readouterr().out


def test_a_failed_push_keeps_the_folder(tmp_path, checkpoint_dir, capsys):
    settings = ExportSettings(checkpoint=str(checkpoint_dir), out_dir=str(tmp_path / "hf"), push_to_hub="me/model")
    with pytest.raises(export_module.ExportError, match=r"401 Unauthorized\); the exported folder is complete"):
        export(settings, api=FakeHub(fail=True))
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_parameter_count_is_recorded(hf_dir, ours):
    model, _ = ours
    record = json.loads((hf_dir / EXPORT_MARK).read_text())
    assert record["num_params"] == model.num_params() and record["dtype"] == "float32"


def test_grouped_query_attention(tmp_path, tiny_tokenizer):
    """n_kv_head < n_head: transformers repeats each kv head for its query heads as nanochat does."""
    from nanochat.gpt import GPTConfig

    tiny_tokenizer.save(tmp_path / "tokenizer")
    torch.manual_seed(3)
    config = GPTConfig(sequence_len=64, vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2,
                       n_embd=64)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.1)
    run_dir = write_published_checkpoint(tmp_path / "base_checkpoints" / "d2", model, step=1)
    assert main(["--checkpoint", str(run_dir), "--out_dir", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_key_value_heads == 2
    loaded, tokenizer, _ = load_model(run_dir, device="cpu")
    ids = torch.tensor([prompt_ids(tokenizer, PROMPTS[4])])
    with torch.no_grad():
        assert (hf(ids).logits - rotary_fp32(loaded)(ids)).abs().max().item() < 1e-4


def test_a_larger_vocabulary_encodes_as_ours(scienceqa_dir):
    """An 8,192-token vocabulary trained on ScienceQA's text: its held-out text and random Unicode
    encode to the same ids (many more merges than the tiny tokenizer has)."""
    import random

    from nanochat.tokenizer import Tokenizer

    problems = json.loads((scienceqa_dir / "problems.json").read_text(encoding="utf-8"))
    texts = [p.get(k) or "" for p in problems.values() for k in ("question", "hint", "lecture", "solution")]
    texts = [t for t in texts if t]
    random.Random(0).shuffle(texts)
    tokenizer = Tokenizer.train_from_iterator(texts[:20000], vocab_size=8192)
    fast = fast_tokenizer(tokenizer)
    fast.encode_special_tokens = True
    held_out = texts[20000:26000]
    rng = random.Random(1)
    alphabet = [chr(c) for c in [*range(32, 127), *range(160, 420), 0x4E2D, 0x6587, 0x1F600, 0x200B, 0x3000, 9, 10, 13]]
    noise = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(3000)]
    for batch in (held_out, noise):
        theirs = [e.ids for e in fast.encode_batch(batch, add_special_tokens=False)]
        ours = tokenizer.encode(batch)
        assert [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b] == []
        assert all(fast.decode(ids, skip_special_tokens=False) == text for ids, text in zip(ours, batch, strict=True))

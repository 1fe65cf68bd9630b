"""sciassist.pipelines.tiny: the offline stand-in base model, on a small invented dataset in the
lupantech layout (so the split boundaries are known exactly) and very small models."""

import json
import math
import time

import pytest
import torch

from nanochat.checkpoint import load_model_from
from sciassist.pipelines import tiny
from sciassist.pipelines import tiny_corpus as corpus

VAL_ONLY_WORD = "quokkaberry"  # appears only in the val split, in every text field
TEST_ONLY_WORD = "zibbleworth"

SUBJECTS = [
    ("magnet", "Magnets pull on iron and steel. A magnet has a north pole and a south pole."),
    ("plant", "Plants make food from sunlight, water and air. Leaves catch the light."),
    ("state", "A map shows where places are. North is usually at the top of a map."),
]
ANIMALS = ["fox", "owl", "trout", "frog", "bear", "hawk", "salmon", "toad", "moose", "crow", "eel", "newt"]


def _record(i, split, extra=""):
    topic, lecture = SUBJECTS[i % len(SUBJECTS)]
    animal = ANIMALS[i % len(ANIMALS)]
    return {
        "question": f"Which {topic} fact is true for the {animal}{extra}?",
        "choices": [f"the {animal} can swim", f"the {animal} can fly{extra}", "neither"],
        "answer": i % 3,
        "hint": f"Read about the {animal} number {i}{extra}." if i % 2 else "",
        "image": "image.png" if i % 4 == 0 else None,
        "task": "closed choice", "grade": f"grade{1 + i % 8}", "subject": "natural science",
        "topic": topic, "category": topic.title(), "skill": topic,
        "lecture": lecture + extra,
        "solution": f"The {animal} lives near water{extra}. Look at the {topic} clues.",
        "split": split,
    }


def write_dataset(directory, n_train=30, n_val=6, n_test=4):
    """A lupantech-layout directory; val (test) text carries VAL_ONLY_WORD (TEST_ONLY_WORD)."""
    directory.mkdir(parents=True, exist_ok=True)
    problems, splits, captions = {}, {"train": [], "val": [], "test": []}, {}
    for split, n, extra in (("train", n_train, ""), ("val", n_val, " " + VAL_ONLY_WORD),
                            ("test", n_test, " " + TEST_ONLY_WORD)):
        for i in range(n):
            pid = str(len(problems) + 1)
            problems[pid] = _record(i, split, extra)
            splits[split].append(pid)
            if problems[pid]["image"]:
                captions[pid] = f"A photo of a {ANIMALS[i % len(ANIMALS)]} by a pond{extra}."
    (directory / "problems.json").write_text(json.dumps(problems))
    (directory / "pid_splits.json").write_text(json.dumps(splits))
    (directory / "captions.json").write_text(json.dumps({"captions": captions}))
    return directory


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("sqa"))


def small_settings(out_dir, dataset, **overrides):
    values = dict(out_dir=str(out_dir), scienceqa=str(dataset), vocab_size=300, depth=1, n_embd=64,
                  n_head=2, sequence_len=64, device_batch_size=4, steps=5, val_rows=4, progress=False,
                  device="cpu")
    values.update(overrides)
    return tiny.TinySettings(**values)


# ----------------------------------------------------------------------------- text

def test_record_document_layout():
    record = {"question": "Which is a mammal?", "choices": ["cat", "trout"], "answer": 0, "hint": " Look. ",
              "caption": "A cat.", "solution": "Cats have fur.", "lecture": "Mammals have hair."}
    assert corpus.record_document(record) == (
        "Context: Look.\n\nImage: A cat.\n\nWhich is a mammal?\n\nA. cat\nB. trout\n\n"
        "Cats have fur.\n\nMammals have hair.")
    # missing fields (None in lost records) are left out; no question means no document
    assert corpus.record_document({"question": "Why?", "choices": None, "hint": None, "lecture": None}) == "Why?"
    assert corpus.record_document({"question": None, "lecture": "text"}) == ""


def test_corpus_documents_keep_each_lecture_once():
    records = [{"question": f"Q{i}?", "choices": ["a", "b"], "lecture": "Shared lecture."} for i in range(3)]
    documents = corpus.corpus_documents(records)
    assert len(documents) == 3
    assert sum(d.count("Shared lecture.") for d in documents) == 1
    assert documents[0].endswith("Shared lecture.")


def test_training_corpus_is_train_split_only(dataset):
    documents = corpus.training_corpus(str(dataset))
    text = "\n".join(documents)
    assert len(documents) == 30
    assert "Which magnet fact is true for the fox?" in text
    assert "A photo of a fox by a pond." in text  # captions of train questions are used
    assert VAL_ONLY_WORD not in text and TEST_ONLY_WORD not in text


def test_choose_vocab_size():
    assert corpus.choose_vocab_size(["x" * 10], 300) == 300  # as given
    assert corpus.choose_vocab_size(["x" * 1000]) == 512  # floor for very small text
    assert corpus.choose_vocab_size(["x" * (64 * 1500)]) == 1024  # power of two <= bytes / 64
    assert corpus.choose_vocab_size(["x" * (64 * 100_000)]) == 4096  # capped


def test_train_tokenizer_exact_and_automatic():
    texts = ["ab cd ef gh"] * 5
    with pytest.raises(tiny.TinyError, match="cannot train a 4096-token tokenizer"):
        corpus.train_tokenizer(texts, 4096, exact=True)
    text = "the quick brown fox jumps over the lazy dog " * 3
    tok = corpus.train_tokenizer([text], 1024, exact=False)  # too little text for 1024 (or 512): halved
    assert tok.get_vocab_size() < 1024
    assert tok.decode(tok.encode(text)) == text


# ----------------------------------------------------------------------------- batches

def test_batches_continue_the_stream_and_reshuffle_per_epoch():
    docs = [[100 + i] * 3 for i in range(5)]  # 15 tokens per epoch
    gen = corpus.batches(docs, batch_size=2, seq_len=4, seed=0)
    seen = []
    for _ in range(4):
        inputs, targets, epoch = next(gen)
        assert inputs.shape == targets.shape == (2, 4)
        assert torch.equal(inputs.flatten()[1:], targets.flatten()[:-1])  # shifted by one
        seen.append((inputs, targets, epoch))
    # the first target of a batch's last row continues into the next batch's first input
    assert seen[1][0][0, 0] == seen[0][1][-1, -1]
    assert [e for _, _, e in seen] == [0, 1, 1, 2]
    # every document once per epoch, and the same order for the same seed
    first_epoch = torch.cat([seen[0][0].flatten(), seen[0][1][-1, -1:], seen[1][1].flatten()])[:15]
    assert sorted(first_epoch.tolist()) == sorted(t for d in docs for t in d)
    again = next(corpus.batches(docs, batch_size=2, seq_len=4, seed=0))
    assert torch.equal(again[0], seen[0][0])


def test_eval_rows():
    rows = corpus.eval_rows([[1, 2, 3], [4, 5, 6, 7]], seq_len=2, max_rows=5)
    assert rows.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert corpus.eval_rows([[1, 2]], seq_len=4, max_rows=5) is None


def test_bits_per_byte_counts_only_text_tokens():
    class ConstantLoss(torch.nn.Module):
        def get_device(self):
            return torch.device("cpu")

        def forward(self, idx, targets, loss_reduction):
            return torch.full(targets.shape, math.log(2))  # one bit per token

    token_bytes = torch.tensor([0, 1, 3], dtype=torch.int32)  # token 0 is a special
    rows = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 1]])
    # targets: 1,2,0 and 2,1,1 -> text tokens 5 of 6, bytes 1+3+3+1+1 = 9
    assert corpus.bits_per_byte(ConstantLoss(), rows, token_bytes, batch_size=1) == pytest.approx(5 / 9)


def test_lr_schedule():
    assert tiny.warmdown_start(10, 0.2) == 8
    assert [tiny.warmdown_lr_multiplier(s, 10, 8) for s in range(10)] == [1.0] * 8 + [1.0, 0.5]
    assert tiny.warmdown_lr_multiplier(10, 10, 8) == 0.0
    assert tiny.warmdown_lr_multiplier(0, 5, 5) == 1.0


# ----------------------------------------------------------------------------- training

def test_train_tiny_writes_a_loadable_base_dir(tmp_path, dataset):
    base = tmp_path / "base"
    summary = tiny.train_tiny(small_settings(base, dataset))
    assert (base / "tokenizer" / "tokenizer.pkl").is_file() and (base / "tokenizer" / "token_bytes.pt").is_file()
    assert (base / "base_checkpoints" / "d1" / "model_000005.pt").is_file()
    model, tokenizer, meta = load_model_from(base, "base", device="cpu")
    assert meta["model_config"] == {"sequence_len": 64, "vocab_size": 300, "n_layer": 1, "n_head": 2,
                                    "n_kv_head": 2, "n_embd": 64}
    assert meta["step"] == 5 and meta["user_config"]["steps"] == 5 and meta["user_config"]["warmdown_from"] == 4
    assert meta["val_bpb"] == pytest.approx(summary["val_bpb"]) and 0 < meta["val_bpb"] < 20
    assert tokenizer.get_vocab_size() == 300
    text = "Which magnet fact is true for the owl?\n\nA. yes"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    with torch.no_grad():
        logits = model(torch.tensor([tokenizer.encode(text, prepend="<|bos|>")]))
    assert logits.shape[-1] == 300 and torch.isfinite(logits).all()
    marker = json.loads((base / tiny.MARKER_FILE).read_text())
    assert marker["step"] == 5 and marker["train_documents"] == 30


def test_loss_decreases(tmp_path, dataset):
    summary = tiny.train_tiny(small_settings(tmp_path / "a", dataset, steps=30))
    losses = summary["losses"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert len(losses) == 30
    assert first > math.log(300) - 0.5  # starts near chance
    assert last < first - 1.0, (first, last)
    assert summary["final_loss"] == pytest.approx(sum(losses[-3:]) / 3)  # the last tenth of the steps


def test_runs_are_deterministic(tmp_path, dataset):
    a = tiny.train_tiny(small_settings(tmp_path / "a", dataset, steps=4))
    b = tiny.train_tiny(small_settings(tmp_path / "b", dataset, steps=4))
    assert a["losses"] == b["losses"]
    ma, _, _ = load_model_from(tmp_path / "a", "base", device="cpu")
    mb, _, _ = load_model_from(tmp_path / "b", "base", device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values(), strict=True))
    c = tiny.train_tiny(small_settings(tmp_path / "c", dataset, steps=4, seed=7))
    assert c["losses"] != a["losses"]


def test_time_budget_stops_the_run(tmp_path, dataset):
    t0 = time.time()
    summary = tiny.train_tiny(small_settings(tmp_path / "t", dataset, steps=None, max_epochs=None, max_minutes=0.02))
    assert time.time() - t0 < 15
    assert summary["step"] >= 1
    meta = json.loads((tmp_path / "t" / "base_checkpoints" / "d1" / f"meta_{summary['step']:06d}.json").read_text())
    assert meta["user_config"]["steps"] == summary["step"]
    assert meta["user_config"]["warmdown_from"] <= summary["step"]


def test_a_budget_spent_before_training_still_takes_one_step(tmp_path, dataset):
    summary = tiny.train_tiny(small_settings(tmp_path / "z", dataset, steps=None, max_epochs=None,
                                             max_minutes=1e-6))
    assert summary["step"] == 1 and math.isfinite(summary["final_loss"])


def test_epoch_cap_gives_the_same_run_as_steps(tmp_path, dataset):
    # 3,374 training tokens, 256 per step: one epoch is ceil(3374 / 256) = 14 steps
    capped = tiny.train_tiny(small_settings(tmp_path / "e", dataset, steps=None, max_epochs=1.0, max_minutes=5))
    assert capped["step"] == 14 and capped["train_tokens"] == 3374
    assert capped["epochs"] == pytest.approx(14 * 256 / 3374, abs=0.01)
    exact = tiny.train_tiny(small_settings(tmp_path / "s", dataset, steps=14))
    assert capped["losses"] == exact["losses"]
    # caps of ceil(0.05 * 3374 / 256) = 1 and ceil(0.1 * 3374 / 256) = 2 steps, reached before
    # the run has measured its speed
    for max_epochs, steps in ((0.05, 1), (0.1, 2)):
        summary = tiny.train_tiny(small_settings(tmp_path / f"c{steps}", dataset, steps=None, max_epochs=max_epochs))
        assert summary["step"] == steps


def test_threads_apply_to_the_run_only(tmp_path, dataset, monkeypatch):
    seen = []
    monkeypatch.setattr(tiny, "_train_tiny", lambda settings: seen.append(torch.get_num_threads()))
    torch.set_num_threads(1)
    tiny.train_tiny(small_settings(tmp_path, dataset, threads=2))
    assert seen == [2] and torch.get_num_threads() == 1


def test_model_config_overrides():
    base = dict(out_dir="x")
    config = tiny._model_config(tiny.TinySettings(depth=4, **base), 1000)
    assert (config.n_layer, config.n_embd, config.n_head, config.sequence_len) == (4, 256, 2, 512)
    config = tiny._model_config(tiny.TinySettings(depth=2, n_embd=96, n_head=3, **base), 1000)
    assert (config.n_embd, config.n_head, config.n_kv_head) == (96, 3, 3)
    with pytest.raises(tiny.TinyError, match="heads of an even size"):
        tiny._model_config(tiny.TinySettings(depth=2, n_embd=90, n_head=2, **base), 1000)


def test_rerun_replaces_its_own_output_but_not_a_foreign_tokenizer(tmp_path, dataset):
    base = tmp_path / "base"
    tiny.train_tiny(small_settings(base, dataset, depth=2, steps=3))
    tiny.train_tiny(small_settings(base, dataset, depth=1, steps=2))
    # the old d2 would otherwise win as "the largest d<N>" in load_model_from
    assert sorted(p.name for p in (base / "base_checkpoints").iterdir()) == ["d1"]
    _, _, meta = load_model_from(base, "base", device="cpu")
    assert meta["step"] == 2

    foreign = tmp_path / "published"
    (foreign / "tokenizer").mkdir(parents=True)
    (foreign / "tokenizer" / "tokenizer.pkl").write_bytes(b"not ours")
    with pytest.raises(tiny.TinyError, match="was not written by sciassist.pipelines.tiny"):
        tiny.train_tiny(small_settings(foreign, dataset))
    assert (foreign / "tokenizer" / "tokenizer.pkl").read_bytes() == b"not ours"


def test_main(tmp_path, dataset, capsys):
    base = tmp_path / "cli"
    argv = ["--out_dir", str(base), "--scienceqa", str(dataset), "--vocab_size", "300", "--depth", "1",
            "--n_embd", "64", "--sequence_len", "64", "--device_batch_size", "2", "--steps", "2", "--device", "cpu",
            "--threads", "1"]
    assert tiny.main(argv) == 0
    out = capsys.readouterr().out
    assert "a stand-in, not d20/d32" in out and f"load_model_from({str(base)!r}, 'base')" in out
    assert tiny.main(["--out_dir", str(tmp_path / "none"), "--scienceqa", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_bundled_sample_corpus_has_no_val_or_test_text():
    from sciassist.data.scienceqa import SAMPLE_DIR, SAMPLE_FILE, load_scienceqa
    assert (SAMPLE_DIR / SAMPLE_FILE).is_file()
    text = "\n".join(corpus.training_corpus("sample"))
    for split in ("val", "test"):
        for record in load_scienceqa("sample", split):
            question = record.get("question")
            if question and not any(question == r.get("question") for r in load_scienceqa("sample", "train")):
                assert question not in text


def test_without_a_time_limit_the_epoch_cap_fixes_the_steps(tmp_path, dataset):
    # the default budget is in steps (4 passes over the text): the same on every machine
    assert tiny.TinySettings(out_dir="x").max_minutes is None
    summary = tiny.train_tiny(small_settings(tmp_path / "d", dataset, steps=None, max_epochs=1.0, max_minutes=None))
    assert summary["step"] == 14
    meta = json.loads((tmp_path / "d" / "base_checkpoints" / "d1" / "meta_000014.json").read_text())
    assert meta["user_config"]["warmdown_from"] == tiny.warmdown_start(14, 0.2)
    with pytest.raises(tiny.TinyError, match="the run needs a budget"):
        tiny.train_tiny(small_settings(tmp_path / "n", dataset, steps=None, max_epochs=None, max_minutes=None))


def test_pretraining_follows_the_precision_policy_with_loss_scaling(tmp_path, dataset, monkeypatch):
    """An fp16 device (a T4's policy, here on CPU) pretrains with a GradScaler: every optimizer
    step goes through the scaler, as fine-tuning's do."""
    from sciassist.common import Precision
    fp16 = Precision(name="float16", device_type="cpu", dtype=torch.float16, needs_grad_scaler=True,
                     reason="test: a GPU without native bf16")
    monkeypatch.setattr(tiny, "precision_for", lambda device: fp16)
    steps = []
    real_step = torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, opt, *a, **kw: steps.append(
        self.get_scale()) or real_step(self, opt, *a, **kw))
    summary = tiny.train_tiny(small_settings(tmp_path / "fp16", dataset, steps=3))
    assert len(summary["losses"]) == 3 and all(math.isfinite(x) for x in summary["losses"])
    assert len(steps) == 3 * 2 and steps[0] == 65536.0  # 2 optimizers (Muon, AdamW) a step; the default scale

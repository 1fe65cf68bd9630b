"""Reinforcement learning on the model's own answers: the reward is the evaluator's parser, the
options are shuffled with the gold moved along, advantages are group-relative, the loss is
token-normalised, and a run writes its metrics, a loadable model and a resume point that
continues bit for bit."""

import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from nanochat.checkpoint import save_checkpoint
from sciassist import cli
from sciassist.checkpoints import choose_checkpoint, load_choice
from sciassist.data.answers import answer_line, options_block, parse_answer
from sciassist.data.conversations import write_conversations
from sciassist.plots import plot_rl_curves
from sciassist.train import rl as rl_module
from sciassist.train.rl import EXIT_CODES, main, rl
from sciassist.train.rl_batch import RLBatches
from sciassist.train.rl_questions import as_question, load_questions, shuffled, step_generator, val_generator
from sciassist.train.rl_reward import custom_reward, group_advantages, load_reward_fn, verifiable_reward
from sciassist.train.rl_settings import RLError, RLSettings, check_rl_settings
from sciassist.train.rl_step import Sample, StepWork, accumulate_policy_gradient, row_seeds, step_metrics
from sciassist.train.rl_validation import (
    maj_at_k,
    majority_answer,
    pass_at_k,
    sample_counts,
    sampled_validation,
    validation_line,
)
from sciassist.train.setup import Runtime
from tests.conftest import nontrivial_gpt

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [("Which is hot?", ["ice", "steam", "snow"], 1),
             ("Which one is a planet?", ["Mars", "the Moon"], 0),
             ("Which one is a mammal?", ["trout", "robin", "whale", "frog"], 2),
             ("Which is a liquid?", ["rock", "water", "air"], 1)]


def record(question, choices, answer, answer_format="letter_first", layout="letter_first"):
    return {"messages": [{"role": "system", "content": "You are a helpful science tutor."},
                         {"role": "user", "content": f"{question}\n\n{options_block(choices, layout)}"},
                         {"role": "assistant", "content": answer_line(choices, answer, answer_format)}],
            "meta": {"pid": question, "choices": choices, "answer": answer, "answer_letter": "ABCD"[answer]}}


@pytest.fixture(scope="module")
def question_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rl_data") / "questions.jsonl"
    write_conversations(path, [record(*q) for q in QUESTIONS])
    return path


@pytest.fixture(scope="module")
def rl_base_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny model whose blocks do something (nanochat's init zeroes the output projections)."""
    base_dir = tmp_path_factory.mktemp("rl_base")
    model = nontrivial_gpt(tiny_tokenizer.get_vocab_size(), seed=0, projection_std=0.2)
    save_checkpoint(base_dir / "base_checkpoints" / "d2", 0, model, {})
    tiny_tokenizer.save(base_dir / "tokenizer")
    return base_dir


def tiny_rl(base_dir, data, out_dir, **overrides):
    # lrs far above nanochat's so that 3 steps of a 64-wide model move its weights visibly; fp32 so the
    # figures do not depend on whether this CPU computes bf16 natively
    values = dict(data_path=str(data), base_dir=str(base_dir), source="base", out_dir=str(out_dir), output_tag="run",
                  num_steps=3, questions_per_step=2, samples_per_question=3, max_new_tokens=6, generation_batch_size=4,
                  device_batch_size=2, init_lr_frac=1.0, matrix_lr=0.05, embedding_lr=0.5, unembedding_lr=0.05,
                  device="cpu", dtype="float32")
    values.update(overrides)
    return RLSettings(**values)


HOOK_CALLS = []


def reply_length_reward(prompt, reply, record):
    """A reward with a spread on a random model: the reply's length in characters, mod 5."""
    HOOK_CALLS.append((prompt, reply, record))
    return float(len(reply) % 5)


# --- the reward

@pytest.mark.parametrize("reply, answer_format, expected", [
    ("The correct answer is B. steam", "letter_first", (1.0, 1)),
    ("The correct answer is A. ice", "letter_first", (0.25, 0)),  # wrong, stated as accepted
    ("", "letter_first", (-0.5, None)),
    ("The correct answer is A. The correct answer is B.", "letter_first", (0.25, 0)),  # only the first counts
    ("The correct answer is b. steam", "letter_first", (-0.5, None)),  # a lower-case letter is not an answer
    ("The correct answer is D.", "letter_first", (-0.5, None)),  # beyond the question's three options
    ("The correct answer is steam (A).", "text_first", (-0.5, None)),  # steam's text with ice's letter
    ("The correct answer is steam (B).", "text_first", (1.0, 1)),
    ("blah " * 20_000 + "The correct answer is B.", "letter_first", (1.0, 1)),  # huge, answer at the end
    ("steam " * 20_000, "letter_first", (-0.5, None)),
    ("The correct answer is \u0412. steam", "letter_first", (-0.5, None)),  # a Cyrillic look-alike of B
    ("The correct answer is \u200bB. steam", "letter_first", (-0.5, None)),  # a zero-width space before it
    ("The correct answer is B/C.", "letter_first", (-0.5, None)),  # hedging between options
    ("The correct answer is B or C.", "letter_first", (-0.5, None)),
    ("The correct answer is B, C and A.", "letter_first", (1.0, 1)),  # a list: its first letter is the answer
    ("The correct answer is\nB.", "letter_first", (-0.5, None)),  # the letter on another line
    ("Answer: B", "letter_first", (-0.5, None)),  # not the trained phrase
    ("The correct answer is steam (B) or snow (C).", "text_first", (-0.5, None)),
    ("The correct answer is STEAM (B).", "text_first", (1.0, 1)),  # the option's text, case aside
])
def test_the_reward_is_the_parsers_verdict(reply, answer_format, expected):
    choices = ["ice", "steam", "snow"]
    got = verifiable_reward(reply, choices, 1, answer_format, invalid_reward=-0.5, format_bonus=0.25)
    assert got == expected
    assert got[1] == parse_answer(reply, 3, choices=choices, answer_format=answer_format)


def test_a_format_bonus_never_outweighs_correctness():
    check_rl_settings(RLSettings(format_bonus=0.25, invalid_reward=-0.5, device="cpu"))  # 0.75 vs 0.75: allowed
    with pytest.raises(RLError, match=r"--format_bonus 0.3 with --invalid_reward -0.5 would let the form"):
        check_rl_settings(RLSettings(format_bonus=0.3, invalid_reward=-0.5, device="cpu"))
    with pytest.raises(RLError, match=r"--invalid_reward must be between -1.0 and 0.0, got 0.5"):
        check_rl_settings(RLSettings(invalid_reward=0.5, device="cpu"))


def test_the_custom_reward_hook_is_loaded_by_name_or_file(tmp_path):
    assert load_reward_fn("tests.train.test_rl:reply_length_reward") is reply_length_reward
    hook = tmp_path / "my_reward.py"
    hook.write_text("def score(prompt, reply, record):\n    return 2.5 if 'steam' in reply else float('nan')\n")
    function = load_reward_fn(f"{hook}:score")
    assert custom_reward(function, "x", [], "steam", {}) == 2.5
    with pytest.raises(RLError, match=r"returned nan for a reply; it must return a finite number"):
        custom_reward(function, "x", [], "ice", {})
    with pytest.raises(RLError, match=r"has no function 'nope'"):
        load_reward_fn(f"{hook}:nope")
    with pytest.raises(RLError, match=r"cannot import no_such_module_here"):
        load_reward_fn("no_such_module_here:score")


# --- the questions

def test_shuffling_moves_the_gold_with_its_option():
    question = as_question(record("Which is hot?", ["ice", "steam", "snow"], 1))
    generator = torch.Generator().manual_seed(0)
    orders, gold_positions = set(), set()
    for _ in range(60):
        shown = shuffled(question, generator)
        assert shown.choices[shown.answer] == "steam"
        assert shown.record["meta"]["answer"] == shown.answer and shown.record["meta"]["choices"] == shown.choices
        assert shown.record["meta"]["answer_letter"] == "ABC"[shown.answer]
        assert shown.messages[1]["content"] == f"Which is hot?\n\n{options_block(shown.choices)}"
        assert shown.messages[0] == question.messages[0] and len(shown.messages) == 2  # the answer is dropped
        line = answer_line(shown.choices, shown.answer, "text_first")
        assert verifiable_reward(line, shown.choices, shown.answer, "text_first") == (1.0, shown.answer)
        orders.add(tuple(shown.choices))
        gold_positions.add(shown.answer)
    assert len(orders) == 6 and gold_positions == {0, 1, 2}
    assert question.choices == ["ice", "steam", "snow"]  # the question itself is unchanged
    after = shuffled(as_question(record("Which is hot?", ["ice", "steam"], 0, layout="letter_after")),
                     torch.Generator().manual_seed(3))
    assert after.messages[1]["content"].endswith(options_block(after.choices, "letter_after"))
    assert torch.equal(step_generator(42, 7).get_state(), step_generator(42, 7).get_state())
    assert not torch.equal(step_generator(42, 7).get_state(), step_generator(42, 8).get_state())


def write_jsonl(path, records):  # prompts without an answer, which write_conversations refuses
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_questions_that_cannot_be_asked_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    no_meta = {"messages": [{"role": "user", "content": "Which is hot?\n\nA. ice\nB. steam"}]}
    write_jsonl(bad, [record(*QUESTIONS[0]), no_meta])
    with pytest.raises(RLError, match=r"bad.jsonl: record 2: no \"meta\" object"):
        load_questions(bad)
    out_of_range = dict(record(*QUESTIONS[0]), meta={"choices": ["ice", "steam"], "answer": 2})
    write_jsonl(bad, [out_of_range])
    with pytest.raises(RLError, match=r"record 1: meta: answer index out of range"):
        load_questions(bad)
    free_form = dict(record(*QUESTIONS[0]), messages=[{"role": "user", "content": "Hot: ice, steam or snow?"}])
    write_jsonl(bad, [free_form])
    with pytest.raises(RLError, match=r"cannot be shuffled; --shuffle_options false"):
        load_questions(bad)
    assert load_questions(bad, shuffle_options=False)[0].answer == 1


# --- advantages and the loss

def test_advantages_are_relative_to_the_group_and_groups_without_spread_are_counted():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == ([0.5, -0.5, -0.5, 0.5], True)
    assert group_advantages([0.1, 0.1, 0.1]) == ([0.0, 0.0, 0.0], False)  # exactly zero, not 0.1 - 0.1000...02
    questions = [as_question(record(*QUESTIONS[0])), as_question(record(*QUESTIONS[1]))]

    def sample(group, reply, reward, predicted, advantage):
        return Sample(group=group, prompt=[1, 2], reply=reply, truncated=len(reply) == 3, text="", reward=reward,
                      predicted=predicted, advantage=advantage)
    samples = [sample(0, [5, 6, 7], 1.0, 1, 0.5), sample(0, [5], 0.0, None, -0.5),
               sample(1, [8, 9], 0.0, 1, 0.0), sample(1, [], 0.0, None, 0.0)]
    metrics = step_metrics(StepWork(samples=samples, questions=questions, spread=[True, False], loss=0.1,
                                    neg_logp=2.0, trained_tokens=4, sample_time_s=0.5))
    assert (metrics["zero_spread_groups"], metrics["zero_spread_fraction"], metrics["trained_samples"]) == (1, 0.5, 2)
    assert (metrics["reward_mean"], metrics["reward_std"]) == (0.25, pytest.approx(math.sqrt(0.1875)))
    assert (metrics["accuracy"], metrics["invalid_rate"], metrics["truncated_rate"]) == (0.25, 0.5, 0.25)
    assert (metrics["reply_tokens_mean"], metrics["sampled_tokens"]) == (1.5, 6)
    assert metrics["predicted_letters"] == {"B": 2, "invalid": 2}
    assert metrics["gold_letters"] == {"A": 2, "B": 2}


def test_the_loss_is_token_normalised_and_does_not_depend_on_the_micro_batches(tiny_tokenizer):
    model = nontrivial_gpt(tiny_tokenizer.get_vocab_size(), seed=1, projection_std=0.2)
    samples = [Sample(group=0, prompt=[3, 9, 4], reply=[7, 8], truncated=False, text="", reward=1.0, predicted=0,
                      advantage=0.75),
               Sample(group=0, prompt=[3, 5], reply=[10, 11, 12, 13], truncated=False, text="", reward=0.0,
                      predicted=None, advantage=-0.25)]
    tokens = 6
    expected = 0.0
    for x in samples:  # by hand: -sum of A x log p over the reply tokens, over the step's tokens
        sequence = torch.tensor(x.prompt + x.reply)
        with torch.no_grad():
            logp = torch.log_softmax(model(sequence[None, :-1])[0].double(), dim=-1)
        positions = range(len(x.prompt) - 1, len(sequence) - 1)
        expected -= x.advantage * sum(logp[t, sequence[t + 1]].item() for t in positions)
    expected /= tokens
    gradients = []
    for rows in (1, 2):
        model.zero_grad(set_to_none=True)
        loss, neg_logp = accumulate_policy_gradient(model, samples, tokens, rows, pad_id=0)
        assert loss == pytest.approx(expected, rel=1e-5)
        gradients.append([p.grad.clone() for p in model.parameters()])
    assert neg_logp > 0
    for one_by_one, together in zip(*gradients, strict=True):
        torch.testing.assert_close(one_by_one, together, atol=1e-6, rtol=1e-5)


def test_the_update_with_each_prompt_run_once_has_the_gradient_of_every_reply_after_its_own_prompt(tiny_tokenizer):
    vocab = tiny_tokenizer.get_vocab_size()
    model = nontrivial_gpt(vocab, seed=2, projection_std=0.2)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (11, 6)]
    lengths_advantages = [(0, 5, 0.5), (0, 1, -0.25), (0, 9, -0.75), (0, 3, 0.5),  # replies of different lengths
                          (1, 2, 1.0)]  # a group with a single trained reply
    samples = [Sample(group=group, prompt=prompts[group], reply=torch.randint(1, vocab, (n,), generator=g).tolist(),
                      truncated=False, text="", reward=0.0, predicted=None, advantage=advantage)
               for group, n, advantage in lengths_advantages]
    denominator = 23.0
    # the reference: every reply after its own copy of the prompt, right-padded rows, logits everywhere
    width = max(len(x.prompt) + len(x.reply) for x in samples) - 1
    inputs = torch.zeros((len(samples), width), dtype=torch.long)
    targets = torch.full((len(samples), width), -1, dtype=torch.long)
    for i, x in enumerate(samples):
        sequence = torch.tensor(x.prompt + x.reply)
        inputs[i, :len(sequence) - 1] = sequence[:-1]
        targets[i, len(x.prompt) - 1:len(sequence) - 1] = sequence[len(x.prompt):]
    model.zero_grad(set_to_none=True)
    neg_logp = model(inputs, targets, loss_reduction="none")
    advantages = torch.tensor([x.advantage for x in samples])
    expected_loss = (neg_logp * advantages[:, None]).sum() / denominator
    expected_loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for rows in (1, 2, 3, 8):
        model.zero_grad(set_to_none=True)
        loss, neg_logp_sum = accumulate_policy_gradient(model, samples, denominator, rows, pad_id=0)
        assert loss == pytest.approx(expected_loss.item(), rel=1e-5)
        assert neg_logp_sum == pytest.approx(neg_logp.sum().item(), rel=1e-5)
        for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# --- validation

def test_pass_at_k_is_the_unbiased_estimate():
    assert pass_at_k(4, 1, 1) == 0.25
    assert pass_at_k(4, 1, 2) == 0.5  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert pass_at_k(8, 3, 4) == pytest.approx(13 / 14)  # 1 - C(5,4)/C(8,4) = 1 - 5/70
    assert pass_at_k(5, 2, 4) == 1.0  # 3 wrong replies cannot fill 4 draws
    assert (pass_at_k(4, 0, 4), pass_at_k(4, 4, 1)) == (0.0, 1.0)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)
    assert (sample_counts(1), sample_counts(2), sample_counts(6), sample_counts(8)) == (
        [1], [1, 2], [1, 2, 4, 6], [1, 2, 4, 8])


def test_the_majority_vote_ignores_invalid_replies_and_breaks_ties_by_first_answer():
    answers = [None, 2, 1, 1, 2]
    assert majority_answer(answers) == 2  # 2 and 1 twice each: 2 was given first
    assert majority_answer([0, None, None, 1, 1]) == 1  # two invalid replies do not outvote
    assert majority_answer([None, None]) is None
    assert [maj_at_k(answers, 1, k) for k in (1, 2, 3, 4, 5)] == [False, False, False, True, False]
    assert [maj_at_k(answers, 2, k) for k in (1, 2, 3, 4, 5)] == [False, True, True, False, True]
    assert not maj_at_k([None, None], None, 2)  # no valid reply is never right


class ScriptedEngine:
    """generate_multi's stand-in: the next replies of a script, encoded; records each row's seed."""

    def __init__(self, tokenizer, replies):
        self.tokenizer, self.replies, self.seeds = tokenizer, list(replies), []
        self.model = SimpleNamespace(rotary_seq_len=10_000)

    def generate_multi(self, prompts, max_tokens, temperature, top_k, seeds):
        assert len(seeds) == len(prompts)
        self.seeds.extend(seeds)
        return [self.tokenizer.encode(self.replies.pop(0)) for _ in prompts]


def test_sampled_validation_scores_pass_and_majority_by_hand(tiny_tokenizer):
    hot, planet = QUESTIONS[0], QUESTIONS[1]  # gold B (steam), gold A (Mars)
    questions = [as_question(record(*hot)), as_question(record(*planet)), as_question(record(*QUESTIONS[2]))]
    replies = ["The correct answer is A. ice", "The correct answer is B. steam", "steam!",  # answers A, B, -, B
               "The correct answer is B. steam",
               "no idea", "The correct answer is b", "The correct answer is B. the Moon",  # -, -, B, A
               "The correct answer is A. Mars"]
    engine = ScriptedEngine(tiny_tokenizer, replies)
    settings = RLSettings(val_questions=2, val_samples=4, generation_batch_size=3, max_new_tokens=100, seed=42,
                          device="cpu")
    run = SimpleNamespace(settings=settings, val_questions=questions, tokenizer=tiny_tokenizer, engine=engine,
                          reward_fn=None, answer_format="letter_first", runtime=Runtime(device=torch.device("cpu")),
                          batches=RLBatches(3, 8, "as set"))
    metrics, samples = sampled_validation(run, 7)
    assert not engine.replies and len(samples) == 8  # the third question is past --val_questions
    assert [x.predicted for x in samples] == [0, 1, None, 1, None, None, 1, 0]
    assert metrics["val_pass@1"] == (2 / 4 + 1 / 4) / 2
    assert metrics["val_pass@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)  # 1 - C(2,2)/C(4,2); 1 - C(3,2)/C(4,2)
    assert metrics["val_pass@4"] == 1.0
    # maj@1: A (wrong), nothing valid; maj@2: A-B tie goes to A; maj@4: B 2-1 (right), B-A tie goes to B (wrong)
    assert (metrics["val_maj@1"], metrics["val_maj@2"], metrics["val_maj@4"]) == (0.0, 0.0, 0.5)
    assert (metrics["val_sample_invalid_rate"], metrics["val_sample_reward_mean"]) == (3 / 8, 3 / 8)
    assert (metrics["val_sampled_questions"], metrics["val_samples_per_question"]) == (2, 4)
    # one seed per reply, from (seed, "val", step) alone, apart from the training steps' generators
    assert engine.seeds == row_seeds(val_generator(42, 7), 8) and len(set(engine.seeds)) == 8
    assert engine.seeds != row_seeds(step_generator(42, 7), 8)
    line = validation_line(7, 10, dict(metrics, val_accuracy=0.5, val_invalid_rate=0.25))
    assert line == ("validation at step 7/10: greedy accuracy 0.500, invalid 0.250 | 2 questions x 4 samples: "
                    "pass@1 0.375 pass@2 0.667 pass@4 1.000, maj@4 0.500, invalid 0.375")
    run.settings = RLSettings(val_questions=0, device="cpu")
    assert sampled_validation(run, 7) == ({}, [])


# --- runs

STEP_KEYS = {"step", "lr_multiplier", "reward_mean", "reward_std", "accuracy", "invalid_rate", "zero_spread_groups",
             "zero_spread_fraction", "trained_samples", "trained_tokens", "sampled_tokens", "reply_tokens_mean",
             "truncated_rate", "neg_logp_per_token", "loss", "predicted_letters", "gold_letters", "sample_time_s",
             "updated", "step_time_s", "elapsed_s"}
VAL_KEYS = {"val_reward_mean", "val_accuracy", "val_invalid_rate", "val_truncated_rate", "val_sampled_questions",
            "val_samples_per_question", "val_sample_reward_mean", "val_sample_invalid_rate", "val_pass@1",
            "val_pass@2", "val_pass@3", "val_maj@1", "val_maj@2", "val_maj@3"}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_its_metrics_and_a_model_the_resolver_loads(tmp_path, rl_base_dir, question_file):
    settings = tiny_rl(rl_base_dir, question_file, tmp_path, val_path=str(question_file), eval_every=2,
                       eval_questions=2, keep="last")
    summary = rl(settings)
    run_dir = settings.run_dir()
    assert (summary["status"], summary["steps_done"], summary["answer_format"]) == ("completed", 3, "letter_first")
    assert (summary["keep"], summary["best_step"]) == ("last", 3)
    assert summary["best_checkpoint"] == summary["final_checkpoint"]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert set(records[0]) == VAL_KEYS | {"step", "elapsed_s"}
    assert [set(r) - STEP_KEYS for r in records[1:]] == [set(), VAL_KEYS, VAL_KEYS]
    for r in records[1:]:
        numbers = [v for k, v in r.items() if k not in ("predicted_letters", "gold_letters", "updated")
                   and v is not None]
        assert all(math.isfinite(v) for v in numbers)
        assert r["neg_logp_per_token"] is not None or r["trained_tokens"] == 0
        assert sum(r["predicted_letters"].values()) == sum(r["gold_letters"].values()) == 6
        assert 0 <= r["invalid_rate"] <= 1 and r["reply_tokens_mean"] <= 6
    assert [r["lr_multiplier"] for r in records[1:]] == pytest.approx([1.0, 2 / 3, 1 / 3])
    loaded = load_choice(choose_checkpoint(str(run_dir)), device="cpu")
    assert loaded.choice.step == 3 and loaded.meta["answer_format"] == "letter_first"
    assert loaded.meta["rl_settings"]["samples_per_question"] == 3
    final = torch.load(run_dir / "resume" / "state.pt", weights_only=True)["model"]
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, final[name].to(tensor.dtype)), name


def test_keep_best_leaves_the_model_of_the_best_validation(tmp_path, rl_base_dir, question_file, monkeypatch):
    from sciassist.train import rl as rl_module
    accuracies = iter([0.25, 0.5, 0.5, 0.25])  # steps 0, 1, 2, 3: the best is first reached at step 1

    states = {}  # the weights each validation saw

    def scripted(run, step):
        states[step] = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        return {"val_accuracy": next(accuracies), "val_invalid_rate": 0.0}, []

    monkeypatch.setattr(rl_module, "validate", scripted)
    settings = tiny_rl(rl_base_dir, question_file, tmp_path, val_path=str(question_file), eval_every=1,
                       eval_questions=2)
    summary = rl(settings)
    run_dir = settings.run_dir()
    assert sorted(p.name for p in run_dir.glob("model_*.pt")) == ["model_000001.pt"]
    assert sorted(p.name for p in run_dir.glob("meta_*.json")) == ["meta_000001.json"]
    assert (summary["keep"], summary["best_step"]) == ("best", 1)
    assert summary["best_checkpoint"] == str(run_dir / "model_000001.pt") and summary["final_checkpoint"] is None
    assert summary["best_validation"] == {"val_accuracy": 0.5, "val_invalid_rate": 0.0}
    records = read_metrics(run_dir)
    assert [(r["best_step"], r["best_val_accuracy"]) for r in records] == [(0, 0.25), (1, 0.5), (1, 0.5), (1, 0.5)]
    loaded = load_choice(choose_checkpoint(str(run_dir)), device="cpu")
    assert loaded.choice.step == 1
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, states[1][name].to(tensor.dtype)), name
    final = torch.load(run_dir / "resume" / "state.pt", weights_only=True)
    assert final["step"] == 3 and final["best"] == {"step": 1, "val_accuracy": 0.5}


def comparable(records):
    timing = ("sample_time_s", "step_time_s", "elapsed_s")
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


def test_sigterm_then_resume_is_bit_identical_and_the_hook_sees_each_reply(tmp_path, rl_base_dir, question_file):
    hook = "tests.train.test_rl:reply_length_reward"
    HOOK_CALLS.clear()
    whole = tiny_rl(rl_base_dir, question_file, tmp_path / "whole", reward_fn=hook)
    assert rl(whole)["status"] == "completed"
    assert len(HOOK_CALLS) == 3 * 2 * 3
    for prompt, reply, shown in HOOK_CALLS:
        assert isinstance(reply, str) and prompt == shown["messages"] and prompt[-1]["role"] == "user"
        assert prompt[-1]["content"].endswith(options_block(shown["meta"]["choices"]))
        assert shown["meta"]["answer_letter"] == "ABCD"[shown["meta"]["answer"]]

    def terminate_after_step_1(record):
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = tiny_rl(rl_base_dir, question_file, tmp_path / "cut", reward_fn=hook)
    stopped = rl(cut, on_step=terminate_after_step_1)
    assert (stopped["status"], stopped["steps_done"], stopped["final_checkpoint"]) == ("terminated", 1, None)
    resumed = rl(tiny_rl(rl_base_dir, question_file, tmp_path / "cut", reward_fn=hook, resume=True))
    assert (resumed["status"], resumed["steps_done"]) == ("completed", 3)

    a = torch.load(whole.run_dir() / "resume" / "state.pt", weights_only=True)
    b = torch.load(cut.run_dir() / "resume" / "state.pt", weights_only=True)
    assert any(r["updated"] for r in a["metrics"])  # the hook's spread made the steps learn
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizers"], b["optimizers"])
    assert_same_state(a["sampling"], b["sampling"])
    assert comparable(a["metrics"]) == comparable(b["metrics"]) == comparable(read_metrics(cut.run_dir()))
    assert_same_state(torch.load(whole.run_dir() / "model_000003.pt", weights_only=True),
                      torch.load(cut.run_dir() / "model_000003.pt", weights_only=True))
    other = tiny_rl(rl_base_dir, question_file, tmp_path / "cut", reward_fn=hook, resume=True, top_k=5)
    with pytest.raises(RLError, match=r"made with other settings \(--top_k 50 there, 5 now\)"):
        rl(other)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validation_writes_samples_and_curves_and_leaves_the_trajectory_alone(tmp_path, rl_base_dir, question_file):
    hook = "tests.train.test_rl:reply_length_reward"  # a reward with a spread, so that the steps learn
    val = dict(reward_fn=hook, val_path=str(question_file), eval_questions=3, val_questions=2, val_samples=3)
    every_step = tiny_rl(rl_base_dir, question_file, tmp_path / "every", eval_every=1, **val)
    assert rl(every_step)["status"] == "completed"
    unvalidated = tiny_rl(rl_base_dir, question_file, tmp_path / "none", reward_fn=hook)
    assert rl(unvalidated)["status"] == "completed"
    validated, plain = read_metrics(every_step.run_dir()), read_metrics(unvalidated.run_dir())
    assert [r["step"] for r in validated] == [0, 1, 2, 3] and [r["step"] for r in plain] == [1, 2, 3]
    assert all(set(r) >= VAL_KEYS for r in validated)
    # validating at every step changes neither the weights nor a single training figure
    a = torch.load(every_step.run_dir() / "resume" / "state.pt", weights_only=True)
    b = torch.load(unvalidated.run_dir() / "resume" / "state.pt", weights_only=True)
    assert any(r["updated"] for r in b["metrics"])
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    without_val = [{k: v for k, v in r.items() if k not in VAL_KEYS | {"best_step", "best_val_accuracy"}}
                   for r in validated[1:]]
    assert comparable(without_val) == comparable(plain)

    samples = read_jsonl(every_step.run_dir() / "samples.jsonl")
    # per validation: 3 greedy replies, and 2 questions x 3 sampled ones
    assert [(x["step"], x["question_index"], x["kind"], x["sample"]) for x in samples] == [
        (step, q, kind, i) for step in range(4) for q in range(3)
        for kind, i in [("greedy", 0)] + ([("sampled", i) for i in range(3)] if q < 2 else [])]
    for x in samples:
        q = QUESTIONS[x["question_index"]]
        assert x["question"] == f"{q[0]}\n\n{options_block(q[1])}" and x["gold"] == "ABCD"[q[2]]
        assert x["reward"] == len(x["reply"]) % 5 and isinstance(x["reply"], str)
        index = parse_answer(x["reply"], len(q[1]), choices=q[1])
        assert x["answer"] == (None if index is None else "ABCD"[index])
    for record in validated:  # pass@k and maj@k are those of the replies written out
        answers = [[x["answer"] for x in samples if x["step"] == record["step"] and x["kind"] == "sampled"
                    and x["question_index"] == q] for q in range(2)]
        for k in (1, 2, 3):
            gold = ["ABCD"[QUESTIONS[q][2]] for q in range(2)]
            assert record[f"val_pass@{k}"] == pytest.approx(
                sum(pass_at_k(3, group.count(g), k) for group, g in zip(answers, gold, strict=True)) / 2)
            assert record[f"val_maj@{k}"] == sum(maj_at_k(group, g, k) for group, g in zip(answers, gold,
                                                                                           strict=True)) / 2
    assert (every_step.run_dir() / "rl_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(every_step.run_dir().glob(".*.tmp"))
    assert plot_rl_curves(every_step.run_dir() / "metrics.jsonl", tmp_path / "again.png") == {"steps": 3,
                                                                                             "validations": 4}
    (tmp_path / "empty.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="empty.jsonl: no reward or validation values to plot"):
        plot_rl_curves(tmp_path / "empty.jsonl", tmp_path / "empty.png")
    assert not (unvalidated.run_dir() / "samples.jsonl").exists()

    def terminate_after_step_2(record):
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    cut = tiny_rl(rl_base_dir, question_file, tmp_path / "cut", eval_every=1, **val)
    assert rl(cut, on_step=terminate_after_step_2)["status"] == "terminated"
    assert rl(tiny_rl(rl_base_dir, question_file, tmp_path / "cut", eval_every=1, resume=True, **val))["status"] \
        == "completed"
    c = torch.load(cut.run_dir() / "resume" / "state.pt", weights_only=True)
    assert_same_state(a["model"], c["model"])
    assert_same_state(a["optimizers"], c["optimizers"])
    assert comparable(read_metrics(cut.run_dir())) == comparable(validated)
    assert read_jsonl(cut.run_dir() / "samples.jsonl") == samples


# --- the command

def test_bad_input_is_exit_2_and_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--samples_per_question", "1"])
    assert exit_info.value.code == 2
    assert [line for line in capsys.readouterr().err.splitlines() if "error:" in line] == [
        "python -m sciassist.train.rl: error: argument --samples_per_question: must be between 2 and 1000000, got 1"]
    assert main(["--format_bonus", "0.6", "--invalid_reward", "-0.5", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: invalid settings: --format_bonus 0.6 with")
    assert main(["--data_path", str(tmp_path / "none.jsonl"), "--device", "cpu", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --data_path: ") and "none.jsonl not found" in err
    assert main(["--reward_fn", "no_such_module_here:score", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --reward_fn no_such_module_here:score: cannot import")


def test_the_command_is_registered_and_maps_stops_to_exit_codes(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rl", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith("usage: sciassist rl [-h]")
    assert all(f"--{name}" in out for name in ("samples_per_question", "shuffle_options", "invalid_reward",
                                               "reward_fn", "token_normalization", "resume"))
    for status, code in (("terminated", 143), ("interrupted", 130), ("completed", 0)):
        monkeypatch.setattr(rl_module, "rl", lambda settings, on_step=None, status=status: {"status": status})
        assert main(["--device", "cpu"]) == code == EXIT_CODES[status]


def out_of_memory_on_call(function, call):
    """function, raising CUDA's out-of-memory error (as a card would) on its `call`-th call."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. (simulated)")
        return function(*args, **kwargs)
    return wrapped


def test_out_of_memory_in_a_step_saves_the_last_whole_step_and_the_resume_is_bit_identical(
        tmp_path, rl_base_dir, question_file, monkeypatch, capsys):
    from sciassist.train import rl as rl_module
    hook = "tests.train.test_rl:reply_length_reward"
    whole = tiny_rl(rl_base_dir, question_file, tmp_path / "whole", reward_fn=hook)
    assert rl(whole)["status"] == "completed"
    flags = ["--data_path", str(question_file), "--base_dir", str(rl_base_dir), "--source", "base", "--out_dir",
             str(tmp_path / "cut"), "--output_tag", "run", "--num_steps", "3", "--questions_per_step", "2",
             "--samples_per_question", "3", "--max_new_tokens", "6", "--generation_batch_size", "4",
             "--device_batch_size", "2", "--init_lr_frac", "1.0", "--matrix_lr", "0.05", "--embedding_lr", "0.5",
             "--unembedding_lr", "0.05", "--device", "cpu", "--dtype", "float32", "--reward_fn", hook]
    with monkeypatch.context() as patch:  # step 3's sampling runs out of memory
        patch.setattr(rl_module, "sample_and_accumulate", out_of_memory_on_call(rl_module.sample_and_accumulate, 3))
        capsys.readouterr()
        assert rl_module.main(flags) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (beside tqdm's bar)
    assert len(err) == 1 and err[0].startswith("error: out of memory in step 3 (its sampling or its policy gradient)")
    assert "resume point of step 2 saved" in err[0]
    assert err[0].endswith("Run again with the same flags --resume and --generation_batch_size 2 and "
                           "--device_batch_size 1")
    cut_dir = tmp_path / "cut" / "run"
    summary = json.loads((cut_dir / "run_summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("out_of_memory", 2) and "out of memory" in summary["error"]
    assert rl_module.main([*flags, "--resume"]) == 0
    a = torch.load(whole.run_dir() / "resume" / "state.pt", weights_only=True)
    b = torch.load(cut_dir / "resume" / "state.pt", weights_only=True)
    assert any(r["updated"] for r in a["metrics"])
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["optimizers"], b["optimizers"])
    assert comparable(a["metrics"]) == comparable(b["metrics"])


def test_out_of_memory_in_the_update_keeps_the_last_saved_point(tmp_path, rl_base_dir, question_file, monkeypatch):
    from sciassist.train import rl as rl_module
    hook = "tests.train.test_rl:reply_length_reward"
    monkeypatch.setattr(rl_module, "apply_update", out_of_memory_on_call(rl_module.apply_update, 2))
    with pytest.raises(rl_module.RLOutOfMemory, match=r"in the update of step 2 .*the update was cut short, so no "
                                                       r"resume point could be saved\. Run again with the same flags "
                                                       r"and --generation_batch_size 2"):
        rl(tiny_rl(rl_base_dir, question_file, tmp_path / "a", reward_fn=hook))
    assert not (tmp_path / "a" / "run" / "resume" / "state.pt").exists()
    monkeypatch.setattr(rl_module, "apply_update", out_of_memory_on_call(step_module_apply_update(), 3))
    with pytest.raises(rl_module.RLOutOfMemory, match=r"the resume point of step 2 .* stands\. Run again with the "
                                                       r"same flags --resume"):
        rl(tiny_rl(rl_base_dir, question_file, tmp_path / "b", reward_fn=hook, save_every=1))


def step_module_apply_update():
    from sciassist.train.step import apply_update
    return apply_update


def test_out_of_memory_in_a_validation_keeps_the_step(tmp_path, rl_base_dir, question_file, monkeypatch):
    from sciassist.train import rl as rl_module
    monkeypatch.setattr(rl_module, "_validate", out_of_memory_on_call(rl_module._validate, 3))  # step 0, 1, then 2
    with pytest.raises(rl_module.RLOutOfMemory, match=r"in the validation of step 2 \(the step itself is kept"):
        rl(tiny_rl(rl_base_dir, question_file, tmp_path, val_path=str(question_file), eval_every=1,
                   eval_questions=2, val_questions=0))
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2] and records[-1]["validation"] == "out of memory"
    assert torch.load(tmp_path / "run" / "resume" / "state.pt", weights_only=True)["step"] == 2

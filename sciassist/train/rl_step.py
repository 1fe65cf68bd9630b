"""One RL step's work before the update: sample the replies, reward them, and accumulate the
policy gradient; plus the step's metrics record.

Sampling. Every question's prompt (the tokenizer's chat rendering for completion, as the
evaluator renders it) is repeated samples_per_question times and the rows are decoded together
with the KV-cache engine (nanochat.engine.Engine.generate_multi), generation_batch_size rows per
call, the model in eval mode (LoRA's dropout off). Every row of the step has its own seed, drawn
from the step's generator (row_seeds), and its own random generator: a reply does not depend on
the rows decoded beside it, nor on which rank of a torchrun run decodes it (sciassist.train.rl_ranks).
A reply ends at <|assistant_end|> (not part of the reply, nor trained on, as in nanochat) or is cut
at max_new_tokens (truncated).

Policy gradient (on-policy REINFORCE, no KL, no clipping). With A the reply's advantage and
log p the policy's log-probability of each sampled token, computed under the run's precision:

    loss = - sum over replies, over their tokens, of A x log p(token)  /  N

N is the number of sampled tokens of the step (--token_normalization all_samples, nanochat's
token-level normalisation) or of the replies in groups with a reward spread (spread_groups).
Groups without spread have zero advantages: they are not run through the model at all.
Each trained group's prompt runs once (nanochat.gpt.SharedPrefix: all of it but its last token,
keys and values kept with their graph); a micro-batch is then up to device_batch_size replies of
one group, each row its prompt's last token followed by the reply (right-padded), attending to
the shared prompt. Micro-batches never mix prompts; the prompt's own backward runs once, after
its group's micro-batches. The gradient equals running every reply after its own copy of the prompt
(rounding aside), with one exception under LoRA dropout: the prompt's dropout mask is drawn once
and shared by the group's replies. Micro-batches each add their share of the same sum, and N
counts the whole step's tokens on every rank, so the gradient does not depend on how the step is
split into micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from dataclasses import dataclass

import torch

from sciassist.data.answers import LETTERS
from sciassist.train.rl_ranks import all_reduce_gradients, gathered, share, summed
from sciassist.train.rl_reward import custom_reward, group_advantages, parsed_answer, verifiable_reward

INVALID = "invalid"  # the letter histogram's key for replies without an accepted answer


@dataclass
class Sample:
    """One sampled reply of a step."""

    group: int  # the question's position in the step
    prompt: list  # prompt token ids
    reply: list  # reply token ids (no stop token)
    truncated: bool  # cut at max_new_tokens
    text: str
    reward: float
    predicted: int | None  # the option index the parser reads (None: invalid)
    advantage: float = 0.0


@dataclass
class StepWork:
    """What one step's sampling and forward/backward did (all ranks together)."""

    samples: list
    questions: list
    spread: list  # per group: whether its rewards differ
    loss: float  # the step's loss (the normalised objective above)
    neg_logp: float | None  # mean -log p of the tokens trained on (None: no group had a spread)
    trained_tokens: int
    sample_time_s: float  # the slowest rank's


def row_seeds(generator: torch.Generator, num_rows: int) -> list[int]:
    """One sampling seed per row of a step (question after question, its replies in a row), drawn
    from the step's generator."""
    return torch.randint(0, 2**62, (num_rows,), generator=generator).tolist()


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode for the block (dropout off), then in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def sample_rows(engine, rows, rows_per_call, seeds, max_tokens, temperature, top_k):
    """(reply tokens, truncated) of every prompt in `rows`, row i sampled with seeds[i], decoded
    rows_per_call at a time."""
    results = []
    for start in range(0, len(rows), rows_per_call):
        chunk = rows[start:start + rows_per_call]
        outputs = engine.generate_multi(chunk, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                        seeds=seeds[start:start + rows_per_call])
        # generate_multi stops a row at its stop token or after this many tokens
        limit = min(max_tokens, engine.model.rotary_seq_len - max(len(p) for p in chunk))
        results.extend((tokens, len(tokens) >= limit) for tokens in outputs)
    return results


def reward_samples(run, questions, prompts, sampled, k, first_group=0) -> tuple[list[Sample], list[bool]]:
    """Samples with their rewards and group-relative advantages; per group whether it has a spread.
    first_group: the position in the step of questions[0] (a rank's share starts there)."""
    s, tokenizer = run.settings, run.tokenizer
    samples = []
    for row, (tokens, truncated) in enumerate(sampled):
        group = row // k
        question = questions[group]
        text = tokenizer.decode(tokens)
        if run.reward_fn is not None:
            predicted = parsed_answer(text, question.choices, run.answer_format)
            reward = custom_reward(run.reward_fn, s.reward_fn, question.messages, text, question.record)
        else:
            reward, predicted = verifiable_reward(text, question.choices, question.answer, run.answer_format,
                                                  s.invalid_reward, s.format_bonus)
        samples.append(Sample(group=first_group + group, prompt=prompts[group], reply=tokens, truncated=truncated,
                              text=text, reward=reward, predicted=predicted))
    spread = []
    for group in range(len(questions)):
        members = samples[group * k:(group + 1) * k]
        advantages, has_spread = group_advantages([m.reward for m in members])
        for member, advantage in zip(members, advantages, strict=True):
            member.advantage = advantage
        spread.append(has_spread)
    return samples, spread


def by_prompt(trained) -> list[list]:
    """The trained replies grouped by prompt (a question's replies share theirs), in order."""
    groups = {}
    for x in trained:
        groups.setdefault(tuple(x.prompt), []).append(x)
    return list(groups.values())


def policy_batch(samples, pad_id, device) -> dict:
    """Rows of replies to one prompt that continue its shared prefix (the prompt but its last
    token): inputs = the prompt's last token then the reply but its last token, targets = the
    reply (-1 at the right padding); the flat indices of the reply positions (supervised_index)
    and each row's advantage."""
    width = max(len(x.reply) for x in samples)
    inputs = torch.full((len(samples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), width), -1, dtype=torch.long)
    supervised = []
    for i, x in enumerate(samples):
        n = len(x.reply)
        inputs[i, :n] = torch.tensor(x.prompt[-1:] + x.reply[:-1], dtype=torch.long)
        targets[i, :n] = torch.tensor(x.reply, dtype=torch.long)
        supervised.append(torch.arange(i * width, i * width + n))
    advantages = torch.tensor([x.advantage for x in samples], dtype=torch.float32)
    return {"inputs": inputs.to(device), "targets": targets.to(device), "advantages": advantages.to(device),
            "supervised_index": torch.cat(supervised).to(device), "tokens": sum(len(x.reply) for x in samples)}


def policy_objective(model, prefix, batch, autocast=None):
    """(sum over the batch's reply tokens of -A x log p, a tensor with gradient; the sum of -log p,
    detached), the rows continuing `prefix` (a nanochat.gpt.SharedPrefix). The model's
    loss_reduction "none" gives -log p of each target (0 where ignored); given the reply positions
    it computes logits only there."""
    with autocast if autocast is not None else contextlib.nullcontext():
        neg_logp = model(batch["inputs"], batch["targets"], kv_cache=prefix, loss_reduction="none",
                         supervised_index=batch["supervised_index"])
    neg_logp = neg_logp.float()
    return (neg_logp * batch["advantages"].unsqueeze(1)).sum(), neg_logp.detach().sum()


def accumulate_policy_gradient(model, trained, denominator, rows_per_pass, pad_id, autocast=None, scaler=None):
    """Backward of the step's loss over `trained` (replies with at least one token): per prompt
    (a group's), the prompt once, then micro-batches of up to rows_per_pass of its replies; returns (loss, summed
    -log p)."""
    loss_total, neg_logp_total = [], []  # summed once at the end: one device sync per step, not per pass
    device = model.get_device()
    for members in by_prompt(trained):
        with autocast if autocast is not None else contextlib.nullcontext():
            prompt = torch.tensor([members[0].prompt[:-1]], dtype=torch.long, device=device)
            prefix = model.shared_prefix(prompt)
        leaves = prefix.detached()  # the micro-batches' gradients gather there
        for start in range(0, len(members), rows_per_pass):
            batch = policy_batch(members[start:start + rows_per_pass], pad_id, device)
            objective, neg_logp = policy_objective(model, leaves, batch, autocast)
            loss = objective / denominator
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss_total.append(loss.detach())
            neg_logp_total.append(neg_logp)
        prefix.backward_from(leaves)  # the prompt's backward, once per group
    if not loss_total:
        return 0.0, 0.0
    return torch.stack(loss_total).double().sum().item(), torch.stack(neg_logp_total).double().sum().item()


def sample_and_accumulate(run, questions, generator) -> StepWork:
    """Sample this rank's share of the step's replies, reward them, and accumulate the policy
    gradient of the whole step, summed over the ranks (not applied). `questions` are the step's
    (the same on every rank); the returned work is the whole step's."""
    s, k, runtime = run.settings, run.settings.samples_per_question, run.runtime
    t0 = time.time()
    seeds = row_seeds(generator, len(questions) * k)  # the whole step's: a row's seed is the same on any rank
    mine = share(len(questions), runtime)
    prompts = [run.tokenizer.render_for_completion(questions[i].messages) for i in mine]
    rows = [p for p in prompts for _ in range(k)]
    with evaluating(run.model):
        sampled = sample_rows(run.engine, rows, run.batches.generation, seeds[mine.start * k:mine.stop * k],
                              s.max_new_tokens, s.temperature, s.top_k or None)
    own, own_spread = reward_samples(run, [questions[i] for i in mine], prompts, sampled, k, first_group=mine.start)
    # every rank learns the whole step: its divisor and its metrics are those of one process
    parts = gathered(runtime, [(own, own_spread, time.time() - t0)])
    samples = [x for part_samples, _, _ in parts for x in part_samples]
    spread = [has for _, part_spread, _ in parts for has in part_spread]
    sample_time = max(seconds for _, _, seconds in parts)
    counted = samples if s.token_normalization == "all_samples" else [x for x in samples if spread[x.group]]
    denominator = max(1, sum(len(x.reply) for x in counted))
    trained_tokens = sum(len(x.reply) for x in samples if spread[x.group])
    trained = [x for x in own if spread[x.group] and x.reply]  # this rank's share of the gradient
    loss, neg_logp_sum = 0.0, 0.0
    if trained:
        loss, neg_logp_sum = accumulate_policy_gradient(run.model, trained, denominator, run.batches.update,
                                                        run.pad_id, run.precision.autocast(), run.scaler)
    if trained_tokens:
        all_reduce_gradients(run.model, runtime)
        loss, neg_logp_sum = summed(runtime, [loss, neg_logp_sum])
    return StepWork(samples=samples, questions=questions, spread=spread, loss=loss,
                    neg_logp=neg_logp_sum / trained_tokens if trained_tokens else None,
                    trained_tokens=trained_tokens, sample_time_s=sample_time)


def letter_histogram(letters) -> dict:
    """Counts of letters in A, B, ... order, then "invalid"; letters absent are left out."""
    counts = Counter(letters)
    return {key: counts[key] for key in [*LETTERS, INVALID] if counts[key]}


def step_metrics(work: StepWork) -> dict:
    """The sampling figures of a step's metrics record."""
    samples, questions = work.samples, work.questions
    n = len(samples)
    rewards = [x.reward for x in samples]
    mean = sum(rewards) / n
    without_spread = sum(not has for has in work.spread)
    return {
        "reward_mean": mean,
        "reward_std": math.sqrt(sum((r - mean) ** 2 for r in rewards) / n),
        "accuracy": sum(x.predicted == questions[x.group].answer for x in samples) / n,
        "invalid_rate": sum(x.predicted is None for x in samples) / n,
        "zero_spread_groups": without_spread,
        "zero_spread_fraction": without_spread / len(work.spread),
        "trained_samples": sum(1 for x in samples if work.spread[x.group] and x.reply),
        "trained_tokens": work.trained_tokens,
        "sampled_tokens": sum(len(x.reply) for x in samples),
        "reply_tokens_mean": sum(len(x.reply) for x in samples) / n,
        "truncated_rate": sum(x.truncated for x in samples) / n,
        "neg_logp_per_token": work.neg_logp,
        "loss": work.loss,
        "predicted_letters": letter_histogram(LETTERS[x.predicted] if x.predicted is not None else INVALID
                                              for x in samples),
        "gold_letters": letter_histogram(questions[x.group].gold_letter for x in samples),
        "sample_time_s": work.sample_time_s,
    }

"""
The RL stage's step against a stand-in of nanochat's chat_rl.py loop, side by side in one run.

    python bench/bench_rl.py                                  # a random d3-sized model, the bundled sample
    python bench/bench_rl.py --checkpoint /tmp/recipe-cpu-fp32/sft/cpu \\
        --data /tmp/recipe-cpu-fp32/data/scienceqa_train.jsonl

Both loops do the same unit of work on the same model object, from the same weights: --steps
optimizer steps of --questions questions (the same questions, options shuffled the same way) x
--samples replies each, at most --max_new_tokens per reply, the same temperature and top-k, the
same reward (the evaluator's strict parser), the same optimizers (the project's Muon + AdamW,
built by sciassist.train.setup.build_optimizers) and the same precision (fp32 by default, as
nanochat runs on CPU). Before each timed unit the weights are put back and the optimizers built
anew, so every repeat of a loop does the same computation; the loops alternate (A B A B) so that
load from other processes falls on both alike. Times are per optimizer step, medians over the
repeats; one untimed unit of each loop comes first (--warmup).

"sciassist" is the project's step as sciassist.train.rl runs it: sciassist.train.rl_step's
sample_and_accumulate (every question's k prompts decoded together by Engine.generate_multi,
--generation_batch_size rows per call, each row from its own seeded generator; rewards; the
policy gradient of the groups whose rewards differ: each group's prompt run once, then
micro-batches of up to --device_batch_size of its replies), then apply_update. The metrics
record, validation and saving that rl.py adds around it are left out.

"nanochat" is a stand-in of chat_rl.py's loop (karpathy/nanochat, scripts/chat_rl.py), written
from its description, not copied:
  reproduced: per question, the prompt rendered for completion and sampled with
    Engine.generate_batch in num_samples / device_batch_size calls of device_batch_size rows
    (each call a batch-1 prefill, then the rows decoded together until all stop or the limit),
    seeded by hash((step, question, call)); the sequences right-padded to the question's longest
    with <|assistant_end|>; inputs = ids[:, :-1], targets = ids[:, 1:] with -1 where the mask is 0
    (prompt and padding); advantages = reward - the group's mean (no std); per pass of
    device_batch_size rows logp = -model(inputs, targets, loss_reduction='none'), the objective
    sum(logp x advantage) / (valid tokens of the pass x passes x questions), loss = -objective,
    backward; every question's rows run through the model, zero advantages included; one
    optimizer step after the step's questions, lr x (1 - step / steps).
  differs: the sampling is this repository's Engine.generate_batch (nanochat/engine.py), which
    has nanochat's semantics since Dec 2025 (each row's first token sampled on its own; Nov 2025
    broadcast the prefill's one token to every row) but no calculator tool: nanochat's per-token
    tool state machine (a few Python comparisons per row and token) is not run, and every
    sampled token has mask 1. The model is this repository's GPT, whose loss_reduction='none'
    computes the logits of every position as nanochat's does; the optimizers are the project's
    (torch.optim.Muon, not nanochat's compiled Muon: the same math, see docs). The reward is the
    project's parser instead of GSM8K's. No evaluation, logging, wandb or checkpointing.

Columns: rollout = the time inside the engine's sampling calls; update = everything else of the
step (rewards, padding, forward/backward, the optimizer step). Both sample on their own (different
batching, so different random draws), so their replies differ in length: the table gives each
loop's mean reply length and counts throughput in its own sampled tokens. "trained rows" are the
replies run through forward/backward; "update positions" the positions those passes processed
(rows x padded width, prompt positions included; SciAssist's: each trained group's prompt once,
plus rows x padded reply width). On one CPU thread, times are the process's CPU
seconds (time.process_time: time other processes hold the core is not counted), with wall-clock
totals beside them. A random model's replies earn nothing: no group has a reward spread, so the
project's step skips its update while the stand-in runs every row; use a trained --checkpoint for
figures that mean something.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from random_model import random_gpt  # noqa: E402

from nanochat.checkpoint import save_checkpoint  # noqa: E402
from nanochat.gpt import GPTConfig  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from sciassist.data.conversations import write_conversations  # noqa: E402
from sciassist.train import setup as train_setup  # noqa: E402
from sciassist.train.rl import dropout_generator, prepare_rl_run  # noqa: E402
from sciassist.train.rl_batch import CPU_GENERATION_ROWS, CPU_UPDATE_REPLIES  # noqa: E402
from sciassist.train.rl_questions import step_generator, step_questions  # noqa: E402
from sciassist.train.rl_reward import verifiable_reward  # noqa: E402
from sciassist.train.rl_settings import RLSettings  # noqa: E402
from sciassist.train.rl_step import by_prompt, sample_and_accumulate  # noqa: E402
from sciassist.train.setup import Runtime  # noqa: E402
from sciassist.train.step import apply_update, lr_multiplier, set_learning_rates  # noqa: E402

LOOPS = ("sciassist", "nanochat")


class Clock:
    """CPU and wall seconds spent inside calls, summed."""

    def __init__(self):
        self.cpu = self.wall = 0.0

    def timed(self, function, *args, **kwargs):
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            self.cpu += time.process_time() - c0
            self.wall += time.perf_counter() - w0


class TimedEngine:
    """The engine with its sampling calls timed (everything else passed through)."""

    def __init__(self, engine, clock):
        self.engine, self.clock = engine, clock

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_multi(self, *args, **kwargs):
        return self.clock.timed(self.engine.generate_multi, *args, **kwargs)

    def generate_batch(self, *args, **kwargs):
        return self.clock.timed(self.engine.generate_batch, *args, **kwargs)


# ----------------------------------------------------------------------------- the two loops

def sciassist_unit(run, steps, clock) -> dict:
    """`steps` of the project's RL step (as rl.py's loop runs them) from run's current weights."""
    s = run.settings
    engine, run.engine = run.engine, TimedEngine(run.engine, clock)
    totals = {"samples": 0, "reply_tokens": 0, "trained_rows": 0, "update_positions": 0, "reward": 0.0}
    try:
        for step in range(steps):
            generator = step_generator(s.seed, step)
            questions = step_questions(run.questions, step, s.questions_per_step, s.seed,
                                       generator if s.shuffle_options else None)
            with dropout_generator(run, step):
                work = sample_and_accumulate(run, questions, generator)
            multiplier = lr_multiplier(step, steps)
            if work.trained_tokens:
                apply_update(run.model, run.optimizers, multiplier, 0.0, run.scaler)
            else:
                set_learning_rates(run.optimizers, multiplier)
            trained = [x for x in work.samples if work.spread[x.group] and x.reply]
            totals["samples"] += len(work.samples)
            totals["reply_tokens"] += sum(len(x.reply) for x in work.samples)
            totals["reward"] += sum(x.reward for x in work.samples)
            totals["trained_rows"] += len(trained)
            for members in by_prompt(trained):  # each prompt once (but its last token), then its replies' rows
                totals["update_positions"] += len(members[0].prompt) - 1
                for start in range(0, len(members), s.device_batch_size):
                    chunk = members[start:start + s.device_batch_size]
                    totals["update_positions"] += len(chunk) * max(len(x.reply) for x in chunk)
    finally:
        run.engine = engine
    return totals


def nanochat_unit(run, steps, clock) -> dict:
    """`steps` of the stand-in of chat_rl.py's loop (see the module docstring) on run's model."""
    s, model, tokenizer = run.settings, run.model, run.tokenizer
    engine = TimedEngine(run.engine, clock)
    device = model.get_device()
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    k, rows_per_pass = s.samples_per_question, s.device_batch_size
    totals = {"samples": 0, "reply_tokens": 0, "trained_rows": 0, "update_positions": 0, "reward": 0.0}
    for step in range(steps):
        generator = step_generator(s.seed, step)
        questions = step_questions(run.questions, step, s.questions_per_step, s.seed,
                                   generator if s.shuffle_options else None)
        for index, question in enumerate(questions):
            prompt = tokenizer.render_for_completion(question.messages)
            with torch.no_grad():
                model.eval()
                sequences, masks = [], []
                for call in range(k // rows_per_pass):
                    seed = hash((step, index, call)) & 0x7FFFFFFF
                    got, got_masks = engine.generate_batch(prompt, num_samples=rows_per_pass,
                                                           max_tokens=s.max_new_tokens, temperature=s.temperature,
                                                           top_k=s.top_k or None, seed=seed)
                    sequences += got
                    masks += got_masks
                rewards = [verifiable_reward(tokenizer.decode(x[len(prompt):]), question.choices, question.answer,
                                             run.answer_format, s.invalid_reward, s.format_bonus)[0]
                           for x in sequences]
                longest = max(len(x) for x in sequences)
                ids = torch.tensor([x + [assistant_end] * (longest - len(x)) for x in sequences], device=device)
                mask = torch.tensor([m + [0] * (longest - len(m)) for m in masks], device=device)
                inputs, targets = ids[:, :-1], ids[:, 1:].clone()
                targets[mask[:, 1:] == 0] = -1
                rewards = torch.tensor(rewards, dtype=torch.float, device=device)
                advantages = rewards - rewards.mean()
            model.train()
            passes = inputs.size(0) // rows_per_pass
            for p in range(passes):
                rows = slice(p * rows_per_pass, (p + 1) * rows_per_pass)
                with run.precision.autocast():
                    logp = -model(inputs[rows], targets[rows], loss_reduction="none").view_as(inputs[rows])
                objective = (logp * advantages[rows].unsqueeze(-1)).sum()
                valid = (targets[rows] >= 0).sum().clamp(min=1)
                loss = -objective / (valid * passes * len(questions))
                loss.backward()
            totals["samples"] += len(sequences)
            totals["reply_tokens"] += sum(len(x) - len(prompt) for x in sequences)
            totals["reward"] += rewards.sum().item()
            totals["trained_rows"] += inputs.size(0)
            totals["update_positions"] += inputs.numel()
        multiplier = 1.0 - step / steps
        set_learning_rates(run.optimizers, multiplier)
        for opt in run.optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return totals


UNITS = {"sciassist": sciassist_unit, "nanochat": nanochat_unit}


def timed_unit(run, loop, steps, initial) -> dict:
    """One unit of `loop` from the initial weights and fresh optimizers: its times and counts."""
    run.model.load_state_dict(initial)
    run.model.zero_grad(set_to_none=True)
    run.optimizers = train_setup.build_optimizers(run.model, run.settings)
    clock = Clock()
    c0, w0 = time.process_time(), time.perf_counter()
    totals = UNITS[loop](run, steps, clock)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {**totals, "cpu_s": cpu, "wall_s": wall, "rollout_cpu_s": clock.cpu, "rollout_wall_s": clock.wall}


# ----------------------------------------------------------------------------- setup

def sample_questions_file(folder: Path) -> Path:
    """The bundled ScienceQA sample's train questions as a prepared JSONL (the default --data)."""
    from sciassist.data import scienceqa as sqa
    options = sqa.FormatOptions()
    records = [sqa.format_record(r, options) for r in sqa.load_scienceqa("sample", "train")
               if sqa.skip_reason(r, options) is None]
    path = folder / "questions.jsonl"
    write_conversations(path, records)
    return path


def random_checkpoint(folder: Path, data: Path, args) -> Path:
    """A random GPT (bench/random_model.py) and a tokenizer trained on the questions, saved as a
    checkpoint folder with its tokenizer beside."""
    from sciassist.data.conversations import read_conversations
    texts = [m["content"] for r in read_conversations(data, require_assistant=False) for m in r["messages"]]
    tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size)
    heads = max(1, args.n_embd // 32)
    config = GPTConfig(sequence_len=512, vocab_size=tokenizer.get_vocab_size(), n_layer=args.n_layer, n_head=heads,
                       n_kv_head=heads, n_embd=args.n_embd)
    checkpoint = folder / "random"
    save_checkpoint(checkpoint, 0, random_gpt(config, "cpu"), {})
    tokenizer.save(checkpoint / "tokenizer")
    return checkpoint


def bench(args) -> dict:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else sample_questions_file(tmp)
        checkpoint = args.checkpoint or str(random_checkpoint(tmp, data, args))
        settings = RLSettings(data_path=str(data), checkpoint=checkpoint, questions_per_step=args.questions,
                              samples_per_question=args.samples, max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k,
                              generation_batch_size=args.generation_batch_size,
                              device_batch_size=args.device_batch_size, num_steps=args.steps, device=args.device,
                              dtype=args.dtype, seed=args.seed, out_dir=str(tmp / "runs"))
        run = prepare_rl_run(settings, Runtime(device=torch.device(args.device)), None)
        initial = {name: t.detach().clone() for name, t in run.model.state_dict().items()}
        for _ in range(args.warmup):
            for loop in LOOPS:
                timed_unit(run, loop, 1, initial)
        units = {loop: [] for loop in LOOPS}
        for _ in range(args.repeats):
            for loop in LOOPS:
                units[loop].append(timed_unit(run, loop, args.steps, initial))
        model = run.model
        return {
            "machine": machine(), "torch": torch.__version__, "threads": args.threads, "device": args.device,
            "precision": run.precision.name, "model": run.source["model_file"] if args.checkpoint else "random",
            "n_layer": model.config.n_layer, "n_embd": model.config.n_embd, "vocab_size": model.config.vocab_size,
            "params": model.num_params(), "data": str(args.data or "the bundled sample (train)"),
            "questions_available": len(run.questions), "steps": args.steps, "repeats": args.repeats,
            "questions": args.questions, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_k": args.top_k,
            "generation_batch_size": args.generation_batch_size, "device_batch_size": args.device_batch_size,
            "rows": {loop: summary(units[loop], args.steps) for loop in LOOPS},
        }


def machine() -> str:
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags |= set(line.split()) & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
                    break
    except OSError:
        pass
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({', '.join(sorted(flags)) or 'no avx2'}; {os.cpu_count()} cores)"


def summary(units, steps) -> dict:
    """Per-step medians over the repeats (every repeat is the same computation)."""
    def median(key):
        return statistics.median(u[key] for u in units) / steps

    cpu, rollout = median("cpu_s"), median("rollout_cpu_s")
    wall, rollout_wall = median("wall_s"), median("rollout_wall_s")
    samples, tokens = median("samples"), median("reply_tokens")
    return {"rollout_cpu_s": rollout, "update_cpu_s": cpu - rollout, "cpu_s": cpu,
            "rollout_wall_s": rollout_wall, "update_wall_s": wall - rollout_wall, "wall_s": wall,
            "samples_per_s": samples / cpu, "tokens_per_s": tokens / cpu, "reply_tokens_mean": tokens / samples,
            "reward_mean": median("reward") / samples, "trained_rows": median("trained_rows"),
            "update_positions": median("update_positions"), "samples": samples,
            "cpu_s_by_repeat": [u["cpu_s"] / steps for u in units]}


def table(result) -> str:
    r = result["rows"]
    ours, theirs = r["sciassist"], r["nanochat"]
    lines = [f"{result['machine']}, torch {result['torch']}, {result['threads']} thread(s), {result['precision']}; "
             f"model {result['model']} (d{result['n_layer']}, n_embd {result['n_embd']}, vocab "
             f"{result['vocab_size']:,}, {result['params']:,} params); {result['steps']} step(s) of "
             f"{result['questions']} questions x {result['samples']} samples, at most {result['max_new_tokens']} new "
             f"tokens, T={result['temperature']:g}, top-k {result['top_k']}, device batch "
             f"{result['device_batch_size']} (SciAssist decodes {result['generation_batch_size']} rows per call); "
             f"medians of {result['repeats']} alternated repeats, per step",
             "",
             "| loop | rollout CPU s | update CPU s | total CPU s | total wall s | samples/s | reply tokens/s | "
             "mean reply tokens | reward | trained rows | update positions |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for loop, name in (("sciassist", "SciAssist (rl_step)"), ("nanochat", "nanochat chat_rl.py stand-in")):
        x = r[loop]
        lines.append(f"| {name} | {x['rollout_cpu_s']:.2f} | {x['update_cpu_s']:.2f} | {x['cpu_s']:.2f} | "
                     f"{x['wall_s']:.2f} | {x['samples_per_s']:.1f} | {x['tokens_per_s']:.0f} | "
                     f"{x['reply_tokens_mean']:.1f} | {x['reward_mean']:.3f} | {x['trained_rows']:.0f} | "
                     f"{x['update_positions']:,.0f} |")
    lines.append(f"| ratio (stand-in time / SciAssist time) | {ratio(theirs, ours, 'rollout_cpu_s')} | "
                 f"{ratio(theirs, ours, 'update_cpu_s')} | **{ratio(theirs, ours, 'cpu_s')}** | "
                 f"{ratio(theirs, ours, 'wall_s')} | {ratio(ours, theirs, 'samples_per_s')} | "
                 f"{ratio(ours, theirs, 'tokens_per_s')} | | | | |")
    return "\n".join(lines)


def ratio(a, b, key):
    return f"{a[key] / b[key]:.2f}x" if b[key] > 0 else "-"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a model folder (nanochat layout, tokenizer beside); default: a random "
                                             "model of --n_layer / --n_embd with a tokenizer trained on --data")
    parser.add_argument("--data", help="prepared questions (JSONL with meta.choices and meta.answer); default: the "
                                       "bundled ScienceQA sample's train split")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed unit")
    parser.add_argument("--repeats", type=int, default=2, help="timed units of each loop, alternated")
    parser.add_argument("--warmup", type=int, default=1, help="untimed one-step units of each loop first")
    parser.add_argument("--questions", type=int, default=16, help="questions per step")
    parser.add_argument("--samples", type=int, default=16, help="replies per question (a multiple of "
                                                                 "--device_batch_size, as chat_rl.py needs)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    # the sizes --generation_batch_size / --device_batch_size auto take on a CPU (sciassist.train.rl_batch)
    parser.add_argument("--generation_batch_size", type=int, default=CPU_GENERATION_ROWS)
    parser.add_argument("--device_batch_size", type=int, default=CPU_UPDATE_REPLIES)
    parser.add_argument("--dtype", default="float32", help="precision of both loops (float32: nanochat on CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--n_layer", type=int, default=3, help="random model's depth")
    parser.add_argument("--n_embd", type=int, default=128, help="random model's width")
    parser.add_argument("--vocab_size", type=int, default=2048, help="random model's tokenizer vocabulary")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.samples % args.device_batch_size:
        parser.error("--samples must be a multiple of --device_batch_size (chat_rl.py samples in whole batches)")
    return args


def main(argv=None):
    args = parse_args(argv)
    result = bench(args)
    text = table(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "table": text}, indent=1))
    return result


if __name__ == "__main__":
    main()

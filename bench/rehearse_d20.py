"""
A rehearsal of the real job at the real scale, on CPU: a randomly initialised d20 written in
exactly the published layout, then the real commands on it, each a subprocess.

    python bench/rehearse_d20.py [--work DIR] [--append [FILE]] [--steps 2] [--stop_after STAGE]

1. tokenizer: 65,536 tokens (tokenizer/tokenizer.pkl + token_bytes.pt) trained with
   nanochat.tokenizer.Tokenizer.train_from_iterator on the ScienceQA train text (question, choices,
   hint, lecture, solution; /work/shared/scienceqa) plus 300,000 seeded random lowercase pseudo-words:
   ScienceQA alone has pairs for only ~24,500 merges, the pseudo-words supply the rest.
2. model: nanochat's d20 (20 layers, 1280 wide, 10 heads, vocab 65,536), random init, saved as
   the published files are: chatsft_checkpoints/d20/model_000650.pt (keys `_orig_mod.`-prefixed,
   wte bf16, the rest fp32) and meta_000650.json (model_config, step, val_loss, mmlu_acc,
   arc_easy_acc).
3. data: `python -m sciassist.data.prepare` on the ScienceQA copy (a small train set, 16 val).
4. `sciassist_train.py --dry_run` (the memory plan), then `sciassist_train.py` for --steps
   optimizer steps at device batch 1 x 512 positions, a resume point after every step.
5. load the result back (seconds), `sciassist_evaluate.py` letter scoring + generation on 16 val
   questions, one `python -m sciassist.serve.chat_cli --prompt` reply.
Prints a table (peak RSS of each command, from os.wait4; seconds per step from metrics.jsonl;
checkpoint bytes; load seconds; the planner's estimate beside the measured peak) and with --append
adds it to bench/RESULTS.md (tracked by git; or to FILE), saying where. d32 (1.9B parameters: 30 GB
to fine-tune in fp32) does not fit this 24 GB machine: only its plan is printed.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from random_model import random_gpt  # noqa: E402

from nanochat.gpt import config_for_depth  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from sciassist.train import plan  # noqa: E402

SCIENCEQA = Path("/work/shared/scienceqa")
RESULTS_FILE = REPO_ROOT / "bench" / "RESULTS.md"
STEP = 650
STAGES = ("tokenizer", "model", "data", "dry_run", "train", "load", "evaluate", "chat")
GIB = 2**30


def scienceqa_train_texts(source=SCIENCEQA):
    problems = json.loads((source / "problems.json").read_text(encoding="utf-8"))
    pids = json.loads((source / "pid_splits.json").read_text(encoding="utf-8"))["train"]
    fields = ("question", "hint", "lecture", "solution")
    return [" ".join([*(str(problems[p].get(f) or "") for f in fields), " ".join(problems[p].get("choices") or [])])
            for p in pids]


def pseudo_words(lines=3000, per_line=100, seed=0):
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [" ".join("".join(rng.choice(letters) for _ in range(rng.randint(4, 12))) for _ in range(per_line))
            for _ in range(lines)]


def write_tokenizer(base):
    tok = Tokenizer.train_from_iterator(scienceqa_train_texts() + pseudo_words(), vocab_size=65536)
    assert tok.get_vocab_size() == 65536
    tok.save(base / "tokenizer")


def write_d20(base):
    """The published layout; returns the checkpoint bytes."""
    config = config_for_depth(20)
    model = random_gpt(config, "cpu")
    folder = base / "chatsft_checkpoints" / "d20"
    folder.mkdir(parents=True, exist_ok=True)
    state = {"_orig_mod." + k: (v.bfloat16() if k == "transformer.wte.weight" else v.float())
             for k, v in model.state_dict().items()}
    torch.save(state, folder / f"model_{STEP:06d}.pt")
    c = config
    meta = {"step": STEP, "val_loss": 1.02, "mmlu_acc": 0.31, "arc_easy_acc": 0.38,
            "model_config": {"sequence_len": c.sequence_len, "vocab_size": c.vocab_size, "n_layer": c.n_layer,
                             "n_head": c.n_head, "n_kv_head": c.n_kv_head, "n_embd": c.n_embd}}
    (folder / f"meta_{STEP:06d}.json").write_text(json.dumps(meta, indent=2))
    return (folder / f"model_{STEP:06d}.pt").stat().st_size


def run(cmd, log, timeout=None):
    """Run a command; (exit code, seconds, peak RSS bytes of that process, output tail)."""
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.kill()
            raise
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    tail = Path(log).read_text(errors="replace")[-1500:]
    return proc.returncode, seconds, usage.ru_maxrss * 1024, tail


def rehearse(work, steps, stop_after, figures, done):
    """Run the stages in order, filling `figures` and `done` (so a failed stage still reports the rest)."""
    base, data, runs = work / "base", work / "data", work / "runs"
    py = sys.executable
    common = ["--base_dir", str(base), "--source", "sft", "--model_tag", "d20", "--device", "cpu",
              "--device_batch_size", "1", "--max_seq_len", "512"]

    def stage(name):
        if stop_after and STAGES.index(name) > STAGES.index(stop_after):
            return False
        print(f"== {name}", flush=True)
        done.append(name)
        return True

    # in child processes too: a child's ru_maxrss includes its parent's resident set at the fork, so
    # this process must stay small (it only imports torch) for the commands' peaks to be their own
    if stage("tokenizer"):
        code, s, _, tail = run([py, __file__, "_write", "tokenizer", str(base)], work / "tokenizer.log")
        assert code == 0, tail
        figures["tokenizer_s"] = s
    if stage("model"):
        code, s, _, tail = run([py, __file__, "_write", "model", str(base)], work / "model.log")
        assert code == 0, tail
        figures["base_checkpoint_bytes"] = int(tail.split("bytes")[-1].split()[0])
        figures["write_base_s"] = s
    if stage("data"):
        code, s, _, tail = run([py, "-m", "sciassist.data.prepare", "--scienceqa", str(SCIENCEQA), "--out_dir",
                                str(data), "--train_size", "64", "--val_size", "16", "--test_size", "16",
                                "--tokenizer_dir", str(base / "tokenizer")], work / "prepare.log")
        assert code == 0, tail
    if stage("dry_run"):
        code, s, rss, tail = run([py, "sciassist_train.py", "--dry_run", *common], work / "dry_run.log")
        assert code == 0, tail
        figures["dry_run_s"], figures["dry_run_rss"] = s, rss
        print(Path(work / "dry_run.log").read_text())
    if stage("train"):
        cmd = [py, "sciassist_train.py", *common, "--data_dir", str(data), "--num_iterations", str(steps),
               "--target_examples_per_step", "2", "--eval_every", "0", "--eval_steps", "1", "--save_every", "1",
               "--out_dir", str(runs), "--output_tag", "rehearsal"]
        code, s, rss, tail = run(cmd, work / "train.log")
        assert code == 0, tail
        run_dir = runs / "rehearsal"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        step_times = [r["step_time_s"] for r in records if "step_time_s" in r]
        figures.update(train_s=s, train_rss=rss, step_s=step_times,
                       run_bytes={p.name: p.stat().st_size for p in sorted(run_dir.rglob("*.pt"))},
                       resume_point=any(p.is_dir() and "resume" in p.name for p in run_dir.iterdir()))
    if stage("load"):
        code, s, rss, tail = run([py, "-c", "import sys, time; sys.path.insert(0, '.'); t = time.perf_counter(); "
                                  "from sciassist.checkpoints import resolve_model; "
                                  f"m = resolve_model(checkpoint={str(runs / 'rehearsal')!r}, device='cpu'); "
                                  "print('load_s', time.perf_counter() - t)"], work / "load.log")
        assert code == 0, tail
        figures["load_s"] = float(tail.split("load_s")[-1].split()[0])
        figures["load_rss"] = rss
    if stage("evaluate"):
        code, s, rss, tail = run([py, "sciassist_evaluate.py", "--finetuned", str(runs / "rehearsal"),
                                  "--data_path", str(data / "scienceqa_val.jsonl"), "--split", "val", "--limit", "16",
                                  "--scoring", "letter", "--max_new_tokens", "16", "--num_samples", "2",
                                  "--sample_max_tokens", "16", "--batch_size", "8", "--out_dir", str(work / "eval"),
                                  "--device", "cpu"], work / "evaluate.log")
        assert code == 0, tail
        figures["evaluate_s"], figures["evaluate_rss"] = s, rss
    if stage("chat"):
        code, s, rss, tail = run([py, "-m", "sciassist.serve.chat_cli", "--checkpoint", str(runs / "rehearsal"),
                                  "--prompt", "Which part of a plant takes in water?", "--max_tokens", "16",
                                  "--temperature", "0", "--seed", "1", "--device", "cpu"], work / "chat.log")
        assert code == 0, tail
        figures["chat_s"], figures["chat_rss"], figures["chat_reply"] = s, rss, tail.strip()[-200:]


def report(figures, done, steps):
    d20, d32 = config_for_depth(20), config_for_depth(32)
    est = plan.memory_plan(d20, 1, 512, bf16=False)
    d32_plan = plan.memory_plan(d32, 1, 512, bf16=False)
    lines = [f"CPU ({platform.machine()}, {os.cpu_count()} cores, 24 GiB, torch {torch.__version__}); random d20 "
             f"in the published layout; stages run: {', '.join(done)}", "", "| figure | value |", "|---|---:|"]

    def row(name, value):
        lines.append(f"| {name} | {value} |")

    if "tokenizer_s" in figures:
        row("tokenizer (65,536 tokens) trained (process wall)", f"{figures['tokenizer_s']:.1f} s")
    if "base_checkpoint_bytes" in figures:
        row("base model_000650.pt (wte bf16)", f"{figures['base_checkpoint_bytes'] / 1e9:.2f} GB")
    if "dry_run_s" in figures:
        row("--dry_run: time / peak RSS", f"{figures['dry_run_s']:.1f} s / {figures['dry_run_rss'] / GIB:.2f} GiB")
    if "train_s" in figures:
        row(f"training ({steps} steps of 2 conversations, batch 1 x 512): wall / peak RSS",
            f"{figures['train_s']:.0f} s / {figures['train_rss'] / GIB:.2f} GiB")
        row("seconds per step (metrics.jsonl)", ", ".join(f"{s:.0f}" for s in figures["step_s"]))
        row("planner, fp32 batch 1 x 512: params + grads + optimizer + activations",
            f"{est['total'] / GIB:.2f} GiB ({(est['params'] + est['grads'] + est['optimizer']) / GIB:.2f} + "
            f"{est['activations'] / GIB:.2f})")
        row("planner / measured peak RSS", f"{est['total'] / figures['train_rss']:.2f}")
        for name, size in figures["run_bytes"].items():
            row(f"run file {name}", f"{size / 1e9:.2f} GB")
        row("resume point written", "yes" if figures["resume_point"] else "no")
    if "load_s" in figures:
        row("load the fine-tuned checkpoint back: seconds / peak RSS",
            f"{figures['load_s']:.1f} s / {figures['load_rss'] / GIB:.2f} GiB")
    if "evaluate_s" in figures:
        row("sciassist_evaluate.py, 16 val questions (letter + generation): wall / peak RSS",
            f"{figures['evaluate_s']:.0f} s / {figures['evaluate_rss'] / GIB:.2f} GiB")
    if "chat_s" in figures:
        row("chat_cli one reply (16 tokens): wall / peak RSS",
            f"{figures['chat_s']:.0f} s / {figures['chat_rss'] / GIB:.2f} GiB")
    lines += ["", "Peak RSS is each command's own (os.wait4), Python and torch included (about 0.3 GiB, the "
                  "--dry_run's peak); the planner counts only tensors."]
    lines += ["", f"d32 ({d32_plan['params_count'] / 1e9:.2f}B parameters) needs {d32_plan['total'] / GIB:.1f} GiB to "
                  f"fine-tune in fp32 at batch 1 x 512 (params {d32_plan['params'] / GIB:.1f} + grads "
                  f"{d32_plan['grads'] / GIB:.1f} + optimizer {d32_plan['optimizer'] / GIB:.1f} + activations "
                  f"{d32_plan['activations'] / GIB:.1f}): it does not fit this 24 GiB machine, so only its plan runs."]
    return "\n".join(lines)


def main():
    if sys.argv[1:2] == ["_write"]:  # a stage run in its own process
        what, base = sys.argv[2], Path(sys.argv[3])
        if what == "tokenizer":
            write_tokenizer(base)
        else:
            print("bytes", write_d20(base))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--stop_after", choices=STAGES, help="run the stages up to this one")
    parser.add_argument("--append", nargs="?", const=str(RESULTS_FILE), metavar="FILE",
                        help="also append the table to FILE (default: bench/RESULTS.md, which git tracks)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        figures, done = {}, []
        try:
            rehearse(work, args.steps, args.stop_after, figures, done)
        except AssertionError as e:  # a command failed: report what ran, and its output
            figures["failed"] = f"{done[-1]}: {e}"
        if args.work:
            (work / "rehearsal.json").write_text(json.dumps(figures, indent=2))
    text = report(figures, done, args.steps)
    if "failed" in figures:
        text += f"\n\nstage {done[-1]} failed; its output ended:\n\n```\n{figures['failed'][-1200:]}\n```"
    print(text)
    if args.append:
        print(f"\nthe table was appended to {append_report(text, args.append)}")


def append_report(text, path=RESULTS_FILE):
    """Add the rehearsal's table to `path` under its own heading; returns the path, resolved."""
    path = Path(path).resolve()
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n## The d20 rehearsal: `python bench/rehearse_d20.py` (CPU)\n\n" + text + "\n")
    return path


if __name__ == "__main__":
    main()

"""
Evaluation speed: letter scoring and greedy generated answers on the ScienceQA test split
(4,241 questions) with a random-init model, so no checkpoint download is needed.

    python bench/bench_eval.py                                # tiny model on CPU
    python bench/bench_eval.py --device cuda --depth 20       # a d20-sized model on a GPU

The questions come from a lupantech-layout copy of ScienceQA (default ../shared/scienceqa
beside the checkout), formatted exactly as for training. The tokenizer is trained on the
test questions' own text (rustbpe, --vocab_size, ~2 s) unless --tokenizer_dir gives a real
one. The model's vocabulary is --model_vocab (default: d20's 65,536 from depth 12 up, else
the tokenizer's): rows beyond the tokenizer get zero lm_head weights, so they cost the same
compute as in a real d20 but are never picked by greedy decoding.
Prints a table; timings include prompt rendering and decoding, as a real evaluation does.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from random_model import random_gpt  # noqa: E402

from nanochat.gpt import config_for_depth  # noqa: E402
from nanochat.tokenizer import Tokenizer  # noqa: E402
from sciassist.common import synchronize  # noqa: E402
from sciassist.eval.questions import load_questions, prompts_for  # noqa: E402
from sciassist.eval.scoring import argmax, generate_answers, letter_probabilities  # noqa: E402


def question_texts(records):
    for r in records:
        for m in r["messages"]:
            yield m["content"]


def build_model(depth, vocab_size, tokenizer_vocab, device):
    config = config_for_depth(depth, vocab_size=vocab_size, sequence_len=2048)
    model = random_gpt(config, device)
    with torch.no_grad():
        # logits that are not all equal, and none for the padded vocabulary rows
        model.lm_head.weight.normal_(0, 0.02)
        model.lm_head.weight[tokenizer_vocab:] = 0
    if device.type == "cuda":
        model.transformer.wte.to(dtype=torch.bfloat16)  # as nanochat keeps it on CUDA
    return model.eval()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scienceqa", default=str(REPO_ROOT.parent / "shared" / "scienceqa"), help="lupantech-layout dir")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None, help="questions for letter scoring (default all)")
    p.add_argument("--gen_limit", type=int, default=None, help="questions for generation (default: same as --limit)")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--vocab_size", type=int, default=1024, help="tokenizer trained on the questions (default 1024)")
    p.add_argument("--model_vocab", type=int, default=None,
                   help="model vocab (default 65536 for depth>=12, else the tokenizer's)")
    p.add_argument("--tokenizer_dir", default=None, help="use this tokenizer instead of training one")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--gen_batch_size", type=int, default=None, help="default: --batch_size")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    records, info = load_questions(scienceqa=args.scienceqa, split=args.split)
    if args.limit:
        records = records[:args.limit]
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.tokenizer_dir:
        tokenizer = Tokenizer.from_directory(args.tokenizer_dir)
    else:
        tokenizer = Tokenizer.train_from_iterator(list(question_texts(records)), args.vocab_size)
    tokenizer_s = time.perf_counter() - t0
    tokenizer_vocab = tokenizer.get_vocab_size()
    model_vocab = args.model_vocab or (65536 if args.depth >= 12 else tokenizer_vocab)
    if model_vocab < tokenizer_vocab:
        raise SystemExit(f"--model_vocab {model_vocab} is smaller than the tokenizer's {tokenizer_vocab}")
    model = build_model(args.depth, model_vocab, tokenizer_vocab, device)
    params = sum(p.numel() for p in model.parameters())

    prompts, prefix = prompts_for(records, "sciassist")
    num_choices = [len(r["meta"]["choices"]) for r in records]
    prompt_tokens = sum(len(tokenizer.render_for_completion(p)) for p in prompts)

    # warm-up (allocator, kernels) on a few questions, untimed
    letter_probabilities(model, tokenizer, prompts[:4], num_choices[:4], prefix, args.batch_size)
    synchronize(device)
    t0 = time.perf_counter()
    probs = letter_probabilities(model, tokenizer, prompts, num_choices, prefix, args.batch_size)
    synchronize(device)
    letter_s = time.perf_counter() - t0
    accuracy = sum(argmax(p) == r["meta"]["answer"] for p, r in zip(probs, records, strict=True)) / len(records)

    n_gen = min(args.gen_limit or len(records), len(records))
    gen_batch = args.gen_batch_size or args.batch_size
    synchronize(device)
    t0 = time.perf_counter()
    texts = generate_answers(model, tokenizer, prompts[:n_gen], args.max_new_tokens, gen_batch)
    synchronize(device)
    generate_s = time.perf_counter() - t0
    generated_tokens = sum(len(tokenizer.encode(t)) for t in texts)

    name = (f"d{args.depth} random ({params / 1e6:.1f}M params, vocab {model_vocab}"
            f"{', tokenizer ' + str(tokenizer_vocab) if tokenizer_vocab != model_vocab else ''})")
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"ScienceQA {args.split}: {len(records)} questions from {args.scienceqa} (loaded in {load_s:.1f} s; "
          f"tokenizer {tokenizer_s:.1f} s), {prompt_tokens} prompt tokens "
          f"({prompt_tokens / len(records):.0f} per question)")
    print(f"model: {name}; device {device}{threads}\n")
    print(f"| {'what':<44} | {'questions':>9} | {'seconds':>8} | {'questions/s':>11} | {'tokens/s':>9} |")
    print(f"|{'-' * 46}|{'-' * 10}:|{'-' * 9}:|{'-' * 12}:|{'-' * 10}:|")
    print(f"| {'letter scoring (batch ' + str(args.batch_size) + ', one pass per batch)':<44} | {len(records):>9} | "
          f"{letter_s:>8.2f} | {len(records) / letter_s:>11.1f} | {prompt_tokens / letter_s:>9.0f} |")
    gen_what = f"greedy generation ({args.max_new_tokens} tokens max, batch {gen_batch})"
    print(f"| {gen_what:<44} | {n_gen:>9} | {generate_s:>8.2f} | {n_gen / generate_s:>11.1f} | "
          f"{generated_tokens / generate_s:>9.0f} |")
    print(f"\n(letter-scoring accuracy of this random model: {100 * accuracy:.1f}%; tokens/s = prompt tokens for "
          f"scoring, generated tokens for generation)")


if __name__ == "__main__":
    main()

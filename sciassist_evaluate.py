"""Evaluate nanochat checkpoints on ScienceQA (base vs fine-tuned, and RL). See sciassist/eval/run.py.

    python sciassist_evaluate.py --base sft:d20 --finetuned finetuned_model_checkpoint/sciassist --split val
    python sciassist_evaluate.py --rl finetuned_model_checkpoint/rl --finetuned source --base source
    python sciassist_evaluate.py --log_file training.log          # only re-draw a loss curve
"""

import sys

from sciassist.cli import run

if __name__ == "__main__":
    sys.exit(run("evaluate", sys.argv[1:]))

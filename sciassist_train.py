"""Fine-tune a nanochat checkpoint: `python sciassist_train.py --help` lists every flag.

Multi-GPU: `torchrun --nproc_per_node=N sciassist_train.py [flags]`.
Recipes are their own command: `python -m sciassist.pipelines.recipes --preset cpu --scienceqa DIR --out_dir DIR`.
"""

import sys

from sciassist.cli import run

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:]))

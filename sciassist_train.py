"""Fine-tune a nanochat checkpoint: `python sciassist_train.py --help` lists every flag.

Multi-GPU: `torchrun --nproc_per_node=N sciassist_train.py [flags]`.
Recipes: `python sciassist_train.py --preset cpu --scienceqa DIR --out_dir DIR` (see sciassist/recipes.py).
"""

import sys

from sciassist.train.loop import main

if __name__ == "__main__":
    sys.exit(main())

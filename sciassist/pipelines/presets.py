"""The recipes' presets: what a recipe is (Recipe: plain data) and the named ones, with the
measurements that chose them (bench/RESULTS.md). sciassist.pipelines.recipes runs them."""

import dataclasses
from dataclasses import dataclass, field, replace

from sciassist.common import UserError


@dataclass
class Recipe:
    name: str
    description: str
    tiny: dict = field(default_factory=dict)      # TinySettings overrides (out_dir/scienceqa are set here)
    train: dict = field(default_factory=dict)     # TrainSettings overrides (paths are set here)
    data: dict = field(default_factory=dict)      # FormatOptions overrides
    shuffled_copies: int = 0                      # extra training copies with the options reordered
    sft_val_size: int = 256                       # val questions for the fine-tune's validation loss
    eval_limit: int | None = 1000                 # val questions recipes are compared on (None: all)
    eval_max_new_tokens: int = 16                 # letter_first: "The correct answer is X." fits in 16 tokens
    choice_scoring: bool = True                   # also score with --scoring choice (eval_<split>_choice/)
    explain: int = 0                              # questions whose explanation is judged (--explain N)
    rl: dict = field(default_factory=dict)        # RLSettings overrides of the RL stage after the fine-tune
                                                  # (paths are set here); empty: no RL stage
    sft_tag: str | None = None                    # the fine-tune's folder under sft/ (default: the name); a
                                                  # variant that only adds a stage shares its recipe's fine-tune
    tested: bool = True


# The CPU recipe, chosen on val with bench/quality.py (bench/RESULTS.md). A model this small,
# trained from nothing, learns which option TEXT answers a question long before it can name
# the option's letter. So its reply names the option first ("The correct answer is <option>
# (B)."), and the letter is then a copy from the options above: a copy that a depth-3 model
# learns after about 2,300 fine-tuning steps at full learning rate (depth 2 never did, nor did
# a shorter schedule). Scored by choice (each option's whole answer line); the greedy reply
# is parsed strictly (its text must be its letter's option).
CPU = Recipe(
    name="cpu",
    description="depth 3 / width 128 / 4 heads / vocab 2048 tiny base (1,038 steps: 4 passes over the "
                "train-split text), then 4,000 steps of answer-only fine-tuning on option-shuffled copies, the "
                "option named before its letter",
    tiny=dict(vocab_size=2048, depth=3, n_embd=128, n_head=4, sequence_len=512, device_batch_size=8,
              steps=1038),
    # the device batch as every run chooses it (auto: 2,048 positions on a CPU, 4 rows of 512, the
    # fastest measured; it was 16 rows); validation on the same 256 conversations (32 x 8). The
    # fine-tune computes in fp32 on every CPU: on val, bf16 autocast (auto's choice on CPUs with native
    # bf16) cost this 1.1M-parameter model 1.6 points of choice accuracy and 3% of val loss
    # (bench/RESULTS.md, "The CPU recipe under the new defaults")
    train=dict(max_seq_len=512, pack_len=512, device_batch_size="auto", target_examples_per_step=32,
               matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, init_lr_frac=0.5,
               num_iterations=4000, eval_every=400, eval_steps=32, save_every=0, dtype="float32"),
    data=dict(system_prompt="", include_explanation=False, include_background=False, answer_format="text_first"),
    shuffled_copies=7,  # chosen on val over 3 (bench/RESULTS.md): fewer invalid replies, same choice accuracy
    eval_max_new_tokens=128,  # the longest answer lines (whole-sentence options) run to about 100 tokens here
)

# Variants of the CPU recipe, the same base (a run can reuse another's: --base_dir) and the
# same 4,000 steps: LoRA adapters instead of full fine-tuning, and the tutor's whole reply
# (answer, explanation, background) instead of the answer alone. Both were measured with 3
# shuffled copies (the CPU recipe's count before 7 was chosen) and keep it, so that their
# figures are what these presets give.
CPU_LORA = replace(
    CPU, name="cpu-lora",
    description="the CPU recipe with LoRA r=16 adapters on every block projection (Muon at lora_lr 0.1) instead of "
                "full fine-tuning; the merged model is saved as usual",
    train={**CPU.train, "lora_rank": 16}, shuffled_copies=3)
CPU_TUTOR = replace(
    CPU, name="cpu-tutor",
    description="the CPU recipe trained on the tutor's whole reply: the answer (option first), then "
                "'Explanation: <solution>' and 'Background: <lecture>'",
    data={**CPU.data, "include_explanation": True, "include_background": True}, shuffled_copies=3,
    explain=100_000)  # every evaluated question with a gold solution

# The CPU recipe, then the RL stage (sciassist.train.rl) on its fine-tuned model: nanochat's
# chat_rl update (group-relative advantages, token-normalised policy gradient, Muon + AdamW),
# 32 training questions x 8 replies per step for 100 steps, every learning rate x 0.01, the
# model of the best validation kept (the fine-tuned one when no step beats it). It shares the
# CPU recipe's fine-tune (sft/cpu): run in a CPU recipe's folder, it trains only the stage. Chosen
# on val (bench/RESULTS.md, "The RL stage on the CPU recipe's model"): at nanochat's learning
# rates (x 0.05) this 1.1M-parameter model degrades within 100-200 steps; at x 0.01-0.02 it is
# stable and its greedy accuracy does not move beyond noise, so this stage is a variant, not
# part of the CPU recipe.
CPU_RL = replace(
    CPU, name="cpu-rl", sft_tag="cpu",
    description="the CPU recipe, then 100 steps of RL on its own replies (32 training questions x 8 samples per "
                "step, nanochat's update at a fifth of its learning rates), the best validation's model kept",
    rl=dict(num_steps=100, questions_per_step=32, samples_per_question=8, max_new_tokens=128, init_lr_frac=0.01,
            eval_every=20, eval_questions=256, val_questions=64, generation_batch_size=64, device_batch_size=32,
            dtype="float32"))

# A GPU preset: NOT RUN (no GPU was lent while the CPU recipe was measured); a starting
# point, not a result. Depth 12 (768 wide, about 110M parameters with a 16k vocabulary) from
# scratch. The train split is only about 1M tokens of text, so the budgets are in steps (about
# 10 passes over the base text, 8 over the questions), not minutes: a fast GPU would
# otherwise spend its time memorising. Expected to take well under 15 minutes on one H100.
# Answers name the option first, as in the CPU recipe.
GPU = Recipe(
    name="gpu",
    description="UNTESTED: depth 12 from scratch on one GPU (about 10 passes of base text, 8 of questions)",
    tiny=dict(vocab_size=16384, depth=12, sequence_len=1024, device_batch_size=32, steps=300),
    train=dict(max_seq_len=1024, pack_len=1024, device_batch_size="auto", target_examples_per_step=64,
               matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, init_lr_frac=0.5,
               num_iterations=1500, eval_every=250, eval_steps=32, save_every=0),
    data=dict(system_prompt="", include_explanation=False, include_background=False, answer_format="text_first"),
    shuffled_copies=3,
    eval_max_new_tokens=128,
    eval_limit=1000,
    tested=False,
)

RECIPES = {r.name: r for r in (CPU, CPU_LORA, CPU_TUTOR, CPU_RL, GPU)}


class RecipeError(UserError, ValueError):
    """An unknown preset or a bad override; the message says what is accepted."""


def get_recipe(name, **overrides):
    """The preset `name`, with dataclass fields replaced and dict fields (tiny, train,
    data, rl) updated key by key: get_recipe("cpu", train={"num_iterations": 10})."""
    if name not in RECIPES:
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    names = {f.name for f in dataclasses.fields(Recipe)}
    unknown = set(overrides) - names
    if unknown:
        raise RecipeError(f"unknown recipe field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    changes = {}
    for key, value in overrides.items():
        current = getattr(recipe, key)
        changes[key] = {**current, **value} if isinstance(current, dict) else value
    return replace(recipe, **changes)

"""What a reinforcement-learning run can be told: RLSettings (each field is a flag of
`sciassist rl` / `python -m sciassist.train.rl` of the same name) and the checks of their values.

The defaults are nanochat's chat_rl.py: 16 questions per step, 16 replies sampled per question
at temperature 1 with top-k 50 and at most 256 new tokens, Muon 0.02 / embedding 0.2 /
unembedding 0.004, all times init_lr_frac 0.05 and decayed linearly to zero.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sciassist.checkpoints import DEFAULT_FINETUNED_DIR, SOURCES, SPEC_HELP
from sciassist.common import AUTO, DTYPES, THREADS_HELP, UserError, field_problems, resolve_device, setting
from sciassist.data.answers import ANSWER_FORMATS
from sciassist.train.settings import MAX_BATCH, MAX_LR, MAX_POSITIONS, MAX_STEPS, RunFields, lora_setting

# Settings that shape the run's trajectory: resuming with other values would silently make a
# different run, so --resume refuses them.
RL_TRAJECTORY_FIELDS = (
    "data_path", "val_path", "checkpoint", "source", "model_tag", "model_step", "num_steps", "questions_per_step",
    "samples_per_question", "max_new_tokens", "temperature", "top_k", "matrix_lr", "embedding_lr", "unembedding_lr",
    "weight_decay", "init_lr_frac", "keep", "shuffle_options", "answer_format", "invalid_reward", "format_bonus",
    "reward_fn", "token_normalization", "generation_batch_size", "device_batch_size", "eval_every", "eval_questions",
    "val_questions", "val_samples", "seed", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_lr",
)
# How the policy-gradient sum is normalised: by every sampled token of the step (nanochat: a step
# in which few groups have a reward spread moves the weights less), or only by the tokens of the
# groups that have one (each step moves about as much, however few groups carry a signal).
TOKEN_NORMALIZATIONS = ("all_samples", "spread_groups")


class RLError(UserError):
    """A problem with an RL run the user can fix; the message says how."""


def _steps_problem(value) -> str | None:
    return "must be -1 (one pass over the questions) or > 0" if value == 0 else None


def _folder_name_problem(text) -> str | None:
    return None if text and "/" not in text and text not in (".", "..") else "must be a plain folder name"


def _reward_fn_problem(text) -> str | None:
    if not text:
        return None
    module, _, function = str(text).rpartition(":")
    return None if module and function.isidentifier() else "must be MODULE:FUNCTION or FILE.py:FUNCTION"


@dataclass
class RLSettings(RunFields):
    """Every knob of an RL run; the one source of its defaults (each field is a --flag)."""

    # data
    data_path: str = setting("data/scienceqa_train.jsonl", "questions to practise on: a JSONL file whose records have "
                                                           "\"messages\" (the prompt; a final assistant message is "
                                                           "dropped) and \"meta\" with \"choices\" and \"answer\" (the "
                                                           "gold option index), as `sciassist prepare` writes them")
    val_path: str | None = setting(None, "held-out questions of the same shape: greedy replies to the first "
                                         "--eval_questions, and sampled ones to the first --val_questions, are scored "
                                         "at step 0, every --eval_every steps and at the end (none: no validation)")
    eval_every: int = setting(50, "validation every N steps (0: only at step 0 and the end)", at_least=0,
                              at_most=MAX_STEPS)
    eval_questions: int = setting(200, "validation questions (the first of --val_path)", at_least=1,
                                  at_most=MAX_BATCH)
    val_questions: int = setting(100, "of those, the first N also get --val_samples sampled replies each at every "
                                      "validation, for pass@k and maj@k (0: greedy validation only)", at_least=0,
                                 at_most=MAX_BATCH)
    val_samples: int | None = setting(None, "replies sampled per validation question, at the training --temperature "
                                            "and --top_k (default: --samples_per_question)", at_least=1,
                                      at_most=MAX_BATCH)
    # model
    checkpoint: str | None = setting(None, f"the model to start from instead of --source/--model_tag: {SPEC_HELP} "
                                           f"(the tokenizer is looked for beside it)")
    source: str = setting("sft", f"checkpoint kind in --base_dir to start from: {' | '.join(SOURCES)}",
                          choices=list(SOURCES))
    model_tag: str | None = setting(None, "model folder, e.g. d20 (default: the largest d<N> present)")
    model_step: int | None = setting(None, "checkpoint step (default: the latest)", at_least=0)
    base_dir: str | None = setting(None, "nanochat base dir (default: $NANOCHAT_BASE_DIR or ~/.cache/nanochat)")
    # sampling
    num_steps: int = setting(-1, "optimizer steps; -1 = one pass over the questions (questions // "
                                 "questions_per_step)", at_least=-1, at_most=MAX_STEPS, check=_steps_problem)
    questions_per_step: int = setting(16, "questions per step over all processes (under torchrun each takes an "
                                          "equal share), chosen by (seed, step) from an order reshuffled every "
                                          "pass", at_least=1, at_most=MAX_BATCH)
    samples_per_question: int = setting(16, "replies sampled per question: the group whose mean reward is the "
                                            "baseline of its advantages", at_least=2, at_most=MAX_BATCH)
    max_new_tokens: int = setting(256, "longest reply in tokens; a reply cut there counts as truncated",
                                  at_least=1, at_most=MAX_POSITIONS)
    temperature: float = setting(1.0, "sampling temperature", above=0, at_most=10.0)
    top_k: int = setting(50, "sample among the k most likely tokens (0: the whole vocabulary)", at_least=0,
                         at_most=MAX_POSITIONS)
    shuffle_options: bool = setting(True, "shuffle each question's options anew every step (the same order for the "
                                          "question's whole group), the gold letter moved with its option, so the "
                                          "policy cannot gain from a letter or position bias")
    generation_batch_size: int | str = setting(AUTO, "replies decoded together (rows of one KV cache); auto: on a "
                                                     "card the memory planner's largest for its free memory (at "
                                                     "most a step's questions x replies), on a CPU or mps 32 "
                                                     "(sciassist.train.rl_batch)", at_least=1, at_most=MAX_BATCH,
                                               auto=True)
    # reward
    answer_format: str = setting("auto", "how replies state the answer, read by the evaluator's strict parser: "
                                         "letter_first | text_first | auto (read from the data's reference answers, "
                                         "as the evaluator does)", choices=["auto", *ANSWER_FORMATS])
    invalid_reward: float = setting(0.0, "reward of a reply that states no answer the parser accepts (a correct one "
                                         "earns 1, a wrong one --format_bonus)", at_least=-1.0, at_most=0.0)
    format_bonus: float = setting(0.0, "reward of a reply that states a wrong answer in the accepted form; it may "
                                       "never outweigh correctness: format_bonus - invalid_reward must be <= "
                                       "1 - format_bonus", at_least=0.0, below=1.0)
    reward_fn: str = setting("", "a custom reward instead of the built-in one: MODULE:FUNCTION or FILE.py:FUNCTION, "
                                 "called as function(prompt, reply, record) -> float with prompt the messages the "
                                 "model saw, reply its text, record the question as shown (meta choices and answer "
                                 "after shuffling)", check=_reward_fn_problem)
    # optimisation
    token_normalization: str = setting("all_samples", "the policy-gradient sum is divided by the sampled tokens of "
                                                      "all_samples (nanochat) or only of spread_groups, the groups "
                                                      "whose rewards differ", choices=list(TOKEN_NORMALIZATIONS))
    device_batch_size: int | str = setting(AUTO, "replies of one question per forward/backward micro-batch, after "
                                                 "the question's prompt, run once (gradients accumulate over the "
                                                 "step); auto: on a card the planner's largest (at most "
                                                 "--samples_per_question), on a CPU or mps 8", at_least=1,
                                           at_most=MAX_BATCH, auto=True)
    matrix_lr: float = setting(0.02, "Muon learning rate for the transformer matrices", above=0, at_most=MAX_LR)
    embedding_lr: float = setting(0.2, "AdamW learning rate for the token embedding (x (n_embd/768)^-0.5)", above=0,
                                  at_most=MAX_LR)
    unembedding_lr: float = setting(0.004, "AdamW learning rate for lm_head (x (n_embd/768)^-0.5)", above=0,
                                    at_most=MAX_LR)
    weight_decay: float = setting(0.0, "Muon weight decay", at_least=0, at_most=MAX_LR)
    init_lr_frac: float = setting(0.05, "every learning rate is multiplied by this, then decays linearly to zero",
                                  above=0, at_most=1)
    muon_dtype: str = setting("auto", "dtype of Muon's Newton-Schulz iteration: auto | bfloat16 | float32",
                              choices=["auto", "bfloat16", "float32"])
    # LoRA (sciassist.train.lora, as fine-tuning has it): only low-rank adapters train, the base is frozen;
    # the replies are sampled from the adapted model
    lora_rank: int = lora_setting("lora_rank")
    lora_alpha: float | None = lora_setting("lora_alpha")
    lora_dropout: float = lora_setting("lora_dropout")
    lora_targets: str = lora_setting("lora_targets")
    lora_lr: float = lora_setting("lora_lr")
    # output
    out_dir: str = setting(DEFAULT_FINETUNED_DIR, "where runs are written")
    output_tag: str = setting("rl", "run name: files go to <out_dir>/<output_tag>/", check=_folder_name_problem)
    keep: str = setting("best", "the model the run leaves: best = the weights of the validation with the highest "
                                "greedy accuracy (the starting model's, at step 0, included; a tie keeps the "
                                "earlier), written when it is reached and the folder's only model_<step>.pt; last = "
                                "the final weights (also what best means without --val_path)",
                        choices=["best", "last"])
    save_every: int = setting(0, "write a resume point every N steps, and with --keep last the model too (0 = only "
                                 "at the end / on Ctrl-C)", at_least=0, at_most=MAX_STEPS)
    resume: bool = setting(False, "continue the run in <out_dir>/<output_tag>/resume/ (same flags)")
    # runtime
    device: str = setting("auto", "auto | cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)")
    threads: int | None = setting(None, THREADS_HELP, at_least=1, at_most=4096)
    dtype: str = setting("auto", "auto | bfloat16 | float16 | float32: the precision policy of fine-tuning "
                                 "(sciassist.common.precision_for), for sampling and the policy gradient",
                         choices=list(DTYPES))
    seed: int = setting(42, "seed of the question order, the option shuffles and the sampling", at_least=0,
                        at_most=2**63 - 1)


def check_rl_settings(s: RLSettings) -> None:
    """Raise RLError naming the flag for any value that cannot work: each field's own rules, the
    reward's ordering (correct > wrong >= invalid, the format never outweighing correctness), the
    device, and under torchrun a --questions_per_step the processes can share equally."""
    problems = field_problems(s)
    if not problems and s.format_bonus - s.invalid_reward > 1 - s.format_bonus:
        problems.append(f"--format_bonus {s.format_bonus:g} with --invalid_reward {s.invalid_reward:g} would let the "
                        f"form of a reply ({s.format_bonus - s.invalid_reward:g}) outweigh its correctness "
                        f"({1 - s.format_bonus:g}); lower --format_bonus or raise --invalid_reward")
    try:
        resolve_device(s.device)
    except UserError as e:
        problems.append(str(e))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and s.questions_per_step % world_size:
        problems.append(f"--questions_per_step {s.questions_per_step} cannot be shared equally by {world_size} "
                        f"processes; make it a multiple of {world_size}")
    if problems:
        raise RLError("invalid settings: " + "; ".join(problems))

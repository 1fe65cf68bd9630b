"""The RL stage's two batch sizes under `auto` (the default of both flags): rows decoded together
in the rollout (--generation_batch_size) and replies per forward/backward micro-batch of the update
(--device_batch_size), by the rules fine-tuning's --device_batch_size auto follows.

- A number is that number, on every device.
- On a card (CUDA, ROCm): the memory planner's largest batches for the card's free memory before
  the weights load (sciassist.train.plan.rl_plan: the fixed weights, gradients and optimizer
  states, the rollout's KV cache and prefill, the update's activations), at the longest prompt of
  the run's questions and --max_new_tokens; the rollout at most a step's questions x replies,
  the update at most one question's replies (a micro-batch never mixes questions). When not one
  row fits, the run stops before its first step, naming the card and what to change.
- On a CPU or mps: 32 rows and 8 replies, the sizes bench/bench_rl.py times (not tuned per CPU).

Under torchrun each process plans for its own card; the sizes only split the work (each reply has
its own seed, and the gradients are summed), so processes whose sizes differ still take the same
update up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

from sciassist.common import AUTO
from sciassist.memory import Card, card_of
from sciassist.train import plan
from sciassist.train.rl_settings import RLError

CPU_GENERATION_ROWS = 32
CPU_UPDATE_REPLIES = 8


@dataclass(frozen=True)
class RLBatches:
    generation: int  # rows decoded together
    update: int  # replies per forward/backward micro-batch
    reason: str

    def describe(self) -> str:
        return (f"batches: {self.generation} row(s) decoded together, {self.update} repl(ies) per micro-batch of the "
                f"update; {self.reason}")


def rl_batches(settings, config, device, prompt_len: int, bf16: bool, card: Card | None = None) -> RLBatches:
    """The run's batch sizes (see the module docstring); card: the device's card as it was before
    the weights loaded (default: card_of(device) now)."""
    generation, update = settings.generation_batch_size, settings.device_batch_size
    if generation != AUTO and update != AUTO:
        return RLBatches(generation, update, "as set")
    card = card if card is not None else card_of(device)
    if card is None:
        return RLBatches(CPU_GENERATION_ROWS if generation == AUTO else generation,
                         CPU_UPDATE_REPLIES if update == AUTO else update,
                         f"auto on {device.type}: {CPU_GENERATION_ROWS} rows and {CPU_UPDATE_REPLIES} replies, the "
                         f"sizes bench/bench_rl.py times")
    k = settings.samples_per_question
    lora = plan.LoraShape.of(settings)
    planned = plan.rl_plan(config, 1, 1, prompt_len, settings.max_new_tokens, samples_per_question=k, bf16=bf16,
                           free=card.free, lora=lora)
    fits_generation, fits_update = planned["max_generation_batch"], planned["max_device_batch"]
    if (generation == AUTO and not fits_generation) or (update == AUTO and not fits_update):
        kind = f"LoRA r={lora.rank}" if lora else "full"
        raise RLError(f"RL ({kind}) does not fit {card.describe()}: with prompts of up to {prompt_len} tokens and "
                      f"--max_new_tokens {settings.max_new_tokens}, not one row fits the rollout"
                      f" ({fits_generation} rows) or the update ({fits_update} "
                      f"replies); try --lora_rank 16, a smaller --max_new_tokens, or a larger card "
                      f"(python -m sciassist.train.plan --rl shows what fits)")
    chosen_generation = min(fits_generation, settings.questions_per_step * k) if generation == AUTO else generation
    chosen_update = min(fits_update, k) if update == AUTO else update
    return RLBatches(chosen_generation, chosen_update,
                     f"auto on {card.describe()}: the planner's largest for prompts of up to {prompt_len} tokens and "
                     f"{settings.max_new_tokens} new ({fits_generation} rows, {fits_update} replies), at most a "
                     f"step's {settings.questions_per_step} x {k} rows and one question's {k} replies")

"""What a reply earns, and the advantage each reply of a group gets.

The built-in reward is verifiable: the reply is read by the evaluator's own strict parser
(sciassist.data.answers.parse_answer, with the question's options as shown and the run's answer
format), so the policy is paid for exactly what the evaluation counts:

  correct answer                       1.0
  a wrong option, stated as accepted   format_bonus (default 0; checked to stay below what
                                       correctness adds: format_bonus - invalid_reward <= 1 - format_bonus)
  no answer the parser accepts         invalid_reward (default 0, the same as a wrong answer:
                                       nanochat's 0/1 reward; negative to make a malformed reply
                                       cost more than a wrong one)

A custom reward (--reward_fn MODULE:FUNCTION or FILE.py:FUNCTION) replaces it: the function is
called as function(prompt, reply, record) -> float, prompt the messages the model saw, reply
its text, record the question as shown (meta.choices and meta.answer after any shuffle). The
parser still reads every reply for the metrics (invalid rate, letter histogram).

Advantages are group-relative (nanochat's chat_rl.py): each reply's reward minus the mean
reward of its question's group. A group whose rewards are all equal teaches nothing: its
advantages are exactly zero and it is counted as a group without spread.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

from sciassist.data.answers import ANSWER_PREFIX, parse_answer
from sciassist.train.rl_settings import RLError

CORRECT_REWARD = 1.0


def parsed_answer(reply: str, choices, answer_format: str) -> int | None:
    """The option index a reply states, as the evaluator reads it (None: invalid)."""
    return parse_answer(reply, len(choices), ANSWER_PREFIX, choices, answer_format)


def verifiable_reward(reply: str, choices, answer: int, answer_format: str, invalid_reward: float = 0.0,
                      format_bonus: float = 0.0) -> tuple[float, int | None]:
    """(reward, the option index the reply states or None) by the table in the module docstring."""
    predicted = parsed_answer(reply, choices, answer_format)
    if predicted is None:
        return invalid_reward, None
    return (CORRECT_REWARD if predicted == answer else format_bonus), predicted


def load_reward_fn(spec: str):
    """The function a --reward_fn names: MODULE:FUNCTION (an importable module) or
    FILE.py:FUNCTION (a file, loaded by its path). An RLError says what could not be found."""
    location, _, name = spec.rpartition(":")
    try:
        if location.endswith(".py"):
            path = Path(location).expanduser()
            if not path.is_file():
                raise RLError(f"--reward_fn {spec}: no such file {path}")
            module_spec = importlib.util.spec_from_file_location(f"sciassist_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(location)
    except ImportError as e:
        raise RLError(f"--reward_fn {spec}: cannot import {location} ({type(e).__name__}: {e}); give an importable "
                      f"module (on PYTHONPATH) or a FILE.py path") from e
    function = getattr(module, name, None)
    if not callable(function):
        raise RLError(f"--reward_fn {spec}: {location} has no function {name!r}")
    return function


def custom_reward(function, spec: str, prompt, reply: str, record) -> float:
    """function(prompt, reply, record), which must be a finite number (a bool is not one)."""
    value = function(prompt, reply, record)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RLError(f"--reward_fn {spec} returned {value!r} for a reply; it must return a finite number")
    return float(value)


def group_advantages(rewards) -> tuple[list[float], bool]:
    """(each reward minus the group's mean, whether the rewards differ at all). Without a spread
    every advantage is exactly 0.0 (the mean of equal floats need not equal them to the last bit)."""
    rewards = [float(r) for r in rewards]
    if max(rewards) == min(rewards):
        return [0.0] * len(rewards), False
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards], True

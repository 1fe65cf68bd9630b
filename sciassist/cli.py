"""The `sciassist` command (installed by `pip install sciassist`): one entry point for every
program, `sciassist <command> [flags]`, each the same program as its script or module
(`sciassist train` = `python sciassist_train.py`). `sciassist <command> --help` lists its flags.

A core install fine-tunes, evaluates and chats; the rest are extras. A command that reaches for
a missing extra stops with one `error:` line naming it (exit code 2), not a traceback.
"""

import importlib
import sys

from sciassist.common import invoked_as, missing_extra_message, print_error

# command -> (module whose main(argv) runs it, what it does)
COMMANDS = {
    "train": ("sciassist.pipelines.finetune", "fine-tune a nanochat checkpoint (sciassist_train.py)"),
    "rl": ("sciassist.train.rl", "reinforcement learning on the model's own answers, rewarded by the evaluator's "
                                 "parser"),
    "evaluate": ("sciassist.eval.run", "base vs fine-tuned (vs RL) on ScienceQA and the science benchmarks "
                                       "(sciassist_evaluate.py)"),
    "chat": ("sciassist.serve.chat_cli", "talk to a model in the terminal"),
    "web": ("sciassist.serve.web.__main__", "the chat page and an OpenAI-compatible API on 127.0.0.1"),
    "prepare": ("sciassist.data.prepare", "write ScienceQA as chat JSONL"),
    "download": ("sciassist.hub", "fetch a published nanochat checkpoint (d20, d32)"),
    "plan": ("sciassist.train.plan", "the memory plan of a model on a GPU"),
    "export": ("sciassist.export", "a checkpoint as a Hugging Face transformers folder"),
    "demo": ("sciassist.pipelines.demo", "the whole pipeline in miniature, offline, on CPU"),
    "tiny": ("sciassist.pipelines.tiny", "train a tiny tokenizer + base model on ScienceQA text"),
    "recipe": ("sciassist.pipelines.recipes", "a measured recipe end to end (data, base, fine-tune, evaluation)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: sciassist <command> [flags]   (sciassist <command> --help: its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "extras (pip install 'sciassist[NAME]'): export (transformers), lora (peft), explain (nltk, "
              "rouge), web (fastapi, uvicorn), track (tensorboard, wandb), all"]
    return "\n".join(lines)


def run(command: str, argv, prog: str | None = None) -> int:
    """Run `command` with its flags, its parser calling itself `prog` (None: the program's own name,
    e.g. sciassist_train.py); a missing optional dependency is one error line."""
    try:
        with invoked_as(prog):
            module = importlib.import_module(COMMANDS[command][0])
            code = module.main(list(argv))
    except ModuleNotFoundError as e:
        message = missing_extra_message(prog or f"sciassist {command}", e)
        if message is None:
            raise
        return print_error(message)
    return 0 if code is None else code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(usage(), file=sys.stderr)
        return print_error(f"unknown command {command!r}; expected one of {', '.join(COMMANDS)}")
    return run(command, rest, prog=f"sciassist {command}")


if __name__ == "__main__":
    sys.exit(main())

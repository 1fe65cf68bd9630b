"""The `sciassist` command: every program behind one entry point, a core install that needs no
optional dependency, and one error line naming the extra when a command reaches for one."""

import subprocess
import sys

import pytest

from sciassist import cli
from tests.conftest import REPO_ROOT

OPTIONAL = ("transformers", "peft", "nltk", "rouge", "fastapi", "uvicorn", "starlette", "tensorboard", "wandb")
CORE = ("train", "rl", "evaluate", "chat", "prepare", "download", "plan", "demo", "tiny", "recipe")


def run_without_extras(args, blocked=OPTIONAL):
    """`sciassist ARGS` in a fresh interpreter in which the optional packages cannot be imported."""
    code = (f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
            f"from sciassist.cli import main\nsys.exit(main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", CORE)
def test_core_commands_need_no_extra(command):
    result = run_without_extras([command, "--help"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage:") and "--" in result.stdout


@pytest.mark.parametrize(("command", "module", "extra"), [("export", "transformers", "export"),
                                                          ("web", "uvicorn", "web")])
def test_a_missing_extra_is_one_error_line(command, module, extra):
    result = run_without_extras([command, "--help"])
    assert result.returncode == 2
    assert result.stderr == (f"error: sciassist {command} needs {module}, which is not installed: "
                             f"pip install 'sciassist[{extra}]'\n")


def test_python_m_export_without_transformers_is_the_same_one_line():
    """`python -m sciassist.export` (run as __main__, as -m does) without the extra: one line, exit code 2."""
    code = ("import runpy, sys\nsys.modules['transformers'] = None\nsys.argv = ['sciassist.export', '--help']\n"
            "runpy.run_module('sciassist.export', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("error: python -m sciassist.export needs transformers, which is not installed: "
                             "pip install 'sciassist[export]'\n")


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_python_m_serve_web_without_the_web_extra_is_one_line(module):
    """`python -m sciassist.serve.web` without fastapi or uvicorn: one line naming the extra, exit code 2."""
    code = (f"import runpy, sys\nsys.modules[{module!r}] = None\nsys.argv = ['sciassist.serve.web', '--help']\n"
            "runpy.run_module('sciassist.serve.web', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"error: python -m sciassist.serve.web needs {module}, which is not installed: "
                             "pip install 'sciassist[web]'\n")


def test_a_command_calls_itself_as_it_was_invoked(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: sciassist train [-h]")
    with pytest.raises(SystemExit):
        cli.main(["plan", "--seq", "0"])
    assert "sciassist plan: error: argument --seq" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "sciassist_train.py", "--help"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.startswith("usage: sciassist_train.py [-h]")


def test_usage_and_unknown_commands(capsys):
    assert cli.main([]) == 2 and cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in cli.COMMANDS)
    assert cli.main(["fine-tune"]) == 2
    assert capsys.readouterr().err.endswith(f"error: unknown command 'fine-tune'; expected one of "
                                            f"{', '.join(cli.COMMANDS)}\n")


def test_a_command_is_its_module_and_a_missing_non_optional_module_is_a_bug(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.COMMANDS, "probe", ("tests.test_cli", "a test"))
    monkeypatch.setattr(sys.modules[__name__], "main", lambda argv: seen.append(argv), raising=False)
    assert cli.main(["probe", "--x", "1"]) == 0 and seen == [["--x", "1"]]
    monkeypatch.setitem(cli.COMMANDS, "broken", ("sciassist.no_such_module", "a test"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["broken"])


def test_scripts_run_through_the_command():
    for script in ("sciassist_train.py", "sciassist_evaluate.py"):
        result = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and "--out_dir" in result.stdout


BAD_INPUT = {
    "train": ["--checkpoint", "{missing}", "--device", "cpu"],
    "rl": ["--data_path", "{missing}.jsonl", "--device", "cpu", "--out_dir", "{tmp}/rl"],
    "evaluate": ["--finetuned", "{missing}", "--data_path", "{missing}.jsonl", "--device", "cpu"],
    "chat": ["--checkpoint", "{missing}", "-p", "hi", "--device", "cpu"],
    "web": ["--checkpoint", "{missing}", "--device", "cpu"],
    "export": ["--checkpoint", "{missing}", "--out_dir", "{tmp}/export"],
    "prepare": ["--scienceqa", "{missing}", "--out_dir", "{tmp}/data"],
    "download": ["--model", "d99"],
    "plan": ["--seq", "0"],
    "demo": ["--scienceqa", "{missing}", "--out_dir", "{tmp}/demo"],
    "tiny": ["--scienceqa", "{missing}", "--out_dir", "{tmp}/tiny"],
    "recipe": ["--preset", "nope", "--scienceqa", "{missing}", "--out_dir", "{tmp}/recipe"],
}


def test_every_command_answers_bad_input_with_exit_code_2_and_an_error_line(tmp_path, capsys):
    assert set(BAD_INPUT) == set(cli.COMMANDS)
    for command, args in BAD_INPUT.items():
        args = [a.format(missing=tmp_path / "missing", tmp=tmp_path) for a in args]
        try:
            code = cli.main([command, *args])
        except SystemExit as e:  # argparse: a flag's value out of its range or choices
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (command, err)
        assert err and "error: " in err[-1] and "Traceback" not in "\n".join(err), (command, err)

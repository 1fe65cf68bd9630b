"""The Makefile as the README uses it: `make help` lists every documented target, `make install`
installs this package (the `sciassist` command), and every variable the README passes to a target
reaches that target's commands."""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

MAKEFILE = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
DOCUMENTED = re.compile(r"^([A-Za-z0-9_.-]+):[^=\n]*## (.+)$", re.MULTILINE)  # a target with a `## ` line
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args):
    result = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def recipe(target):
    """The command lines of `target`'s rule (the tab-indented lines after it)."""
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", MAKEFILE, re.MULTILINE)
    assert match, f"no rule for {target}"
    return match.group(1).splitlines()


@needs_make
def test_help_lists_every_documented_target():
    documented = dict(DOCUMENTED.findall(MAKEFILE))
    assert {"rehearse-d20", "install", "evaluate", "test-colab"} <= set(documented)
    listed = {line.split()[1]: line.split(None, 2)[2] for line in make("help").splitlines()
              if line.startswith("  make ")}
    assert listed == documented


def test_install_installs_this_package_with_its_command():
    """install makes .venv/bin/sciassist, after the requirements (so pip re-resolves nothing: --no-deps),
    again when pyproject.toml changes, and in a .venv made before this rule existed."""
    assert re.search(r"^install: \$\(VENV\)/\.installed \$\(VENV\)/bin/sciassist ##", MAKEFILE, re.MULTILINE)
    rule = re.search(r"^\$\(VENV\)/bin/sciassist: (.*)$", MAKEFILE, re.MULTILINE)
    assert rule.group(1).split() == ["$(VENV)/.installed", "pyproject.toml"]
    assert recipe("$(VENV)/bin/sciassist") == ["\t$(PY) -m pip install -q --no-deps -e .", "\ttouch $@"]
    assert 'sciassist = "sciassist.cli:main"' in (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")


@pytest.mark.skipif(not (Path(sys.prefix) / ".installed").exists(), reason="this environment is not make install's")
def test_the_sciassist_command_exists_after_make_install():
    command = Path(sys.prefix) / "bin" / "sciassist"
    result = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage: sciassist <command> [flags]")


def readme_make_variables():
    """(target, variable) for every `make TARGET VAR=...` in the README."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    found = set()
    for target, assignments in re.findall(r"make ([a-z0-9-]+)((?: [A-Z_0-9]+=\S*)+)", readme):
        found.update((target, name) for name in re.findall(r"([A-Z_0-9]+)=", assignments))
    return sorted(found)


@needs_make
@pytest.mark.parametrize(("target", "variable"), readme_make_variables())
def test_every_variable_the_readme_gives_a_target_reaches_its_commands(target, variable):
    # -n: print the commands, run nothing; -B: the install stamp too, as on a fresh checkout
    assert "zz_sentinel" in make("-n", "-B", target, f"{variable}=zz_sentinel")


@needs_make
def test_evaluate_is_not_given_a_model_it_would_ignore():
    assert "zz_sentinel" not in make("-n", "evaluate", "MODEL=zz_sentinel")
    assert "make evaluate MODEL" not in (REPO_ROOT / "README.md").read_text(encoding="utf-8")


@needs_make
def test_evaluate_with_rl_compares_base_finetuned_and_rl_along_the_rl_runs_sources():
    def command(*args):
        return next(line for line in make("-n", "evaluate", *args).splitlines() if "sciassist_evaluate.py" in line)
    assert "--rl" not in command() and "--finetuned newest --base source" in command()
    assert '--finetuned source --base source --rl "runs/rl"' in command("RL=runs/rl")
    assert '--finetuned runs/ft --base source --rl "runs/rl"' in command("RL=runs/rl", "RUN=runs/ft")


@needs_make
def test_rehearse_d20_appends_to_the_tracked_results_only_when_asked():
    def command(*args):
        return next(line for line in make("-n", "rehearse-d20", *args).splitlines() if "rehearse_d20.py" in line)
    assert "--append" not in command()
    assert command("APPEND=1").split()[-1] == "--append"


def test_the_rehearsal_says_where_it_appended(tmp_path):
    spec = importlib.util.spec_from_file_location("rehearse_d20", REPO_ROOT / "bench" / "rehearse_d20.py")
    rehearsal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rehearsal)
    assert rehearsal.RESULTS_FILE == REPO_ROOT / "bench" / "RESULTS.md"
    results = tmp_path / "results.md"
    results.write_text("# earlier\n")
    assert rehearsal.append_report("| a | b |", results) == results.resolve()
    assert results.read_text() == ("# earlier\n\n## The d20 rehearsal: `python bench/rehearse_d20.py` (CPU)\n\n"
                                   "| a | b |\n")

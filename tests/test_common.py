"""sciassist.common: settings dataclasses as command lines, ranges, device, atomic JSON."""

import json
from dataclasses import dataclass

import pytest
import torch

from sciassist.common import (
    UserError,
    autocast,
    check_ranges,
    resolve_device,
    setting,
    settings_from_namespace,
    settings_parser,
    write_json,
)


@dataclass
class Example:
    batch_size: int = setting(32, "questions per batch", at_least=1)
    temperature: float = setting(0.6, "0 = greedy", at_least=0.0, at_most=2.0)
    limit: int | None = setting(None, "at most this many", at_least=1)
    packing: bool = setting(True, "pack rows")
    origins: list[str] = setting([], "allowed origins")
    name: str = setting("run", "a name", choices=["run", "other"])


def parse(*argv):
    parser = settings_parser(Example, "example", "an example", renamed={"--bs": "--batch_size"})
    return settings_from_namespace(Example, parser.parse_args(list(argv)))


def test_every_field_is_a_flag_with_its_default():
    assert parse() == Example()
    s = parse("--batch_size", "4", "--temperature", "0", "--limit", "none", "--no_packing", "--origins", "a",
              "--origins", "b", "--name", "other")
    assert (s.batch_size, s.temperature, s.limit, s.packing, s.origins, s.name) == (4, 0.0, None, False,
                                                                                     ["a", "b"], "other")
    assert parse("--packing").packing is True and parse("--packing", "false").packing is False
    assert Example().origins == [] and Example().origins is not Example().origins


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "argument --batch_size: must be >= 1, got 0"),
    (["--temperature", "3"], "argument --temperature: must be between 0.0 and 2.0, got 3"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number, got nan"),
    (["--limit", "-5"], "argument --limit: must be >= 1, got -5"),
    (["--name", "x"], "invalid choice: 'x'"),
    (["--packing", "maybe"], "expected true or false"),
])
def test_bad_values_are_refused_at_parse_time_with_the_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_renamed_flags_still_work_with_a_note(capsys):
    assert parse("--bs", "3").batch_size == 3 and parse("--bs=5").batch_size == 5
    assert "note: --bs is now --batch_size" in capsys.readouterr().err


def test_check_ranges_for_settings_built_in_code():
    check_ranges(Example())
    with pytest.raises(UserError, match=r"--batch_size must be >= 1, got 0; --temperature must be between"):
        check_ranges(Example(batch_size=0, temperature=-1.0))


def test_device_and_precision_on_cpu():
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device must be auto, cpu, cuda, cuda:N, mps"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="CUDA is not available here"):
        resolve_device("cuda")
    with autocast(torch.device("cpu")):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with autocast(torch.device("cpu"), "bfloat16"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(UserError, match="--dtype must be one of"):
        autocast(torch.device("cpu"), "fp8")


def test_write_json_is_atomic_and_keeps_unicode(tmp_path):
    path = write_json(tmp_path / "sub" / "out.json", {"text": "Ångström", "path": tmp_path})
    assert json.loads(path.read_text(encoding="utf-8")) == {"text": "Ångström", "path": str(tmp_path)}
    assert "Ångström" in path.read_text(encoding="utf-8")
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]  # no temporary file left


def test_compute_dtype_follows_the_policy_on_cpu():
    from sciassist.common import compute_dtype
    assert compute_dtype("cpu") == torch.float32 and compute_dtype("cpu", "bfloat16") == torch.bfloat16
    assert compute_dtype(torch.device("cpu"), "float16") == torch.float16

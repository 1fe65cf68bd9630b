"""sciassist.common: settings dataclasses as command lines, ranges, device, atomic JSON."""

import json
import os
from dataclasses import dataclass

import pytest
import torch

from sciassist.common import (
    UserError,
    autocast,
    check_fields,
    describe_range,
    invoked_as,
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
    rate: float = setting(0.1, "a rate", above=0, at_most=10.0)
    share: float = setting(0.5, "a share", at_least=0, below=1)
    tag: str = setting("a", "a tag", check=lambda text: None if text.isalpha() else "must be letters only")


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
    (["--name", "x"], "argument --name: must be one of run, other, got x"),
    (["--rate", "0"], "argument --rate: must be a positive number <= 10.0, got 0"),
    (["--rate", "inf"], "argument --rate: must be a finite number, got inf"),
    (["--share", "1"], "argument --share: must be a fraction in [0, 1), got 1"),
    (["--tag", "a1"], "argument --tag: must be letters only, got a1"),
    (["--packing", "maybe"], "expected true or false"),
])
def test_bad_values_are_refused_at_parse_time_with_the_range(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_help_lists_the_values_of_a_choice_flag():
    @dataclass
    class Choices:
        mode: str = setting("a", "the mode", choices=["a", "b"])
        source: str | None = setting(None, "a source", choices=[None, "base", "sft"])
        kinds: list[str] = setting([], "kinds", choices=["x", "y"])

    help_text = " ".join(settings_parser(Choices, "choices", "").format_help().split())
    assert "--mode {a,b} the mode (default: a)" in help_text
    assert "--source {none,base,sft} a source (default: None)" in help_text
    assert "--kinds {x,y} kinds (default: []); repeatable" in help_text
    assert "[--mode {a,b}]" in help_text  # the usage line too


def test_dtype_help_lists_its_values():
    from sciassist.train.settings import TrainSettings

    help_text = " ".join(settings_parser(TrainSettings, "train", "").format_help().split())
    assert "--dtype {auto,bfloat16,float16,float32} " in help_text


def test_invoked_as_names_the_parsers_made_inside(capsys):
    with invoked_as("sciassist example"):
        parser = settings_parser(Example, "example", "an example")
        assert parser.format_usage().startswith("usage: sciassist example [-h]")
        with pytest.raises(SystemExit):
            parser.parse_args(["--name", "x"])
    assert "sciassist example: error: argument --name: must be one of run, other, got x" in capsys.readouterr().err
    assert settings_parser(Example, "example", "").prog == "example"
    with invoked_as(None):
        assert settings_parser(Example, "example", "").prog == "example"


def test_renamed_flags_still_work_with_a_note(capsys):
    assert parse("--bs", "3").batch_size == 3 and parse("--bs=5").batch_size == 5
    assert "note: --bs is now --batch_size" in capsys.readouterr().err


def test_check_fields_for_settings_built_in_code():
    check_fields(Example())
    with pytest.raises(UserError, match=r"--batch_size must be >= 1, got 0; --temperature must be between"):
        check_fields(Example(batch_size=0, temperature=-1.0))
    with pytest.raises(UserError) as info:
        check_fields(Example(name="x", rate=-1.0, share=float("nan"), tag="a b", limit=None))
    assert str(info.value) == ("invalid settings: --name must be one of run, other, got 'x'; --rate must be a "
                               "positive number <= 10.0, got -1.0; --share must be a finite number, got nan; "
                               "--tag must be letters only, got 'a b'")

    class OwnError(UserError):
        pass
    with pytest.raises(OwnError, match="--limit must be >= 1, got 0"):
        check_fields(Example(limit=0), OwnError)


def test_the_parser_and_check_fields_say_the_same_for_the_same_value(capsys):
    for flag, text, value in [("batch_size", "0", 0), ("share", "2", 2.0), ("name", "x", "x"), ("tag", "1", "1")]:
        with pytest.raises(SystemExit):
            parse(f"--{flag}", text)
        parsed = capsys.readouterr().err.split(f"argument --{flag}: ")[1].rsplit(", got", 1)[0]
        with pytest.raises(UserError) as info:
            check_fields(Example(**{flag: value}))
        assert str(info.value) == f"invalid settings: --{flag} {parsed}, got {value!r}"


@pytest.mark.parametrize("bounds, words", [
    ({"low": 1, "high": 10}, "between 1 and 10"), ({"low": 0}, ">= 0"), ({"high": 5}, "<= 5"),
    ({"above": 2}, "> 2"), ({"below": 3}, "< 3"), ({"above": 0}, "a positive number"),
    ({"above": 0, "high": 100.0}, "a positive number <= 100.0"), ({"low": 0, "below": 1}, "a fraction in [0, 1)"),
    ({"above": 1, "high": 4}, "in (1, 4]"),
])
def test_ranges_in_words(bounds, words):
    assert describe_range(**bounds) == words


def test_a_misspelt_rule_is_refused_where_the_setting_is_declared():
    with pytest.raises(TypeError, match="unknown detail"):
        setting(1, "x", at_lest=0)


@pytest.mark.parametrize("native", [False, True])
def test_device_and_precision_on_cpu(monkeypatch, native):
    """auto on a CPU: bf16 autocast where it computes bf16 natively (AVX512-BF16 / AMX), fp32 elsewhere."""
    import sciassist.common
    monkeypatch.setattr(sciassist.common, "native_bf16", lambda device: native)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device must be auto, cpu, cuda, cuda:N, mps"):
        resolve_device("tpu")
    with pytest.raises(UserError, match="CUDA is not available here"):
        resolve_device("cuda")
    with autocast(torch.device("cpu")):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == (torch.bfloat16 if native else torch.float32)
    precision = sciassist.common.precision_for("cpu")
    assert (precision.name, precision.needs_grad_scaler) == ("bfloat16" if native else "float32", False)
    assert precision.reason == ("auto: this CPU computes bf16 natively (AVX512-BF16 / AMX)" if native else
                                "auto: fp32 on cpu (no native bf16 on this CPU: it would be emulated, many times "
                                "slower)")
    with autocast(torch.device("cpu"), "float32"):
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


def test_compute_dtype_follows_the_policy_on_cpu(monkeypatch):
    import sciassist.common
    from sciassist.common import compute_dtype
    monkeypatch.setattr(sciassist.common, "native_bf16", lambda device: False)
    assert compute_dtype("cpu") == torch.float32 and compute_dtype("cpu", "bfloat16") == torch.bfloat16
    monkeypatch.setattr(sciassist.common, "native_bf16", lambda device: True)
    assert compute_dtype("cpu") == torch.bfloat16 and compute_dtype("cpu", "float32") == torch.float32
    assert compute_dtype(torch.device("cpu"), "float16") == torch.float16


def test_a_gpu_the_torch_build_has_no_kernels_for_is_named(monkeypatch):
    from sciassist.common import missing_gpu_kernels
    cu130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]  # torch 2.11 from PyPI
    capability = {"value": (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: cu130)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    gpu = torch.device("cuda", 0)
    problem = missing_gpu_kernels(gpu)
    assert "has no kernels for Tesla V100-SXM2-16GB (compute capability 7.0)" in problem
    assert "sm_75, sm_80" in problem and "torch 2.10 or older" in problem and "--device cpu" in problem
    for ok in ((7, 5), (8, 0), (8, 9), (9, 0), (12, 0), (12, 1)):  # built, same major, or PTX (12.0 -> 12.1)
        capability["value"] = ok
        assert missing_gpu_kernels(gpu) is None, ok
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_75", "sm_80"])  # torch 2.10 cu128
    capability["value"] = (7, 0)
    assert missing_gpu_kernels(gpu) is None
    capability["value"] = (6, 1)
    assert "compute capability 6.1" in missing_gpu_kernels(gpu)


def test_threads_line_names_the_count_and_the_cpu_and_is_printed_once(capsys):
    from sciassist import common
    before = torch.get_num_threads()
    try:
        line = common.use_threads(1)
        assert torch.get_num_threads() == 1
        assert line == f"CPU threads: 1 ({common.cpu_name()}, {os.cpu_count()} logical cores; --threads to change)"
        common._ANNOUNCED.discard(line)
        common.announce_threads(1)
        common.announce_threads(None)  # the same count again: not repeated
        assert capsys.readouterr().out == line + "\n"
    finally:
        torch.set_num_threads(before)
    assert common.cpu_name() and common.cpu_name() != "unknown CPU"

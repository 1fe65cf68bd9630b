"""What every stage needs once: the device, the precision, writing a file atomically, and a
command line generated from a settings dataclass.

Settings dataclasses are the one source of defaults. A field becomes `--<name>`; its help is
`setting(default, help)`'s text; bools take `--x`, `--x false` and `--no_x`; Optional[T]
fields take `none`. What a value may be (choices, bounds, a rule of its own) is declared on the
field too, and checked by one function, value_problem: when the flag is parsed, and by
check_fields for settings built in code. A renamed flag keeps working for a while: the parser
rewrites it and says so on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import json
import math
import os
import sys
import typing
from pathlib import Path

import torch

from nanochat.optim import native_bf16

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


class UserError(Exception):
    """A problem the user can fix (a bad flag, a missing file); the message says how.

    Each stage has its own subclass; a command-line program prints it as one `error:` line."""


# ----------------------------------------------------------------------------- device and precision

THREADS_HELP = ("CPU threads of torch (default: torch's, one per physical core; the demo, the tiny base and the "
                "recipes default to 1: their small models gain nothing from a second thread, and on a busy machine "
                "threads that wait for each other slow a step several times). A run on CPU is bit-identical only "
                "at the same count on the same CPU type")


def use_threads(threads: int | None) -> str:
    """Set torch's CPU threads (None: keep torch's default) and say so in one line: the count,
    the CPU model and its logical cores."""
    if threads:
        torch.set_num_threads(threads)
    n = torch.get_num_threads()
    return f"CPU threads: {n} ({cpu_name()}, {os.cpu_count()} logical cores; --threads to change)"


_ANNOUNCED = set()


def announce_threads(threads: int | None) -> None:
    """use_threads, printed the first time a process runs at that count."""
    line = use_threads(threads)
    if line not in _ANNOUNCED:
        print(line, flush=True)
    _ANNOUNCED.add(line)


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere: platform's, or 'unknown CPU')."""
    import platform
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def resolve_device(name: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` (or None): cuda if available, else mps, else cpu. Under torchrun a bare `cuda`
    means this process's GPU (local_rank). Raises UserError for a device that is not here."""
    wanted = "auto" if name is None else str(name).strip()
    if wanted == "auto":
        if torch.cuda.is_available():
            wanted = "cuda"
        elif torch.backends.mps.is_available():
            wanted = "mps"
        else:
            wanted = "cpu"
    try:
        device = torch.device(wanted)
    except (RuntimeError, ValueError):
        raise UserError(f"--device must be {', '.join(DEVICES)}, got {name!r}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device must be {', '.join(DEVICES)}, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if device.type == "cuda":
        problem = missing_gpu_kernels(device)
        if problem:
            raise UserError(problem)
    return device


def missing_gpu_kernels(device: torch.device) -> str | None:
    """Why this torch build cannot run on this GPU, or None. A CUDA wheel holds machine code for
    a list of GPU architectures (torch.cuda.get_arch_list()) plus PTX that newer GPUs can
    compile; a GPU older than all of them gets "no kernel image is available" at the first op.
    Volta (V100, sm_70) left PyPI's CUDA 12.8 wheels in torch 2.11 and is in no CUDA 13 wheel."""
    if getattr(torch.version, "hip", None):
        return None
    arch_list = torch.cuda.get_arch_list()
    if not arch_list:
        return None  # a build that does not say: let it try
    major, minor = torch.cuda.get_device_capability(device)
    capability = major * 10 + minor
    built = [int(a.split("_")[1]) for a in arch_list if a.startswith("sm_") and a.split("_")[1].isdigit()]
    ptx = [int(a.split("_")[1]) for a in arch_list if a.startswith("compute_") and a.split("_")[1].isdigit()]
    if capability in built or any(p <= capability for p in ptx) or any(b // 10 == major and b <= capability
                                                                        for b in built):
        return None
    name = torch.cuda.get_device_name(device)
    return (f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) has no kernels for {name} (compute "
            f"capability {major}.{minor}); it was built for {', '.join(arch_list)}. Install a torch build that "
            f"includes sm_{capability} (for Volta GPUs such as the V100: torch 2.10 or older from PyPI), or use "
            "--device cpu")


DTYPES = ("auto", "bfloat16", "float16", "float32")
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


@dataclasses.dataclass(frozen=True)
class Precision:
    """How forward passes compute on a device: `name` (bfloat16 | float16 | float32), the autocast
    dtype (None: plain fp32, no autocast), whether training must scale its loss with a GradScaler
    (fp16: small gradients underflow without it), and why this precision was chosen. The weights
    stay fp32 (master weights) whatever the precision: autocast only changes the math."""

    name: str
    device_type: str
    dtype: torch.dtype | None
    needs_grad_scaler: bool
    reason: str

    def autocast(self):
        """A fresh context for forward passes (a no-op one for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self):
        """torch.amp.GradScaler for training (fp16), else None."""
        return torch.amp.GradScaler(self.device_type) if self.needs_grad_scaler else None


def compute_dtype(device: torch.device | str, dtype: str = "auto") -> torch.dtype:
    """The dtype forward passes compute in under the policy (torch.float32 without autocast):
    what nanochat.engine.Engine takes, so generation follows the same policy as scoring."""
    return precision_for(device, dtype).dtype or torch.float32


def precision_for(device: torch.device | str, dtype: str = "auto") -> Precision:
    """The precision policy: `--dtype auto` is bf16 autocast on CUDA GPUs with native bf16
    (compute capability >= 8.0) and on CPUs with native bf16 (AVX512-BF16 or AMX, the test Muon's
    dtype uses: nanochat.optim.native_bf16), fp16 autocast + GradScaler on older CUDA GPUs, fp32 on
    other CPUs and mps. An explicit bfloat16 | float16 | float32 is used as given (fp16 always with a GradScaler
    for training). Raises UserError for any other value."""
    device = torch.device(device)
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        name, reason = dtype, "--dtype " + dtype
        if dtype == "bfloat16" and device.type == "cuda" and not native_bf16(device):
            reason += " (emulated on this GPU, compute capability < 8.0: slow; --dtype float16 is native)"
    elif device.type == "cuda":
        if native_bf16(device):
            name, reason = "bfloat16", "auto: this GPU computes bf16 natively (compute capability >= 8.0)"
        else:
            name, reason = "float16", ("auto: this GPU has no native bf16 (compute capability < 8.0): "
                                       "fp16 + loss scaling")
    elif device.type == "mps":
        # fp32 on Apple GPUs: autocast on mps covers fewer ops than on CUDA (bf16 needs macOS 14+,
        # and GradScaler's mps support is newer still), and its speed-up there is small; fp32 is
        # what always works and matches the CPU numbers. --dtype float16 / bfloat16 opt in.
        name, reason = "float32", "auto: fp32 on mps (autocast there is partial)"
    elif native_bf16(device):
        # measured (bench/RESULTS.md): bf16 autocast trains the CPU recipe's model 1.2x and a 5.2M one 1.4x
        # faster than fp32 on an AMD EPYC with AVX512-BF16; over 4,000 steps the recipe's 1.1M model ends 3%
        # higher in val loss, so the recipe pins fp32 (a choice per run: --dtype float32)
        name, reason = "bfloat16", "auto: this CPU computes bf16 natively (AVX512-BF16 / AMX)"
    else:
        name, reason = "float32", f"auto: fp32 on {device.type}" + (
            " (no native bf16 on this CPU: it would be emulated, many times slower)" if device.type == "cpu" else "")
    return Precision(name=name, device_type=device.type, dtype=TORCH_DTYPES[name],
                     needs_grad_scaler=name == "float16", reason=reason)


def autocast(device: torch.device, dtype: str = "auto"):
    """The precision context for forward passes, as precision_for(device, dtype) decides: bf16
    autocast on CUDA GPUs and CPUs with native bf16 (as nanochat runs on GPUs), fp16 on older GPUs,
    fp32 on other CPUs and mps; `bfloat16` / `float16` / `float32` force one."""
    return precision_for(device, dtype).autocast()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work (so a timer measures it); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- files

def write_json(path, data) -> Path:
    """Write JSON atomically (a temporary file, then a rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- settings -> argparse

# What a setting() may say about its values; every rule is checked by value_problem, when the flag
# is parsed and by check_fields for settings built in code.
RULES = ("choices", "at_least", "at_most", "above", "below", "check", "auto")
CLI_DETAILS = ("flags", "cli", "required")
AUTO = "auto"


def setting(default, help: str, **details):
    """A settings field: its default, its --help text, and what its value may be, declared once:
    choices=[...]; at_least=N / at_most=N (inclusive bounds), above=N / below=N (exclusive);
    check=function(value) -> what is wrong or None (a rule of this field alone); auto=True: the
    value "auto" is taken too (a number field that can be chosen for the run). For the command
    line: flags=("-p",) more option strings, cli=False to leave it off, required=True."""
    unknown = sorted(set(details) - set(RULES) - set(CLI_DETAILS))
    if unknown:
        raise TypeError(f"setting() got unknown detail(s) {', '.join(unknown)}")
    metadata = {"help": help, **details}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse_bool(text) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def value_problem(value, meta) -> str | None:
    """What is wrong with `value` by a field's rules (RULES), or None. None values (an Optional
    field's "none") and bools pass the number rules."""
    if value is None or (meta.get("auto") and value == AUTO):
        return None
    if "choices" in meta and value not in meta["choices"]:
        return f"must be one of {', '.join(map(str, meta['choices']))}"
    problem = _range_problem(value, meta)
    if problem is None and meta.get("check") is not None:
        problem = meta["check"](value)
    return problem


def _range_problem(value, meta) -> str | None:
    low, high = meta.get("at_least"), meta.get("at_most")
    above, below = meta.get("above"), meta.get("below")
    if (low, high, above, below) == (None,) * 4 or isinstance(value, bool):
        return None
    if not isinstance(value, (int, float)):
        return f"must be {AUTO} or a number" if meta.get("auto") else "must be a number"
    if not math.isfinite(value):
        return "must be a finite number"
    if ((low is None or value >= low) and (above is None or value > above)
            and (high is None or value <= high) and (below is None or value < below)):
        return None
    return "must be " + describe_range(low, high, above, below)


def describe_range(low=None, high=None, above=None, below=None) -> str:
    """A range in words: "between 1 and 10", ">= 0", "a positive number <= 100", "a fraction in [0, 1)"."""
    if above == 0:
        upper = f" <= {high}" if high is not None else f" < {below}" if below is not None else ""
        return "a positive number" + upper
    lower = low if low is not None else above
    upper = high if high is not None else below
    if lower is None:
        return f"<= {high}" if high is not None else f"< {below}"
    if upper is None:
        return f">= {low}" if low is not None else f"> {above}"
    if low is not None and high is not None:
        return f"between {low} and {high}"
    interval = f"{'[' if low is not None else '('}{lower}, {upper}{']' if high is not None else ')'}"
    return f"a fraction in {interval}" if (lower, upper) == (0, 1) else f"in {interval}"


def field_problems(settings) -> list[str]:
    """'--<flag> <problem>, got <value>' for every field of `settings` that breaks its rules."""
    problems = []
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        for item in (value if isinstance(value, list) else [value]):
            problem = value_problem(item, f.metadata)
            if problem:
                problems.append(f"--{f.name} {problem}, got {item!r}")
                break
    return problems


def check_fields(settings, error=None) -> None:
    """Raise `error` (UserError by default) naming every flag whose value breaks its field's rules:
    for settings built in code, the same check the command line makes when it parses them."""
    problems = field_problems(settings)
    if problems:
        raise (error or UserError)("invalid settings: " + "; ".join(problems))


def _checked(parse, meta):
    """`parse` (text -> value), then the field's rules: a broken rule is argparse's error for the flag."""
    if not any(meta.get(rule) is not None for rule in RULES):
        return parse

    def checked(text):
        value = parse(text)
        problem = value_problem(value, meta)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value
    checked.__name__ = parse.__name__
    return checked


def _optional(kind):
    def parse(text):
        return None if str(text).strip().lower() in ("none", "") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def auto_or(kind):
    """A parser of "auto" or a value of `kind` (a field declared with auto=True)."""
    def parse(text):
        if str(text).strip().lower() == AUTO:
            return AUTO
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected auto or {_KIND_WORDS.get(kind, kind.__name__)}, "
                                             f"got {text!r}") from None
    parse.__name__ = kind.__name__
    return parse


_KIND_WORDS = {int: "a whole number", float: "a number"}


def _default_text(value) -> str:
    return '""' if value == "" else str(value)


def add_settings_arguments(parser: argparse.ArgumentParser, cls, group_title: str | None = None,
                           only_given: bool = False) -> None:
    """One --flag per field of the dataclass `cls` (see the module docstring). only_given: a flag
    that is not on the command line leaves no attribute at all (so a caller can tell "given"
    from "default"); the help still shows the dataclass default."""
    target = parser.add_argument_group(group_title) if group_title else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta.get("help", "")
        if "(default" not in help_text:
            help_text += f" (default: {_default_text(default)})"
        kwargs = {"default": argparse.SUPPRESS if only_given else default, "help": help_text.replace("%", "%%"),
                  "dest": f.name}
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        origin, args = typing.get_origin(kind), typing.get_args(kind)
        optional = origin is typing.Union or str(origin) == "<class 'types.UnionType'>"
        inner = next((a for a in args if a is not type(None)), kind) if optional else kind
        flags = [f"--{f.name}", *meta.get("flags", ())]
        if inner is bool:
            # `--compile` alone means true; `--packing false` or `--no_packing` turns it off
            kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
            target.add_argument(*flags, **kwargs)
            target.add_argument(f"--no_{f.name}", f"--no-{f.name}", dest=f.name, action="store_false",
                                default=kwargs["default"], help=argparse.SUPPRESS)
            continue
        if meta.get("auto"):
            kwargs.update(type=_checked(auto_or(inner), meta), metavar=f"{AUTO}|{inner.__name__.upper()}")
        elif typing.get_origin(inner) is list:
            item = typing.get_args(inner)[0]
            kwargs.update(action="append", default=kwargs["default"] if only_given else list(default),
                          metavar=item.__name__.upper(), type=_checked(item, meta))
            kwargs["help"] += "; repeatable"
        elif optional:
            kwargs.update(type=_checked(_optional(inner), meta), metavar=inner.__name__.upper())
        else:
            kwargs.update(type=_checked(inner, meta), metavar=inner.__name__.upper())
        if "choices" in meta:  # the values in usage and --help, as argparse shows choices ("none": None)
            kwargs["metavar"] = "{" + ",".join("none" if c is None else str(c) for c in meta["choices"]) + "}"
        if meta.get("required"):
            kwargs.pop("default")
            kwargs["required"] = True
        target.add_argument(*flags, **kwargs)


# The name a program was invoked by, when that is not its own: sciassist.cli sets "sciassist train"
# while it runs the command whose parser is otherwise called sciassist_train.py.
_INVOKED_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("invoked_as", default=None)


@contextlib.contextmanager
def invoked_as(prog: str | None):
    """Every SettingsParser made inside calls itself `prog` in usage, --help and errors (None: its own name)."""
    token = _INVOKED_AS.set(prog)
    try:
        yield
    finally:
        _INVOKED_AS.reset(token)


class SettingsParser(argparse.ArgumentParser):
    """An ArgumentParser that knows renamed flags: `renamed={"--old": "--new"}`, and the name it was
    invoked by (invoked_as)."""

    def __init__(self, *args, renamed: dict[str, str] | None = None, **kwargs):
        if _INVOKED_AS.get():
            kwargs["prog"] = _INVOKED_AS.get()
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        rewritten = []
        for arg in args:
            name, eq, value = arg.partition("=")
            if name in self.renamed:
                print(f"note: {name} is now {self.renamed[name]}", file=sys.stderr)
                arg = self.renamed[name] + eq + value
            rewritten.append(arg)
        return super().parse_known_args(rewritten, namespace)


def settings_parser(cls, prog: str, description: str, renamed: dict[str, str] | None = None,
                    epilog: str | None = None) -> SettingsParser:
    parser = SettingsParser(prog=prog, description=description, epilog=epilog, renamed=renamed,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_arguments(parser, cls)
    return parser


def settings_from_namespace(cls, namespace: argparse.Namespace):
    """The dataclass `cls` from the parsed flags that are its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})


def print_error(error: BaseException) -> int:
    """A command-line program's answer to a problem the user can fix: one line, exit code 2."""
    print(f"error: {error}", file=sys.stderr)
    return 2


# the top-level module of an optional dependency -> the extra that installs it
EXTRAS = {
    "transformers": "export", "peft": "lora", "nltk": "explain", "rouge": "explain", "fastapi": "web",
    "uvicorn": "web", "starlette": "web", "tensorboard": "track", "wandb": "track",
}


def missing_extra_message(prog: str, error: ModuleNotFoundError) -> str | None:
    """What `prog` says when it reaches for an optional dependency that is not installed (None:
    `error` is about a module that is not optional, a bug to show as it is)."""
    extra = EXTRAS.get((error.name or "").split(".")[0])
    return extra and f"{prog} needs {error.name}, which is not installed: pip install 'sciassist[{extra}]'"

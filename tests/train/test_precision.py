"""The precision policy (sciassist.common.precision_for) and mixed-precision training on CPU:
bf16 and fp16 autocast steps learn as fp32 does, fp16's GradScaler skips an overflowed step
instead of stopping the run, and an fp16 run resumes bit for bit (the loss scale included)."""

import dataclasses
import json

import pytest
import torch

import sciassist.train.step as step_module
from nanochat.checkpoint import load_model
from sciassist.common import UserError, autocast, precision_for
from sciassist.pipelines.finetune import settings_from_args
from sciassist.train.loop import train
from sciassist.train.settings import TrainError, TrainSettings, check_settings
from tests.train.test_train import data_file, live_base_dir, read_metrics, resume_weights, tiny_settings  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# Mixed precision changes the rounding of the matmuls, not what is learned. Tolerance: every
# step's train loss and the final val loss within 1% (relative) of fp32's over 6 steps of the
# tiny model (attention live). Measured here (torch 2.13, CPU): worst step 0.08% for bf16 (8
# mantissa bits), 0.005% for fp16 (11 bits, loss-scaled); the final train loss 0.05% / 0.01%,
# the final val loss 0.08% / 0.01%. 1% leaves >10x margin for other CPUs' kernels and is still
# far below what a broken step gives (a skipped or lost update leaves the loss at its previous
# value, 10-20% higher at these learning rates).
LOSS_TOLERANCE = 0.01
TIMES = ("positions_per_s", "real_tokens_per_s", "supervised_tokens_per_s", "mfu", "step_time_s", "elapsed_s")


def without_times(records):
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


# --- the policy table

def fake_cuda(monkeypatch, capability):
    """A CUDA GPU of `capability` on this CPU machine. is_bf16_supported says True either way, as
    torch does for pre-Ampere GPUs (it counts emulation): the policy must go by the capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize("native", [False, True])
def test_cpu_auto_follows_native_bf16_and_explicit_dtypes_win(monkeypatch, native):
    """auto on a CPU: bf16 autocast with AVX512-BF16 / AMX, fp32 without; a named dtype is used as given."""
    import sciassist.common
    monkeypatch.setattr(sciassist.common, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    auto = precision_for(cpu)
    expected_auto = ("bfloat16", torch.bfloat16) if native else ("float32", None)
    assert (auto.name, auto.dtype, auto.needs_grad_scaler, auto.grad_scaler()) == (*expected_auto, False, None)
    bf16, fp16, fp32 = (precision_for(cpu, d) for d in ("bfloat16", "float16", "float32"))
    assert (bf16.name, bf16.dtype, bf16.needs_grad_scaler) == ("bfloat16", torch.bfloat16, False)
    assert (fp16.name, fp16.dtype, fp16.needs_grad_scaler) == ("float16", torch.float16, True)
    assert isinstance(fp16.grad_scaler(), torch.amp.GradScaler)
    assert (fp32.name, fp32.dtype, fp32.needs_grad_scaler) == ("float32", None, False)
    assert precision_for("mps").name == "float32"  # autocast on mps is partial (see precision_for)
    x = torch.ones(2, 2)
    for dtype, expected in (("auto", expected_auto[1] or torch.float32), ("bfloat16", torch.bfloat16),
                            ("float16", torch.float16),
                            ("float32", torch.float32)):
        with autocast(cpu, dtype):  # the callers' context follows the same policy
            assert x.matmul(x).dtype == expected


@pytest.mark.parametrize("capability, name, scaler", [((8, 0), "bfloat16", False), ((9, 0), "bfloat16", False),
                                                      ((7, 5), "float16", True), ((7, 0), "float16", True)])
def test_cuda_auto_is_bf16_on_ampere_and_fp16_with_a_scaler_before(monkeypatch, capability, name, scaler):
    fake_cuda(monkeypatch, capability)
    p = precision_for(torch.device("cuda", 0))
    assert (p.name, p.needs_grad_scaler, p.device_type) == (name, scaler, "cuda")
    assert p.dtype == {"bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    assert "compute capability" in p.reason


def test_cuda_explicit_dtype_wins(monkeypatch):
    fake_cuda(monkeypatch, (7, 5))
    t4 = torch.device("cuda", 0)
    assert precision_for(t4, "float32").dtype is None
    emulated = precision_for(t4, "bfloat16")
    assert emulated.dtype == torch.bfloat16 and not emulated.needs_grad_scaler and "emulated" in emulated.reason
    fake_cuda(monkeypatch, (8, 0))
    assert precision_for(t4, "float16").needs_grad_scaler


def test_a_bad_dtype_names_the_flag_and_the_choices(tmp_path, capsys):
    with pytest.raises(UserError, match=r"--dtype must be one of auto, bfloat16, float16, float32, got 'fp8'"):
        precision_for(torch.device("cpu"), "fp8")
    with pytest.raises(UserError, match="--dtype must be one of"):
        autocast(torch.device("cpu"), "half")
    assert settings_from_args(["--dtype", "float16"]).dtype == "float16"
    with pytest.raises(SystemExit):
        settings_from_args(["--dtype", "fp8", "--device", "cpu"])
    assert "argument --dtype: must be one of auto, bfloat16, float16, float32, got fp8" in capsys.readouterr().err
    with pytest.raises(TrainError, match=r"--dtype must be one of auto, bfloat16, float16, float32, got 'fp8'"):
        check_settings(TrainSettings(dtype="fp8", device="cpu"))


# --- training

@pytest.fixture(scope="module")
def runs(tmp_path_factory, live_base_dir, data_file):  # noqa: F811
    """The same 6-step run in each precision (attention live: non-zero output projections):
    {dtype: (summary, records, run folder)}."""
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        root = tmp_path_factory.mktemp(dtype)
        settings = tiny_settings(live_base_dir, data_file, root, num_iterations=6, eval_every=3, dtype=dtype)
        out[dtype] = (train(settings), read_metrics(root / "run"), root / "run")
    return out


def test_bf16_and_fp16_steps_learn_as_fp32_does(runs):
    fp32 = runs["float32"][0]["final_train_loss"]
    first = runs["float32"][1][1]["train_loss"]
    assert fp32 < 0.9 * first  # the run learns, so the comparison means something
    fp32_steps = [r["train_loss"] for r in runs["float32"][1] if "train_loss" in r]
    for dtype in ("bfloat16", "float16"):
        summary, records, _ = runs[dtype]
        steps = [r["train_loss"] for r in records if "train_loss" in r]
        worst = max(abs(a - b) / b for a, b in zip(steps, fp32_steps, strict=True))
        print(f"{dtype}: worst step loss difference {worst:.4%}")
        assert worst < LOSS_TOLERANCE
        assert summary["status"] == "completed" and summary["steps_done"] == 6
        difference = abs(summary["final_train_loss"] - fp32) / fp32
        print(f"{dtype}: final train loss {summary['final_train_loss']:.5f} vs fp32 {fp32:.5f} "
              f"({difference:.2%}); val {summary['final_val_loss']:.5f} vs {runs['float32'][0]['final_val_loss']:.5f}")
        assert difference < LOSS_TOLERANCE
        assert summary["final_val_loss"] == pytest.approx(runs["float32"][0]["final_val_loss"], rel=LOSS_TOLERANCE)
    # only fp16 scales its loss: its records carry the scale; bf16 / fp32 records are as before
    fp16_steps = [r for r in runs["float16"][1] if "train_loss" in r]
    assert all(r["skipped_step"] is False and r["loss_scale"] == 2.0**16 for r in fp16_steps)
    assert not any("loss_scale" in r for d in ("float32", "bfloat16") for r in runs[d][1])


def test_checkpoints_keep_fp32_master_weights(runs):
    for dtype in ("bfloat16", "float16"):
        run_dir = runs[dtype][2]
        model, _, _ = load_model(run_dir, device="cpu", step=runs[dtype][0]["best_step"])
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        state = torch.load(run_dir / "resume" / "state.pt", weights_only=True)
        assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}
        assert bool(state["grad_scaler"]) == (dtype == "float16")


def test_an_overflowed_fp16_step_is_skipped_not_divergence(tmp_path, tiny_base_dir, data_file,  # noqa: F811
                                                          monkeypatch):
    real = step_module.accumulate_gradients
    calls = []

    def overflow_in_step_2(model, *args, **kwargs):
        calls.append(1)
        loss = real(model, *args, **kwargs)
        if len(calls) == 2:  # an inf gradient, as an fp16 overflow in the backward gives
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        return loss

    monkeypatch.setattr(step_module, "accumulate_gradients", overflow_in_step_2)
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=3, eval_every=0, save_every=1,
                             dtype="float16", grad_clip=1.0)
    weights = {}

    def keep_weights(record):
        weights[record["step"]] = {k: v.clone() for k, v in resume_weights(tmp_path / "run").items()}

    summary = train(settings, on_step=keep_weights)
    assert summary["status"] == "completed" and summary["steps_done"] == 3
    weights[3] = resume_weights(tmp_path / "run")  # the final resume point (step 3's in on_step is not written yet)
    steps = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert [steps[s]["skipped_step"] for s in (1, 2, 3)] == [False, True, False]
    assert [steps[s]["loss_scale"] for s in (1, 2, 3)] == [2.0**16, 2.0**15, 2.0**15]
    assert "grad_norm" in steps[1] and "grad_norm" not in steps[2]  # an overflowed norm is not reported
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # the step was not taken
    assert not all(torch.equal(weights[2][k], weights[3][k]) for k in weights[2])


def test_fp16_resume_is_bit_identical(tmp_path, tiny_base_dir, data_file, monkeypatch):  # noqa: F811
    # an overflow in step 2 (before the cut) makes the loss scale one the resumed run must restore
    real = step_module.accumulate_gradients
    calls = []

    def overflow_in_step_2(model, *args, **kwargs):
        calls.append(1)
        loss = real(model, *args, **kwargs)
        if len(calls) == 2:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(step_module, "accumulate_gradients", overflow_in_step_2)
    full = tiny_settings(tiny_base_dir, data_file, tmp_path / "full", num_iterations=7, save_every=3,
                         dtype="float16")
    train(full)
    calls.clear()

    def stop_at_4(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    cut = dataclasses.replace(full, out_dir=str(tmp_path / "cut"))
    assert train(cut, on_step=stop_at_4)["status"] == "interrupted"
    assert torch.load(cut.run_dir() / "resume" / "state.pt", weights_only=True)["grad_scaler"]["scale"] == 2.0**15
    assert train(dataclasses.replace(cut, resume=True))["steps_done"] == 7

    weights_full, weights_cut = resume_weights(full.run_dir()), resume_weights(cut.run_dir())
    assert all(torch.equal(weights_full[k], weights_cut[k]) for k in weights_full)
    records = [without_times(read_metrics(s.run_dir())) for s in (full, cut)]
    assert records[0] == records[1]
    assert [r["skipped_step"] for r in records[0] if "skipped_step" in r] == [False, True] + [False] * 5
    states = [torch.load(s.run_dir() / "resume" / "state.pt", weights_only=True) for s in (full, cut)]
    assert states[0]["grad_scaler"] == states[1]["grad_scaler"]
    assert json.dumps(states[0]["grad_scaler"])  # plain numbers: weights_only loads it


def test_a_resume_point_from_before_the_scaler_still_loads(tmp_path, tiny_base_dir, data_file):  # noqa: F811
    settings = tiny_settings(tiny_base_dir, data_file, tmp_path, num_iterations=3, eval_every=0, save_every=2)

    def stop_at_2(record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    assert train(settings, on_step=stop_at_2)["status"] == "interrupted"
    path = settings.run_dir() / "resume" / "state.pt"
    state = torch.load(path, weights_only=True)
    del state["grad_scaler"]  # as written before the field existed
    torch.save(state, path)
    assert train(dataclasses.replace(settings, resume=True))["steps_done"] == 3

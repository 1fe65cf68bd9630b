"""bench/gpu.py --smoke: the GPU benchmark's code, run on CPU with tiny sizes."""

import json
import math
import subprocess
import sys

from tests.conftest import REPO_ROOT


def numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from numbers(v)


def test_smoke_writes_finite_json_and_a_table(tmp_path):
    out = tmp_path / "tmp"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "gpu_bench.json").read_text())
    assert {"device", "torch", "smoke", "seq", "free_memory_gb", "models", "elapsed_s"} <= set(result)
    assert result["smoke"] is True and len(result["models"]) == 1
    model = result["models"][0]
    assert {"name", "params", "train", "skipped", "eval"} <= set(model)
    assert {r["kernel"] for r in model["train"]} == {"dense", "loop"} and not model["skipped"]
    for r in model["train"]:
        assert {"batch", "seq", "real_tokens", "tokens_per_s", "mfu", "peak_memory_gb", "planned_gb",
                "planned_worst_case_gb", "step_s"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["planned_gb"] <= r["planned_worst_case_gb"]
    assert {"letter_questions_per_s", "generation_tokens_per_s", "questions"} <= set(model["eval"])
    # --device_batch_size auto on the simulated 64 MB card: the planned rows are proven as they are
    auto = model["auto_batch"]
    assert auto["planned_rows"] >= 2 and auto["proven_rows"] == auto["planned_rows"] and auto["halvings"] == []
    assert 0 < auto["planned_gb"] < 0.0671
    assert f"| tiny | simulated 64 MB card (smoke) (0.1 GB, 0.1 GB free) | {auto['planned_rows']} x 128 |" in \
        (out / "gpu_bench.md").read_text()
    assert all(math.isfinite(x) for x in numbers(result))
    assert "| tiny" in (out / "gpu_bench.md").read_text()
    # The kernel checks: on CPU the loop and dense kernels pass in fp32 and bf16, flex fails
    # (no backward on CPU) and varlen fails (a CUDA kernel), each with its reason.
    checks = result["kernel_checks"]
    # (the policy's dtype first: bf16 on a CPU with native bf16, else fp32; then the other)
    assert sorted((c["dtype"], c["heads"]) for c in checks) == [("bfloat16", "2/1x32"), ("bfloat16", "2/2x32"),
                                                                ("float32", "2/1x32"), ("float32", "2/2x32")]
    for c in checks:
        assert c["results"]["loop"] is None and c["results"]["dense"] is None and c["auto"] == "loop"
        assert c["results"]["flex"] and c["results"]["varlen"]
    assert "| float32 | 2/2x32 | FAIL | FAIL | pass | pass | loop |" in (out / "gpu_bench.md").read_text()


def test_the_compiled_row_reruns_the_first_kernels_largest_batch(monkeypatch):
    """bench/gpu.py's compiled-vs-eager row (CUDA only there), on CPU with an eager backend."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import gpu
    from random_model import random_gpt

    from nanochat.gpt import GPT, GPTConfig
    original = GPT.compile_for_training
    monkeypatch.setattr(GPT, "compile_for_training", lambda self: original(self, backend="eager"))
    import torch
    device = torch.device("cpu")
    model = random_gpt(GPTConfig(sequence_len=64, vocab_size=128, n_layer=1, n_head=2, n_kv_head=2, n_embd=32),
                       device)
    optimizers = model.setup_optimizers()
    rows = [gpu.train_case(model, optimizers, "loop", b, 64, 1, device, None) for b in (1, 2)]
    rows.append({"kernel": "loop", "batch": 4, "seq": 64, "oom": True})
    skipped = []
    (row,) = gpu.compiled_case(model, optimizers, rows, 64, 1, device, None, skipped)
    assert row["kernel"] == "loop + compile" and row["batch"] == 2 and row["tokens_per_s"] > 0 and not skipped
    assert all(block._compiled_call_impl is None for block in model.transformer.h)  # eager again after

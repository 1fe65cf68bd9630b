"""bench/bench_rl.py on a tiny random model, one step of each loop: the table and its figures."""

import json
import math
import subprocess
import sys

from tests.conftest import REPO_ROOT


def test_one_step_of_each_loop_gives_a_sane_table(tmp_path):
    out = tmp_path / "bench_rl.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_rl.py"), "--steps", "1", "--repeats", "1",
                           "--warmup", "0", "--questions", "2", "--samples", "4", "--device_batch_size", "2",
                           "--generation_batch_size", "4", "--max_new_tokens", "6", "--n_layer", "1", "--n_embd",
                           "32", "--vocab_size", "300", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert (result["threads"], result["precision"], result["model"]) == (1, "float32", "random")
    ours, theirs = result["rows"]["sciassist"], result["rows"]["nanochat"]
    for row in (ours, theirs):
        assert row["samples"] == 2 * 4  # questions x samples, one step
        assert 0 < row["rollout_cpu_s"] < row["cpu_s"] and row["update_cpu_s"] > 0 and row["wall_s"] > 0
        assert math.isclose(row["samples_per_s"], 8 / row["cpu_s"])
        assert 1 <= row["reply_tokens_mean"] <= 6 and row["tokens_per_s"] > 0
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
    # a random model earns nothing, so no group has a spread: the project skips the update, the
    # stand-in of nanochat's loop still runs every row through the model (prompt + reply, padded)
    assert ours["reward_mean"] == theirs["reward_mean"] == 0
    assert (ours["trained_rows"], ours["update_positions"]) == (0, 0)
    assert theirs["trained_rows"] == 8 and theirs["update_positions"] > 8 * 6
    text = proc.stdout
    assert text == result["table"] + "\n"
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines] == [
        "| loop", "| SciAssist (rl_step)", "| nanochat chat_rl.py stand-in", "| ratio (stand-in time / SciAssist time)"]
    ratio = float(lines[3].split(" | ")[3].strip("*x"))
    assert math.isclose(ratio, theirs["cpu_s"] / ours["cpu_s"], rel_tol=0.01)
    assert "1 thread(s), float32" in text and "2 questions x 4 samples" in text

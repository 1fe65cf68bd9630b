"""The Colab notebook runs top to bottom in smoke mode (CPU, offline, bundled sample), as CI
runs it, and the committed notebook carries no outputs. With PERSIST (a local folder standing in
for Drive), a run cut off by a disconnect resumes when the notebook runs again and ends with the
uninterrupted run's weights."""

import json
import shutil
import time

import pytest
import torch

from sciassist.pipelines.colab import resume_point_header
from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "sciassist-fine-tune.ipynb"


def test_committed_notebook_has_no_outputs_and_a_parameters_cell():
    nb = json.loads(NOTEBOOK.read_text())
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code_cells)
    tagged = [c for c in code_cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1
    parameters = "".join(tagged[0]["source"])
    assert "SMOKE = False" in parameters and "PERSIST = None" in parameters
    assert 'DRIVE_DIR = "/content/drive/MyDrive/sciassist"' in parameters
    assert "colab.research.google.com" in "".join(nb["cells"][0]["source"])


def copy_of_repo(tmp_path):
    """The notebook works from the repository root (it imports nanochat/ and sciassist/)."""
    workdir = tmp_path / "work"
    shutil.copytree(REPO_ROOT, workdir, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "notebook_smoke", "test-envs.log", "finetuned_model_checkpoint", "eval_results",
        "demo_output", "__pycache__"))
    return workdir


def run_notebook(papermill, workdir, out, parameters):
    """Execute the notebook; returns the executed notebook's text (an error raises, after the
    executed notebook is written to `out`)."""
    papermill.execute_notebook(str(workdir / NOTEBOOK.name), str(out), parameters=parameters,
                               cwd=str(workdir), kernel_name="python3", progress_bar=False)
    executed = json.loads(out.read_text())
    assert "error" not in [o.get("output_type") for c in executed["cells"] for o in c.get("outputs", [])]
    return json.dumps(executed)


@pytest.mark.slow
def test_notebook_runs_in_smoke_mode(tmp_path):
    papermill = pytest.importorskip("papermill")
    workdir = copy_of_repo(tmp_path)
    text = run_notebook(papermill, workdir, tmp_path / "out.ipynb", {"SMOKE": True})
    run_dir = workdir / "notebook_smoke" / "runs" / "notebook"
    assert list(run_dir.glob("model_*.pt")) and (run_dir / "loss_curve.png").exists()
    assert (run_dir / "eval" / "report.md").exists() and (run_dir / "eval" / "accuracy_by_category.png").exists()
    assert "image/png" in text  # the loss curve and the accuracy chart were shown inline
    # section 6 in miniature: RL from the fine-tune, then fine-tuned vs RL on the same questions
    rl_dir = workdir / "notebook_smoke" / "runs" / "notebook_rl"
    summary = json.loads((rl_dir / "run_summary.json").read_text())
    assert (summary["status"], summary["steps_done"]) == ("completed", 2)
    assert (workdir / summary["source_model"]["checkpoint_dir"]).resolve() == run_dir.resolve()
    results = json.loads((rl_dir / "eval" / "results.json").read_text())
    assert [row["name"] for row in results["table"]["rows"]][:2] == ["finetuned", "rl"]
    assert (rl_dir / "rl_curves.png").exists() and (rl_dir / "eval" / "report.md").exists()


def weights(path, key=None):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state[key] if key else state


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors that differ: {different[:5]}"


@pytest.mark.slow
def test_a_run_cut_off_by_a_disconnect_resumes_to_the_uninterrupted_runs_weights(tmp_path):
    """3 fine-tuning steps with a resume point at step 2: the first run is cut off after step 3,
    whose validation has just written a new best checkpoint, before the run could finish (no
    resume point is saved at the stop, as when Colab recycles the machine); the second resumes
    from step 2 without preparing data or training the base again, and its weights equal those
    of a run that was never cut off, bit for bit."""
    papermill = pytest.importorskip("papermill")
    t0 = time.time()
    workdir = copy_of_repo(tmp_path)
    common = {"SMOKE": True, "PERSIST": True, "TRAIN": {"num_iterations": 3, "save_every": 2}, "EVAL_LIMIT": 2}
    drive = tmp_path / "drive"
    smoke = drive / "smoke"  # smoke mode keeps to a folder of its own under DRIVE_DIR
    run_dir = smoke / "runs" / "notebook"

    with pytest.raises(papermill.PapermillExecutionError) as cut_off:
        run_notebook(papermill, workdir, tmp_path / "cut_off.ipynb",
                     {**common, "DRIVE_DIR": str(drive), "DISCONNECT_AFTER_STEPS": 3})
    assert cut_off.value.ename == "SimulatedDisconnect"
    assert resume_point_header(run_dir / "resume" / "state.pt")["step"] == 2  # what survives the disconnect
    assert not (run_dir / "run_summary.json").exists() and (run_dir / "model_000003.pt").exists()
    made_once = {p: p.stat().st_mtime_ns for folder in ("nanochat", "data") for p in (smoke / folder).rglob("*")
                 if p.is_file()}
    assert any(p.name == "tiny_base.json" for p in made_once) and any(p.suffix == ".jsonl" for p in made_once)

    text = run_notebook(papermill, workdir, tmp_path / "resumed.ipynb", {**common, "DRIVE_DIR": str(drive)})
    assert f"resuming the run in {run_dir} from step 2 of 3" in text
    assert "not prepared again" in text and "not trained again" in text
    assert {p: p.stat().st_mtime_ns for p in made_once} == made_once  # no data prepared, no base trained again
    assert (run_dir / "eval" / "report.md").exists()

    # the same run, never cut off, in a Drive of its own that holds the same base and data
    other = tmp_path / "other_drive"
    for folder in ("nanochat", "data"):
        shutil.copytree(smoke / folder, other / "smoke" / folder)
    run_notebook(papermill, workdir, tmp_path / "uninterrupted.ipynb", {**common, "DRIVE_DIR": str(other)})
    other_run_dir = other / "smoke" / "runs" / "notebook"

    resumed, uninterrupted = (json.loads((d / "run_summary.json").read_text()) for d in (run_dir, other_run_dir))
    assert resumed["status"] == uninterrupted["status"] == "completed"
    assert resumed["steps_done"] == uninterrupted["steps_done"] == 3
    for key in ("best_step", "best_val_loss", "final_train_loss"):
        assert resumed[key] == uninterrupted[key], key
    best = f"model_{resumed['best_step']:06d}.pt"
    assert_same_tensors(weights(run_dir / best), weights(other_run_dir / best))
    assert_same_tensors(weights(run_dir / "resume" / "state.pt", "model"),  # the final weights
                        weights(other_run_dir / "resume" / "state.pt", "model"))

    def losses(directory):
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in records]

    assert losses(run_dir) == losses(other_run_dir) and len(losses(run_dir)) == 4  # steps 0-3, step 3 once
    print(f"cut off, resumed and uninterrupted notebook runs: {time.time() - t0:.0f} s")

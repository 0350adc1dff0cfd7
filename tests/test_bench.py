"""The benchmark commands: what a bare GPU machine needs to run them, and `make gpu-check`'s
calls, JSON and table, run on the CPU with tiny rows (`--smoke`) so that a GPU session's few
minutes are not spent finding a broken script."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_the_bench_path_imports_neither_mlflow_nor_dvc() -> None:
    """A GPU machine has torch and transformers, often not MLflow or DVC: the train stage's model
    and recipe code, the reference stage's scorer and the bench import without them."""
    code = (
        "import sys\n"
        "for name in ('mlflow', 'dvc', 'trl', 'optuna'): sys.modules[name] = None\n"
        "sys.path.insert(0, 'bench')\n"
        "import dpo_vs_trl, gpu_check\n"
        "from pipeline.train import setup\n"
        "from pipeline.train.recipe import DPORecipe\n"
        "from pipeline.model.precompute import score_split\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_gpu_check_stops_in_one_line_when_a_package_every_row_needs_is_missing() -> None:
    code = (
        "import runpy, sys\n"
        "sys.modules['datasets'] = None\n"
        "sys.path.insert(0, 'bench')  # as when the script itself is run\n"
        "sys.argv = ['gpu_check.py', '--smoke']\n"
        "runpy.run_path('bench/gpu_check.py', run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: make gpu-check needs datasets")


@pytest.mark.slow  # a tiny Qwen3 with the 151k vocabulary, four processes: about 80 s
def test_gpu_check_smoke_runs_the_rows_and_writes_the_table(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    [result] = report["results"]
    median = result["report"]["median"]
    assert set(median) == {"ours"}, result
    assert median["ours"]["steady_pairs_per_s"] > 0 and median["ours"]["peak_mb"] > 0
    # QLoRA needs CUDA: on the CPU its row fails, named in the JSON and the table, and the other
    # row still runs (--keep-going); without bitsandbytes it is skipped and named instead.
    failed = result["report"]["failed"]
    assert "ours_qlora" in failed or "ours_qlora (no bitsandbytes)" in report["skipped"]
    assert not failed or "nf4 needs a CUDA GPU" in failed["ours_qlora"]
    table = (tmp_path / "gpu-check.md").read_text()
    assert table.startswith("commit ") and ", cpu, torch " in table and ", transformers " in table
    assert "| tiny | 2 | ours | " in table
    if failed:
        assert "| tiny | 2 | ours_qlora | failed: see the JSON" in table

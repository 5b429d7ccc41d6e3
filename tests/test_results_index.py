"""benchmarks/results/README.md lists every results folder, and no per-run log or model is committed."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_every_results_folder_is_in_the_index():
    index = (RESULTS / "README.md").read_text()
    folders = sorted(p.name for p in RESULTS.iterdir() if p.is_dir())
    assert folders, "no results folders"
    assert [f for f in folders if f"`{f}/`" not in index] == []


def test_no_log_or_model_is_tracked():
    tracked = subprocess.run(["git", "ls-files", str(RESULTS)], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an sdist): nothing to check
        return
    assert [p for p in tracked if p.endswith((".log", ".pt", ".onnx"))] == []

"""Kill the server process after round k, resume, and get exactly the uninterrupted run's results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a server process running Flower's simulation engine (Ray)

CONFIG = {
    "num-server-rounds": 4,
    "local-meta-iters": 2,
    "min-available-nodes": 3,
    "warmup-rounds": 1,
    "mask-start-round": 1,
    "fraction-evaluate": 1.0,
}
RUN = "import json, sys; from harness.simulation import run_in_process; run_in_process(json.loads(sys.argv[1]), 3)"


def _start(config: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN, json.dumps(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _rounds(out: Path) -> list[dict]:
    path = out / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _comparable(summary: dict) -> dict:
    keys = ("genotype", "final_test_accuracy", "supernet_test_accuracy", "personalized_accuracy", "params")
    return {k: summary[k] for k in keys}


def test_resume_after_kill_loses_nothing_and_matches_uninterrupted_run(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    proc = _start({**CONFIG, "results-dir": str(resumed)})
    try:
        deadline = time.time() + 300
        while len(_rounds(resumed)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert len(_rounds(resumed)) >= 2, "run did not reach round 2"
        os.killpg(proc.pid, signal.SIGKILL)  # the server process and its Ray workers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (resumed / "summary.json").exists()
    killed_after = len(_rounds(resumed))

    # a different config is refused, a matching one continues
    bad = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps({**CONFIG, "seed": 1, "resume": True, "results-dir": str(resumed)})],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "differs from the checkpoint's in seed" in bad.stdout + bad.stderr
    assert not (resumed / "summary.json").exists()

    for config in ({**CONFIG, "resume": True, "results-dir": str(resumed)}, {**CONFIG, "results-dir": str(reference)}):
        done = subprocess.run(
            [sys.executable, "-c", RUN, json.dumps(config)], capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-2000:]

    rounds = _rounds(resumed)
    assert [r["round"] for r in rounds] == [1, 2, 3, 4], f"killed after {killed_after} rounds"
    assert [r["accuracy"] for r in rounds] == [r["accuracy"] for r in _rounds(reference)]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed"] is True
    assert _comparable(summary) == _comparable(json.loads((reference / "summary.json").read_text()))

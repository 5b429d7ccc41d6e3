"""The Flower + Ray overhead arithmetic and the process-tree memory probe of benchmarks.framework,
and the scale table built on them (benchmarks.scale)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.framework import overhead_shares, tree_pss_bytes, whole_run_share
from benchmarks.scale import point, table


def test_overhead_is_what_server_and_packed_client_work_leave_of_the_round():
    rounds = [
        {"round-s": 10.0, "server-s": 1.0, "client-s-sum": 16.0},
        {"round-s": 5.0, "server-s": 0.5, "client-s-sum": 10.0},
    ]
    assert overhead_shares(rounds, actors=2) == pytest.approx([0.1, 0.0])  # 10-1-8 = 1 s; 5-0.5-5 < 0 -> 0
    result = {"rounds": [{"round_s": 10.0, "overhead_share": 0.1}, {"round_s": 5.0, "overhead_share": 0.0}]}
    assert whole_run_share(result) == pytest.approx(1.0 / 15.0)


def _run(clients: int, round_s: list[float]) -> dict:
    rounds = [
        {"round_s": t, "server_s": 0.0, "client_s_sum": t, "overhead_share": 0.5, "images": 128.0 * clients}
        for t in round_s
    ]
    return {"clients": clients, "actors": 2, "rounds": rounds, "run_s": sum(round_s)}


def test_scale_rows_average_the_discrete_rounds_and_set_work_against_time():
    base = point(_run(10, [30.0, 9.0, 4.0, 5.0]), 16)  # round 1 (the supernet's) is not a discrete round
    assert base["discrete_round_s"] == pytest.approx(5.0)  # the median: the first discrete round's 9 s counts once
    assert base["discrete_client_s_per_actor"] == pytest.approx(2.5)
    more_clients, larger_images = point(_run(30, [60.0, 10.0, 10.0]), 16), point(_run(10, [90.0, 20.0, 20.0]), 32)
    rows = table([base, more_clients, larger_images])[2:]
    assert rows[1].endswith("| 3.00x | 2.00x |")  # 3x the clients' work in 2x the time
    assert rows[2].endswith("| 4.00x | 4.00x |")  # 4x the pixels in 4x the time


@pytest.mark.slow  # a child interpreter holding 200 MiB
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup"), reason="needs Linux /proc smaps_rollup")
def test_tree_memory_counts_children():
    alone = tree_pss_bytes([os.getpid()])
    child = subprocess.Popen([sys.executable, "-c", "import time; b = b'x' * (200 * 2**20); time.sleep(30)"])
    try:
        for _ in range(100):  # wait until the child has touched its 200 MiB
            with_child = tree_pss_bytes([os.getpid()])
            if with_child - alone > 150 * 2**20:
                break
            subprocess.run(["sleep", "0.1"])
        assert with_child - alone > 150 * 2**20
    finally:
        child.kill()
        child.wait()

"""A real 2-round FedMetaNAS run through Flower's simulation engine (Ray), 3 clients."""

import json

import pytest
import torch

from fedmetanas_core.data import load_dataset
from fedmetanas_core.method.training import evaluate
from fedmetanas_core.run.outputs import load_derived_model
from harness.simulation import run_in_process

pytestmark = pytest.mark.slow  # Flower's simulation engine (Ray)

TINY = {
    "num-server-rounds": 2,
    "local-meta-iters": 2,
    "min-available-nodes": 3,
    "warmup-rounds": 0,
    "mask-start-round": 1,
}


def test_two_round_simulation_writes_every_output(tmp_path):
    out = tmp_path / "run"
    run_in_process({**TINY, "results-dir": str(out)}, num_supernodes=3)

    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert summary["method"] == "fedmetanas" and summary["num_clients"] == 3
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["replies"] == 3 and r["aggregated"] and r["rejected"] == 0 for r in rounds)
    assert rounds[0]["tau"] == 1.0 and abs(rounds[1]["tau"] - 0.1) < 1e-9  # schedule endpoints
    for name in ("config.yaml", "genotype.yaml", "derived_model.pt", "checkpoint.pt"):
        assert (out / name).is_file(), name
    for key in (
        "final_test_accuracy",
        "supernet_test_accuracy",
        "personalized_accuracy",
        "wall_time_s",
        "search_time_s",
        "retrain_time_s",
        "genotype",
        "params",
        "seed",
        "versions",
    ):
        assert key in summary, key
    assert summary["retrain_time_s"] == 0.0 and len(summary["personalized_per_client"]) == 3

    # the derived model loads with one call and reproduces the reported accuracy, no retraining
    net = load_derived_model(out)
    _, test = load_dataset("digits")
    acc = evaluate(net, test, 512, torch.device("cpu"))["accuracy"]
    assert abs(acc - summary["final_test_accuracy"]) < 1e-9

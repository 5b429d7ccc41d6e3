"""A run is a list of phases: the planner's phases per method, what one phase hands the next, the
local-training table, and the server loop over phases (resumed inside FedNAS's retraining) with
the real ClientApp handlers called in-process. No Flower simulation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from helpers import NodeIds

from client_app import app as client
from fedmetanas_core.federation.coordinator import model_config, space_for_run
from fedmetanas_core.federation.phases import PLANS, FixedPhase, Handoff, Phase, RetrainPhase, SearchPhase, plan_phases
from fedmetanas_core.method.genotype import Genotype
from fedmetanas_core.method.training import LOCAL_TRAINING, LocalResult, local_trainer, run_settings
from fedmetanas_core.run import config as C
from fedmetanas_core.run.config import RunConfig
from flower_records import array_record
from harness.local_grid import LocalGrid
from server_app.app import run_experiment
from server_app.strategy import SearchStrategy, build_base_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity", "single_thread", "skip_run_extras")

TINY = {
    "local-meta-iters": 1,
    "local-epochs": 1,
    "retrain-local-epochs": 2,
    "min-available-nodes": 3,
    "min-train-nodes": 2,
    "batch-size": 16,
    "init-channels": 4,
    "num-partitions": 3,
    "train-subset": 240,
    "test-subset": 120,
    "personalize-steps": 2,
}


def _plan(flat: dict, test):
    cfg = RunConfig.from_flat({**TINY, **flat}, check_paths=False)
    return cfg, plan_phases(cfg, space_for_run(cfg, test), test, torch.device("cpu"))


# --- the planner --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flat, expected",
    [
        ({"method": "fedmetanas", "num-server-rounds": 5}, [(SearchPhase, "search", "search", 5)]),
        (
            {"method": "fednas", "num-server-rounds": 4, "retrain-rounds": 3},
            [(SearchPhase, "search", "search", 4), (RetrainPhase, "retrain", "fixed", 3)],
        ),
        ({"method": "fednas", "num-server-rounds": 4, "retrain-rounds": 0}, [(SearchPhase, "search", "search", 4)]),
        ({"method": "fedavg", "num-server-rounds": 6}, [(FixedPhase, "fedavg", "fixed", 6)]),
    ],
)
def test_planner_returns_each_methods_phases_in_order(digits_test, flat, expected):
    _, phases = _plan(flat, digits_test)
    assert all(isinstance(p, Phase) for p in phases)
    assert [(type(p), p.name, p.kind, p.rounds) for p in phases] == expected
    assert set(PLANS) == set(C.METHODS)


def test_planner_refuses_a_method_it_has_no_plan_for(digits_test):
    with pytest.raises(ValueError, match="phases.PLANS"):
        plan_phases(SimpleNamespace(method="mine", tiers=""), None, digits_test, torch.device("cpu"))


def test_fedavg_phase_uses_the_genotype_file(digits_test, tmp_path):
    cfg, (search,) = _plan({"method": "fedmetanas"}, digits_test)
    search.start(Handoff())
    search.genotype.save_yaml(tmp_path / "genotype.yaml")
    _, (fedavg,) = _plan({"method": "fedavg", "fedavg-genotype": str(tmp_path / "genotype.yaml")}, digits_test)
    assert fedavg.genotype == search.genotype
    fedavg.start(Handoff())
    assert fedavg.handoff().genotype == search.genotype and fedavg.masks == {}


def test_retraining_starts_from_the_genotype_the_search_hands_off(digits_test):
    cfg, (search, retrain) = _plan({"method": "fednas", "num-server-rounds": 2, "retrain-rounds": 2}, digits_test)
    search.start(Handoff())
    left = search.handoff()
    assert left.genotype == search.genotype and 0 <= left.results["supernet_test_accuracy"] <= 1
    assert left.results["supernet_params"] == sum(p.numel() for p in search.model.net.parameters())
    with pytest.raises(ValueError, match="genotype"):
        retrain.start(Handoff())
    retrain.start(left)
    config = retrain.round_config(1)
    assert Genotype.from_json(config["genotype"]) == search.genotype
    assert config["phase"] == "fixed" and config["local-epochs"] == cfg.retrain_local_epochs == 2
    assert retrain.final_network() is retrain.net and retrain.handoff().genotype == search.genotype


def test_handoff_accumulates_phase_times_and_round_trips_plain_data():
    g = Genotype(((("skip_connect", 0), ("sep_conv_3x3", 1)),), ((("max_pool_3x3", 0), ("skip_connect", 1)),))
    carried = Handoff().then(Handoff(g, {"supernet_test_accuracy": 0.5}), elapsed=10.0)
    carried = carried.then(Handoff(None), elapsed=25.0)  # a phase that leaves no genotype keeps the one before
    assert carried.genotype == g and carried.phase_times == [10.0, 15.0]
    plain = carried.to_dict()
    json.dumps(plain)
    assert Handoff.from_dict(plain) == carried
    old = {"genotype": g.to_dict(), "search_time_s": 10.0, "retrain_time_s": 15.0, "supernet_test_accuracy": 0.5}
    assert Handoff.from_dict(old) == carried, "a checkpoint written before phases"


# --- the local-training table -------------------------------------------------------------------


def test_every_planned_phase_of_every_method_has_local_training(digits_test):
    planned = set()
    for method in C.METHODS:
        _, phases = _plan({"method": method, "retrain-rounds": 1}, digits_test)
        planned |= {(p.kind, method) for p in phases}
    assert planned == set(LOCAL_TRAINING)
    assert all(callable(local_trainer(kind, method)) for kind, method in planned)
    with pytest.raises(ValueError, match="LOCAL_TRAINING"):
        local_trainer("fixed", "fedmetanas")


def test_client_runs_whatever_the_table_names_with_one_signature(digits_test, monkeypatch):
    """A new entry is picked up at the next round: the ClientApp only looks it up."""
    cfg, (phase,) = _plan({"method": "fedavg", "local-epochs": 3, "outer-lr-w": 0.07}, digits_test)
    phase.start(Handoff())
    calls = []

    def fake(model, data, cfg, plan, generator, device, proximal_mu):
        calls.append(
            (type(model).__name__, plan.local_epochs, plan.lr_w, proximal_mu, isinstance(generator, torch.Generator))
        )
        return LocalResult(num_examples=len(data.pool), train_loss=0.25, steps=7, images=11)

    monkeypatch.setitem(LOCAL_TRAINING, ("fixed", "fedavg"), fake)
    strategy = SearchStrategy(build_base_strategy(cfg.replace(strategy="FedProx", proximal_mu=0.3)))
    space = space_for_run(cfg, digits_test)
    config = ConfigRecord({"method": cfg.method, **model_config(space), **phase.round_config(1)})
    msg = next(iter(strategy.configure_train(1, array_record(phase.initial_state()), config, NodeIds([11, 12, 13]))))
    ctx = Context(
        run_id=7301,
        node_id=11,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=dict(cfg),
    )
    metrics = client.train(msg, ctx).content["metrics"]
    assert calls == [("SimpleCNN", 3, pytest.approx(0.07), pytest.approx(0.3), True)]
    assert (metrics["steps"], metrics["images"], metrics["train-loss"]) == (7, 11, 0.25)


# --- the server loop over phases, with the ClientApp in-process ----------------------------------


class Crash(Exception):
    pass


class CrashingGrid(LocalGrid):
    """Three in-process nodes running the real ClientApp; after ``crash_after`` train rounds it
    raises, as a server killed after that round's checkpoint."""

    def __init__(self, run_id: int, run_config: dict, crash_after: int = 0):
        super().__init__(run_id, run_config, num_nodes=3)
        self.crash_after, self.train_rounds = crash_after, 0

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            if self.crash_after and self.train_rounds == self.crash_after:
                raise Crash
            self.train_rounds += 1
        return super().send_and_receive(messages, timeout)


def test_fednas_resumed_inside_retraining_matches_the_uninterrupted_run(tmp_path):
    flat = {**TINY, "method": "fednas", "num-server-rounds": 2, "retrain-rounds": 2, "tensorboard": False}
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    cfg = RunConfig.from_flat({**flat, "results-dir": str(reference)})
    with run_settings(cfg):
        run_experiment(CrashingGrid(7401, dict(cfg)), cfg)
    cfg = RunConfig.from_flat({**flat, "results-dir": str(resumed)})
    with run_settings(cfg), pytest.raises(Crash):
        run_experiment(CrashingGrid(7402, dict(cfg), crash_after=3), cfg)  # the search and one retraining round
    assert not (resumed / "summary.json").exists()
    cfg = RunConfig.from_flat({**flat, "results-dir": str(resumed), "resume": True})
    with run_settings(cfg):
        run_experiment(CrashingGrid(7403, dict(cfg)), cfg)
    want, got = (json.loads((d / "summary.json").read_text()) for d in (reference, resumed))
    keys = (
        "genotype",
        "final_test_accuracy",
        "supernet_test_accuracy",
        "supernet_params",
        "personalized_accuracy",
        "params",
        "rounds",
        "retrain_rounds",
        "steps_per_client_round",
    )
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}
    assert got["resumed"] is True and got["search_time_s"] > 0 and got["retrain_time_s"] > 0
    rows = [json.loads(line) for line in (resumed / "rounds.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["round"]) for r in rows] == [("search", 1), ("search", 2), ("retrain", 1), ("retrain", 2)]
    ref_rows = [json.loads(line) for line in (reference / "rounds.jsonl").read_text().splitlines()]
    assert [r["accuracy"] for r in rows] == [r["accuracy"] for r in ref_rows]

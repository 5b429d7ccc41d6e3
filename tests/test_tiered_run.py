"""A tiered run end to end in process (the real ServerApp loop and ClientApp; issue 28): each tier's
network within its budget from one search, clients paired with tiers as declared, refused clients
named, per-tier outputs."""

from __future__ import annotations

import json

import pytest
import torch

from fedmetanas_core.method.training import run_settings
from fedmetanas_core.method.width_slices import slice_indices
from fedmetanas_core.run.config import RunConfig, defaults

RUN = {
    "local-meta-iters": 2,
    "local-epochs": 1,
    "min-available-nodes": 4,
    "min-train-nodes": 2,
    "batch-size": 16,
    "num-partitions": 4,
    "train-subset": 400,
    "test-subset": 120,
    "personalize-steps": 1,
    "num-server-rounds": 3,
    "warmup-rounds": 1,
    "discrete-round": 2,
    "init-channels": 0,
    "reduction-cells": "0,1",
    "tiers": "macs:15000,macs:120000",
}


def tiered_run(tmp_path, run_id: int, node_configs=None, errors_as_replies=False, **flat):
    from harness.local_grid import LocalGrid
    from server_app.app import run_experiment

    cfg = RunConfig.from_flat({**defaults(), **RUN, **flat, "results-dir": str(tmp_path)})
    with run_settings(cfg, 1):
        run_experiment(LocalGrid(run_id, dict(cfg), 4, node_configs, errors_as_replies), cfg)
    return json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.parametrize("method", ["fedmetanas", "fedavg"])
def test_one_search_gives_each_tier_its_network_within_budget(
    tmp_path, method, flower_task_identity, single_thread, skip_run_extras, monkeypatch
):
    import server_app.tiers as tiers

    monkeypatch.setattr(tiers, "export_tier", lambda *args: None)
    # node 4 declares a budget between the tiers: it searches for the smaller one; the others by share
    summary = tiered_run(tmp_path, 9300 + (method == "fedavg"), {4: {"budget-macs": 60000}}, method=method)
    rows = summary["tiers"]
    assert [r["tier"] for r in rows] == ["macs-15000", "macs-120000"]
    assert all(r["within_budget"] and r["macs"] <= float(r["budget"].split(":")[1]) for r in rows)
    assert rows[1]["macs"] > 2 * rows[0]["macs"]  # widths follow the budgets
    assert sum(r["clients"] for r in rows) == 4 and all(r["clients"] >= 1 for r in rows)
    assert all(r["local_test_accuracy"] is not None and len(r["per_client"]) == r["clients"] for r in rows)
    for r in rows:
        on_disk = json.loads((tmp_path / "tiers" / r["tier"] / "summary.json").read_text())
        assert on_disk["final_test_accuracy"] == r["final_test_accuracy"]
    # no retraining: every tier's network holds its slice of one set of weights
    small, large = (torch.load(tmp_path / "tiers" / r["tier"] / "derived_model.pt", weights_only=True) for r in rows)
    width = lambda m: m["cnn_channels"] or m["space"]["init_channels"]  # noqa: E731
    common = [k for k in small["state_dict"] if k in large["state_dict"] and small["state_dict"][k].ndim]
    assert len(common) >= 3
    for key in common:
        part = small["state_dict"][key]
        index = slice_indices(tuple(part.shape), tuple(large["state_dict"][key].shape), width(small), width(large))
        torch.testing.assert_close(large["state_dict"][key].numpy()[index], part.numpy(), rtol=0, atol=0)
    if method == "fedmetanas":
        assert all(r["genotype"] for r in rows)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert all(set(r["tiers"]) == {"macs-15000", "macs-120000"} for r in rounds)
    assert all(r["aggregated"] and r["rejected"] == 0 and r["replies"] == 4 for r in rounds)
    assert summary["refused_nodes"] == {}
    assert 3 in [c["partition-id"] for c in rows[0]["per_client"]]  # node 4 (partition 3): budget 60k -> 15k tier
    # the run's own figures are its largest tier's, against that tier's budget
    assert summary["cost"]["budget"]["limit"] == 120000 and summary["cost"]["within_budget"] is True
    assert summary["final_test_accuracy"] == rows[1]["final_test_accuracy"]


def test_a_node_no_tier_fits_is_refused_and_the_run_goes_on(
    tmp_path, flower_task_identity, single_thread, skip_run_extras, monkeypatch, caplog
):
    import server_app.tiers as tiers

    monkeypatch.setattr(tiers, "export_tier", lambda *args: None)
    summary = tiered_run(
        tmp_path,
        9302,
        {1: {"budget-macs": 5000}, 2: {"budget-macs": "lots"}},
        errors_as_replies=True,  # as a SuperNode answers a ClientApp that raised
        **{"num-server-rounds": 1},
    )
    refused = summary["refused_nodes"]
    assert set(refused) == {"1", "2"}
    assert "budget-macs=5000" in refused["1"] and "no tier fits" in refused["1"]
    assert "'budget-macs'" in refused["2"] and "> 0" in refused["2"]
    assert sum(r["clients"] for r in summary["tiers"]) == 2


class Crash(Exception):
    pass


def test_a_tiered_run_resumed_after_a_crash_matches_the_uninterrupted_run(
    tmp_path, flower_task_identity, single_thread, skip_run_extras, monkeypatch
):
    """Every tier's architecture and masks are in the checkpoint: a resumed run ends where the
    uninterrupted one does, tier by tier."""
    import server_app.tiers as tiers
    from harness.local_grid import LocalGrid
    from server_app.app import run_experiment

    monkeypatch.setattr(tiers, "export_tier", lambda *args: None)

    class CrashingGrid(LocalGrid):
        def __init__(self, run_id, run_config, crash_after=0):
            super().__init__(run_id, run_config, 4)
            self.crash_after, self.train_rounds = crash_after, 0

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == "train":
                if self.crash_after and self.train_rounds == self.crash_after:
                    raise Crash
                self.train_rounds += 1
            return super().send_and_receive(messages, timeout)

    flat = {**defaults(), **RUN, "num-server-rounds": 4, "discrete-round": 3}
    summaries = {}
    for name, crash_after in (("reference", 0), ("resumed", 2)):
        cfg = RunConfig.from_flat({**flat, "results-dir": str(tmp_path / name)})
        if crash_after:
            with run_settings(cfg, 1), pytest.raises(Crash):
                run_experiment(CrashingGrid(9310, dict(cfg), crash_after), cfg)
            cfg = RunConfig.from_flat({**flat, "results-dir": str(tmp_path / name), "resume": True})
        with run_settings(cfg, 1):
            run_experiment(CrashingGrid(9311 + bool(crash_after), dict(cfg)), cfg)
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    keys = ("tier", "genotype", "final_test_accuracy", "local_test_accuracy", "macs")
    want, got = ([{k: r[k] for k in keys} for r in s["tiers"]] for s in summaries.values())
    assert got == want and summaries["resumed"]["resumed"] is True


def test_a_tier_no_client_searches_for_is_refused(tmp_path, flower_task_identity, single_thread):
    from fedmetanas_core.run.config import ConfigError

    with pytest.raises(ConfigError, match=r"'tiers'.*no client searches for tier macs:120000"):
        tiered_run(tmp_path, 9304, **{"tier-shares": "1,0.01"})  # 4 partitions: all in the small tier


def test_sampling_draws_positions_so_any_node_id_survives():
    from server_app.tiers import sample_nodes

    nodes = sorted([2**64 - 5, 2**63 + 1, 17, 2**63 - 3, 9_000_000_000_000_000_000, 42])
    for rnd in range(1, 20):
        chosen = sample_nodes(nodes, 0.5, 2, seed=0, server_round=rnd)
        assert len(chosen) == 3 and set(chosen) <= set(nodes) and all(isinstance(n, int) for n in chosen)
    assert sample_nodes(nodes, 0.5, 2, 0, 3) == sample_nodes(nodes, 0.5, 2, 0, 3)
    assert sample_nodes(nodes, 1.0, 2, 0, 3) == nodes


@pytest.mark.parametrize(("fraction", "asked"), [(1.0, [4, 1]), (0.5, [2, 1]), (0.0, [0, 0])])
def test_tier_personalization_asks_fraction_evaluate_of_each_tiers_clients(
    monkeypatch, flower_task_identity, fraction, asked
):
    from types import SimpleNamespace

    from flwr.app import Message

    import server_app.tiers as tiers_app
    from fedmetanas_core.method.genotype import SimpleCNN
    from fedmetanas_core.space import SpaceConfig

    sent: list[list[Message]] = []
    monkeypatch.setattr(tiers_app, "send_and_receive", lambda grid, msgs, timeout: sent.append(msgs) or [])
    rounds = tiers_app.TierRounds.__new__(tiers_app.TierRounds)
    rounds.cfg = RunConfig.from_flat({**defaults(), "fraction-evaluate": fraction})
    rounds.grid, rounds.base_config = None, {}
    rounds.node_tier = {11: 0, 12: 0, 13: 0, 14: 0, 15: 1}
    rounds.phase = SimpleNamespace(phases=[SimpleNamespace(space=SpaceConfig(10))] * 2)
    net = SimpleCNN(SpaceConfig(10), 4)
    for tier in (0, 1):
        assert rounds.personalize(tier, net, None, server_round=5) == []
    counts = [len(m) for m in sent] + [0] * (2 - len(sent))
    assert counts == asked
    tier_nodes = {n for m in sent for n in (msg.metadata.dst_node_id for msg in m)}
    assert tier_nodes <= set(rounds.node_tier)
    if sent:
        assert {msg.metadata.dst_node_id for msg in sent[-1]} == {15}

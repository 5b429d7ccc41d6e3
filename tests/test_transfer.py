"""Only live weights on the wire: what the masks drop is neither sent nor returned, the result is
the same as sending the whole supernet, and discrete rounds carry the derived network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from helpers import NodeIds
from test_phases import TINY

from fedmetanas_core.federation.client_round import load_received
from fedmetanas_core.method.aggregation import update_masks
from fedmetanas_core.method.genotype import DiscreteNetwork, derive_genotype
from fedmetanas_core.method.training import run_settings
from fedmetanas_core.method.transfer import live_edges, live_keys
from fedmetanas_core.names import NET_PREFIX, arch_param_name
from fedmetanas_core.run.config import RunConfig
from fedmetanas_core.space import SearchModel, SpaceConfig
from harness.local_grid import LocalGrid
from server_app.app import run_experiment
from server_app.strategy import SearchStrategy, build_base_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity", "single_thread", "skip_run_extras")

SPACE = SpaceConfig(num_classes=10, in_channels=1, init_channels=4, num_cells=2, num_nodes=2)


def _model(seed: int = 0) -> SearchModel:
    torch.manual_seed(seed)
    model = SearchModel(SPACE)
    with torch.no_grad():
        for p in model.arch.parameters():
            p.normal_()
    return model


def _arch(model: SearchModel) -> dict[str, torch.Tensor]:
    return {"arch." + k: v.detach() for k, v in model.arch.state_dict().items()}


def test_live_keys_drop_masked_ops_and_edges_no_kept_pair_reads():
    model = _model()
    names = list(model.state_dict())
    masks = {k: torch.ones_like(v, dtype=torch.bool) for k, v in _arch(model).items()}
    assert live_keys(SPACE, names, {}) == names
    assert live_keys(SPACE, names, masks) == names  # nothing dropped yet
    alpha = arch_param_name("alpha", "normal")
    masks[alpha][0, SPACE.primitives.index("sep_conv_3x3")] = False  # edge 2<-0 loses sep_conv_3x3
    pairs = masks[arch_param_name("beta", "normal", 3)]
    pairs[:] = False
    pairs[SPACE.topology.pairs(3).index((0, 2))] = True  # node 3 keeps inputs (0, 2): edge 3<-1 is dead
    kept = set(live_keys(SPACE, names, masks))
    normal = [i for i, t in enumerate(SPACE.cell_types()) if t == "normal"]
    reduce = [i for i, t in enumerate(SPACE.cell_types()) if t == "reduce"]
    dropped = set(names) - kept
    assert dropped and all(".edges." in k for k in dropped)
    for c in normal:
        assert not any(k.startswith(f"net.cells.{c}.edges.2<-0.ops.sep_conv_3x3.") for k in kept)
        assert any(k.startswith(f"net.cells.{c}.edges.2<-0.ops.sep_conv_5x5.") for k in kept)
        assert not any(k.startswith(f"net.cells.{c}.edges.3<-1.") for k in kept)
        assert any(k.startswith(f"net.cells.{c}.edges.3<-2.") for k in kept)
    for c in reduce:  # the reduction cell's masks are untouched
        assert all(k in kept for k in names if k.startswith(f"net.cells.{c}."))
    assert live_edges(SPACE, masks, "normal")["3<-1"] == []
    assert all(k in kept for k in names if not k.startswith("net.cells."))  # stem, head, logits


def test_discrete_masks_leave_exactly_the_derived_networks_tensors():
    model = _model(3)
    arch = _arch(model)
    masks = update_masks(SPACE, arch, {}, threshold=0.0, tau_min=0.1, discreteness=1.0)
    genotype = derive_genotype(SPACE, arch, masks)
    derived = DiscreteNetwork.inherit(model, genotype)
    net_kept = {k for k in live_keys(SPACE, model.state_dict(), masks) if k.startswith(NET_PREFIX)}
    assert net_kept == {NET_PREFIX + k for k in derived.state_dict()}


def test_client_loads_the_live_part_and_refuses_a_different_key_set():
    model = _model(1)
    arch = _arch(model)
    masks = update_masks(SPACE, arch, {}, threshold=0.0, tau_min=0.1, discreteness=1.0)
    state = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    live = {k: state[k] for k in live_keys(SPACE, state, masks)}
    fresh = _model(2)
    load_received(fresh, live, masks, "live")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in live.items())
    with pytest.raises(ValueError, match="live weights"):
        load_received(_model(2), state, masks, "live")  # the server sent dead ops: server and client disagree
    with pytest.raises(ValueError, match="live weights"):
        load_received(_model(2), live, masks, "full")


def _reply(node: int, state: dict[str, np.ndarray]) -> Message:
    request = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = RecordDict(
        {"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}), "metrics": MetricRecord({"num-examples": 10})}
    )
    return Message(content, reply_to=request)


@pytest.mark.parametrize("strategy", ["FedAdam", "FedAvgM"])
def test_stateful_strategies_follow_the_shrinking_key_set(strategy):
    full = {
        "net.a": np.zeros(3, np.float32),
        "net.b": np.ones(2, np.float32),
        "arch.alpha.normal": np.zeros(4, np.float32),
    }
    cfg = RunConfig.from_flat({"strategy": strategy, "server-momentum": 0.9}, check_paths=False)
    s = SearchStrategy(build_base_strategy(cfg))
    for rnd, keys in enumerate((list(full), ["net.a", "arch.alpha.normal"]), start=1):
        sent = {k: full[k] for k in keys}
        s.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in sent.items()}), ConfigRecord({}), NodeIds([1, 2]))
        arrays, _ = s.aggregate_train(rnd, [_reply(1, {k: v + 0.5 for k, v in sent.items()}), _reply(2, sent)])
        assert arrays is not None and set(arrays.keys()) == set(keys), s.skipped_reason
        full.update({k: v.numpy() for k, v in arrays.items()})


def _run(tmp_path, run_id: int, **flat):
    flat = {
        **TINY,
        "num-server-rounds": 4,
        "warmup-rounds": 1,
        "mask-start-round": 2,
        "discrete-round": 3,
        "tensorboard": False,
        "deterministic": True,
        "results-dir": str(tmp_path / f"run{run_id}"),
        **flat,
    }
    cfg = RunConfig.from_flat(flat)
    with run_settings(cfg):
        out = run_experiment(LocalGrid(run_id, dict(cfg), 3), cfg)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), rows


def test_live_transfer_gives_the_full_transfers_result_and_ships_the_derived_network(tmp_path):
    live, live_rows = _run(tmp_path, 7601, transfer="live")
    full, full_rows = _run(tmp_path, 7602, transfer="full")
    assert live["genotype"] == full["genotype"]
    assert [r["accuracy"] for r in live_rows] == pytest.approx([r["accuracy"] for r in full_rows], abs=1e-6)
    assert live["final_test_accuracy"] == pytest.approx(full["final_test_accuracy"], abs=1e-6)
    assert [r["bytes-sent"] for r in full_rows] == [full_rows[0]["bytes-sent"]] * 4  # the whole supernet, every round
    for rows in (live_rows, full_rows):
        assert all(r["bytes-received"] == r["bytes-sent"] for r in rows)  # replies carry what was sent
    derived_bytes = 4 * live["params"]
    decided = [
        b for a, b in zip(live_rows, live_rows[1:], strict=False) if a["cell-decided"]
    ]  # rounds sent under discrete masks
    assert decided, "the run never reached a discrete cell"
    for r in decided:
        assert r["bytes-sent"] / r["replies"] <= 1.25 * derived_bytes
        assert r["bytes-received"] / r["replies"] <= 1.25 * derived_bytes
    assert live["bytes_sent"] == sum(r["bytes-sent"] for r in live_rows) < full["bytes_sent"]
    assert full_rows[-1]["bytes-sent"] / full_rows[-1]["replies"] > 3 * derived_bytes  # what it saves here


def test_fedavg_sends_its_whole_network(tmp_path):
    summary, rows = _run(tmp_path, 7603, method="fedavg", **{"num-server-rounds": 2})
    per_client = {r["bytes-sent"] / r["replies"] for r in rows}
    assert len(per_client) == 1
    assert per_client.pop() >= 4 * summary["params"]  # parameters plus BatchNorm statistics


@pytest.mark.parametrize("method", ["fedmetanas", "fedavg"])
def test_a_node_reusing_its_network_gets_the_result_of_building_it_every_round(tmp_path, monkeypatch, method):
    """Three clients on one in-process node share its reused network (``client_round.NETWORKS``), and
    under live transfer the ops a mask drops keep the weights an earlier round left: the run must be,
    to the last bit, the one that builds a fresh network every round."""
    import fedmetanas_core.federation.client_round as client_round
    from fedmetanas_core.util.lru import LruCache

    results = {}
    for arm, capacity in (("rebuild", 0), ("reuse", 4)):
        monkeypatch.setattr(client_round, "NETWORKS", LruCache(capacity))
        results[arm] = _run(tmp_path, 7610 + capacity + 10 * (method == "fedavg"), method=method)
        assert (len(client_round.NETWORKS) >= 1) == (capacity > 0)  # training rounds, personalization: one each
    (rebuilt, rebuilt_rows), (reused, reused_rows) = results["rebuild"], results["reuse"]
    assert [r["accuracy"] for r in reused_rows] == [r["accuracy"] for r in rebuilt_rows]
    assert [r["loss"] for r in reused_rows] == [r["loss"] for r in rebuilt_rows]
    assert reused["final_test_accuracy"] == rebuilt["final_test_accuracy"]
    assert reused.get("genotype") == rebuilt.get("genotype")

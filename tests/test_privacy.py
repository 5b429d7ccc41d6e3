"""Differential privacy: Flower's DP wrappers and client mods around the run's strategy, and the
epsilon reported by dp-accounting's RDP accountant.

Whole runs go through the real ServerApp loop and the real ClientApp (``client_app.app.app``, so
the DP mods run) in one process (``harness.local_grid.LocalGrid``); clipping is checked on
constructed messages. docs/privacy.md explains the choices tested here.
"""

from __future__ import annotations

import json
import math
import time
import zlib

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAdam, FedAvg
from helpers import NodeIds

from client_app.privacy import dp_mod
from fedmetanas_core.method.training import run_settings
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.threats.privacy import PrivacyAccountant, effective_noise_multiplier, update_noise_multiplier
from harness.local_grid import LocalGrid
from server_app.app import federation_size, run_experiment
from server_app.privacy import ServerSideAdaptiveClipping, wrap_dp
from server_app.strategy import SearchStrategy, build_base_strategy, load_strategy_state, strategy_state

pytestmark = pytest.mark.usefixtures("flower_task_identity", "single_thread", "skip_run_extras")

TINY = {
    "local-meta-iters": 1,
    "local-epochs": 1,
    "min-available-nodes": 3,
    "min-train-nodes": 3,
    "batch-size": 16,
    "init-channels": 4,
    "num-partitions": 3,
    "train-subset": 240,
    "test-subset": 120,
    "personalize-steps": 1,
    "num-server-rounds": 2,
    "fraction-evaluate": 0.0,
    "tensorboard": False,
    "checkpoint": False,
    "dp-noise-multiplier": 0.5,
    "dp-clipping-norm": 2.0,
}


def _run(tmp_path, name: str, **flat) -> tuple[dict, list[dict]]:
    cfg = RunConfig.from_flat({**TINY, **flat, "results-dir": str(tmp_path / name)})
    with run_settings(cfg):
        run_id = zlib.crc32(name.encode()) % 10**6 + 1000  # the ClientApp caches configs per run id
        out = run_experiment(LocalGrid(run_id, dict(cfg), 3), cfg)
    rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), rows


def _direct_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting called directly: ``rounds`` Gaussian releases, Poisson-subsampled at ``q`` < 1."""
    accountant = RdpAccountant()
    event = dp_event.GaussianDpEvent(z)
    accountant.compose(event if q == 1 else dp_event.PoissonSampledDpEvent(q, event), rounds)
    return accountant.get_epsilon(delta)


# --- the accountant -----------------------------------------------------------------------------


@pytest.mark.parametrize("population, sampled, z, rounds", [(10, 10, 1.1, 7), (100, 10, 0.8, 30), (50, 5, 2.0, 1)])
def test_epsilon_is_the_rdp_accountants_for_the_same_sampling_rate_noise_and_rounds(population, sampled, z, rounds):
    acc = PrivacyAccountant(z, 1e-5, population, sampled)
    assert acc.epsilon() == 0.0
    for _ in range(rounds):
        acc.release()
    assert acc.epsilon() == pytest.approx(_direct_epsilon(z, sampled / population, rounds, 1e-5), rel=1e-12)
    # more noise, less epsilon; local DP (no amplification: the server sees who took part) spends more
    assert PrivacyAccountant(2 * z, 1e-5, population, sampled, releases=rounds).epsilon() < acc.epsilon()
    if sampled < population:
        assert (
            PrivacyAccountant(z, 1e-5, population, sampled, amplified=False, releases=rounds).epsilon() > acc.epsilon()
        )
    assert PrivacyAccountant(0.0, 1e-5, population, sampled, releases=1).epsilon() is None  # no noise: unbounded


def test_adaptive_clipping_accounts_both_gaussians_it_releases():
    """Update noise (Andrew et al.'s calibration, as Flower's) and the clipped-count noise, composed by
    the accountant, equal one Gaussian at the effective multiplier; it is below the configured z."""
    cfg = {"dp": "server-adaptive", "dp-noise-multiplier": 1.5, "dp-clipped-count-stddev": 0.0}
    m = 40  # sigma_b = m / 20 = 2
    z_eff = effective_noise_multiplier(cfg, m)
    both = RdpAccountant()
    both.compose(
        dp_event.ComposedDpEvent(
            [dp_event.GaussianDpEvent(update_noise_multiplier(1.5, 2.0)), dp_event.GaussianDpEvent(2.0)]
        ),
        5,
    )
    assert PrivacyAccountant(z_eff, 1e-5, m, m, releases=5).epsilon() == pytest.approx(both.get_epsilon(1e-5), rel=1e-6)
    assert z_eff < 1.5
    flower = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), 1.5, m)  # the update noise Flower really adds
    assert flower.noise_multiplier == pytest.approx(update_noise_multiplier(1.5, 2.0))


# --- whole runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive", "client-fixed", "client-adaptive", "local"])
def test_a_dp_run_completes_and_reports_epsilon_every_round(tmp_path, mode):
    extra = {"dp-noise-multiplier": 0.2} if "adaptive" in mode else {}  # adaptive: z < 2 x (3 / 20)
    summary, rows = _run(tmp_path, mode, dp=mode, **extra)
    assert [r["aggregated"] for r in rows] == [True, True]
    z = summary["dp"]["effective_noise_multiplier"]
    # every round's epsilon is dp-accounting's for that many releases (all 3 of 3 clients: no sampling)
    assert [r["dp-epsilon"] for r in rows] == pytest.approx(
        [_direct_epsilon(z, 1.0, k, 1e-5) for k in (1, 2)], rel=1e-9
    )
    assert summary["dp_epsilon"] == rows[-1]["dp-epsilon"] and summary["dp"]["releases"] == 2
    assert summary["dp"]["mode"] == mode and math.isfinite(summary["final_test_accuracy"])
    if mode.startswith("client") or mode == "local":  # the replies the server saw were clipped by the clients
        assert max(n for r in rows for n in r["update-norms"]) <= 2.0 * (1 + 1e-5) or mode == "local"
    if "adaptive" in mode:
        assert rows[1]["dp-clipping-norm"] != rows[0]["dp-clipping-norm"]  # the norm adapts


@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_zero_noise_and_a_norm_above_every_update_is_the_run_without_dp(tmp_path, mode):
    # equal partitions (iid, 240 / 3): DP's uniform mean is then FedAvg's sample-weighted mean
    same = {"partitioner": "iid", "method": "fedmetanas"}
    _, plain = _run(tmp_path, "plain", **same)
    summary, dp = _run(
        tmp_path, f"{mode}-zero-noise", dp=mode, **{**same, "dp-noise-multiplier": 0.0, "dp-clipping-norm": 1e6}
    )
    assert max(n for r in plain for n in r["update-norms"]) < 1e6
    assert [r["accuracy"] for r in dp] == [r["accuracy"] for r in plain]
    assert dp[-1]["update-norms"] == pytest.approx(plain[-1]["update-norms"], rel=1e-4)
    assert summary["dp_epsilon"] is None  # no noise, no finite epsilon


# --- clipping, on constructed messages --------------------------------------------------------------


KEYS = ("net.stem.weight", "arch.alpha.normal")  # weights and architecture logits in one reply


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in values.items()})


def _reply(update: dict[str, np.ndarray], node: int = 1, reverse: bool = False) -> Message:
    keys = list(update)[::-1] if reverse else list(update)
    content = RecordDict(
        {"arrays": _arrays({k: update[k] for k in keys}), "metrics": MetricRecord({"num-examples": 10 * node})}
    )
    msg = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def _global() -> dict[str, np.ndarray]:
    return {KEYS[0]: np.zeros((4, 3), np.float32), KEYS[1]: np.zeros((2, 4), np.float32)}


@pytest.mark.parametrize("clip, expected_norm", [(1.0, 1.0), (100.0, 5.0)])
def test_server_side_clipping_bounds_the_whole_update_weights_and_logits_together(clip, expected_norm):
    cfg = RunConfig.from_flat(
        {
            **TINY,
            "dp": "server-fixed",
            "dp-noise-multiplier": 0.0,
            "dp-clipping-norm": clip,
            "min-available-nodes": 1,
            "min-train-nodes": 1,
            "num-partitions": 1,
        }
    )
    strategy = SearchStrategy(wrap_dp(build_base_strategy(cfg), cfg, 1), "logits", 1)
    strategy.configure_train(1, _arrays(_global()), ConfigRecord({}), NodeIds([1, 2]))
    update = {KEYS[0]: np.full((4, 3), 1.0), KEYS[1]: np.full((2, 4), 1.0)}  # norm sqrt(12 + 8)
    update = {k: v * 5.0 / math.sqrt(20) for k, v in update.items()}  # norm 5
    arrays, _ = strategy.aggregate_train(1, [_reply(update, reverse=True)])  # keys in another order than sent
    out = {k: v.numpy() for k, v in arrays.items()}
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values()))
    assert norm == pytest.approx(expected_norm, rel=1e-5)
    for k in KEYS:  # scaled, not reshaped: the direction is kept, logits included
        assert np.allclose(out[k], update[k] * expected_norm / 5.0, atol=1e-6)
    assert strategy.update_norms == [pytest.approx((5.0, math.sqrt(8) * 5.0 / math.sqrt(20)))]


@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive", "local"])
def test_client_mod_clips_an_update_above_the_norm(mode):
    cfg = dict(RunConfig.from_flat({**TINY, "dp": mode, "dp-noise-multiplier": 0.0, "dp-clipping-norm": 2.0}))
    sent = _global()
    config = ConfigRecord({"clipping_norm": 2.0})  # the server's client-side wrappers send it
    msg = Message(
        RecordDict({"arrays": _arrays(sent), "config": config}), dst_node_id=1, message_type=MessageType.TRAIN
    )
    run_id = 991 + ["client-fixed", "client-adaptive", "local"].index(mode)  # the ClientApp caches configs per run
    ctx = Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config=cfg)
    big = {KEYS[1]: np.full((2, 4), 3.0), KEYS[0]: np.full((4, 3), 3.0)}  # norm 3 x sqrt(20), other key order

    def handler(m, c):
        return Message(RecordDict({"arrays": _arrays(big), "metrics": MetricRecord({"num-examples": 5})}), reply_to=m)

    reply = dp_mod(msg, ctx, handler)
    assert not reply.has_error(), reply.error
    out = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert list(out) == list(sent)  # in the sent order
    assert math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in out.values())) == pytest.approx(
        2.0, rel=1e-5
    )
    if mode == "client-adaptive":
        assert reply.content["metrics"]["norm_bit"] == 1  # clipped: the server adapts the norm from it


def test_clients_leave_replies_alone_without_client_side_dp():
    cfg = dict(RunConfig.from_flat({**TINY, "dp": "server-fixed"}))
    msg = Message(
        RecordDict({"arrays": _arrays(_global()), "config": ConfigRecord({})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    ctx = Context(run_id=995, node_id=1, node_config={}, state=RecordDict(), run_config=cfg)
    big = {k: np.full(v.shape, 3.0) for k, v in _global().items()}
    reply = dp_mod(msg, ctx, lambda m, c: Message(RecordDict({"arrays": _arrays(big)}), reply_to=m))
    assert np.allclose(reply.content["arrays"][KEYS[0]].numpy(), 3.0)


def test_adaptive_norm_moves_towards_the_updates_unlike_flowers_own_update():
    """Every update is 10x the norm, so the norm must grow; Flower 1.42's update shrinks it."""

    def after_rounds(cls) -> float:
        strategy = cls(FedAvg(), 0.0, 2, initial_clipping_norm=1.0, clip_norm_lr=0.2, target_clipped_quantile=0.5)
        strategy.current_arrays = _arrays(_global())
        for rnd in range(1, 4):
            big = {k: np.full(v.shape, 10.0) for k, v in _global().items()}
            strategy.aggregate_train(rnd, [_reply(big, 1), _reply(big, 2)])
        return strategy.clipping_norm

    assert after_rounds(ServerSideAdaptiveClipping) == pytest.approx(math.exp(3 * 0.2 * 0.5))
    assert after_rounds(DifferentialPrivacyServerSideAdaptiveClipping) < 1.0


def test_a_reply_short_skips_the_round_under_dp():
    cfg = RunConfig.from_flat({**TINY, "dp": "server-fixed", "num-partitions": 3})
    strategy = SearchStrategy(wrap_dp(build_base_strategy(cfg), cfg, 3), "logits", 1)
    strategy.configure_train(1, _arrays(_global()), ConfigRecord({}), NodeIds([1, 2, 3]))
    arrays, _ = strategy.aggregate_train(1, [_reply(_global(), 1), _reply(_global(), 2)])  # 2 of 3
    assert arrays is None and strategy.skipped_reason.startswith("error: dp:")


def test_dp_strategy_state_survives_a_checkpoint():
    cfg = RunConfig.from_flat({**TINY, "dp": "server-adaptive", "strategy": "FedAdam", "dp-noise-multiplier": 0.2})
    wrapped = wrap_dp(build_base_strategy(cfg), cfg, 3)
    assert isinstance(wrapped.strategy, FedAdam)
    wrapped.clipping_norm = 3.25
    wrapped.strategy.m_t = [np.ones(2)]
    fresh = wrap_dp(build_base_strategy(cfg), cfg, 3)
    load_strategy_state(fresh, strategy_state(wrapped))
    assert fresh.clipping_norm == 3.25 and np.allclose(fresh.strategy.m_t[0], 1.0)


def test_the_server_refuses_a_dp_config_for_the_federation_it_finds(tmp_path):
    """num-partitions unset: the population is the connected nodes (3); adaptive clipping then needs
    z < 2 x 3/20 = 0.3. Refused before any data is loaded."""
    cfg = RunConfig.from_flat(
        {
            **TINY,
            "num-partitions": 0,
            "dp": "client-adaptive",
            "dp-noise-multiplier": 0.5,
            "results-dir": str(tmp_path / "refused"),
        }
    )
    with pytest.raises(ConfigError, match="'dp-noise-multiplier'"):
        run_experiment(LocalGrid(996, dict(cfg), 3), cfg)


class _ArrivingGrid(LocalGrid):
    """``first`` nodes at once, then one more every ``every_s`` seconds, up to ``num_nodes``."""

    def __init__(self, cfg: RunConfig, num_nodes: int, first: int, every_s: float):
        super().__init__(997, dict(cfg), num_nodes)
        self.t0, self.first, self.every_s = time.time(), first, every_s

    def get_node_ids(self) -> list[int]:
        connected = self.first + int((time.time() - self.t0) / self.every_s)
        return list(self.states)[: min(self.num_nodes, connected)]


def test_federation_size_never_returns_fewer_than_min_available_nodes():
    """Issue 27 (6): two nodes for good, min-available-nodes = 3: DP must not take 2 as the
    population; past round-timeout the run stops with an error naming the key."""
    cfg = RunConfig.from_flat({**TINY, "num-partitions": 0, "dp": "server-fixed", "round-timeout": 1.0})
    started = time.time()
    with pytest.raises(ConfigError, match="'min-available-nodes'.*only 2 node"):
        federation_size(_ArrivingGrid(cfg, 2, first=2, every_s=1e9), cfg, settle_s=0.05, limit_s=0.3)
    assert time.time() - started >= 1.0  # it waited round-timeout, not the settle limit


def test_federation_size_waits_for_nodes_that_connect_after_the_settle_limit():
    cfg = RunConfig.from_flat({**TINY, "num-partitions": 0, "dp": "server-fixed", "round-timeout": 30.0})
    assert federation_size(_ArrivingGrid(cfg, 3, first=1, every_s=0.4), cfg, settle_s=0.3, limit_s=0.3) == 3

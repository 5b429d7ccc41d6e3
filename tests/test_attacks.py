"""Attacks do what they claim, and the alpha defence recovers the honest architecture.

Constructed states and real Flower Messages through ``SearchStrategy`` (10 replies, 2 poisoned),
the ClientApp's attack hook, and one tiny run of the real server loop with the real ClientApp in
process (``harness.local_grid.LocalGrid``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from helpers import NodeIds

from fedmetanas_core.method.genotype import derive_genotype
from fedmetanas_core.method.training import run_settings, space_from_config
from fedmetanas_core.names import PRIMITIVES, is_arch
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.space import SearchModel
from fedmetanas_core.threats.attacks import (
    PARAMETER_FREE,
    attacked,
    parameter_free_count,
    parse_attack_clients,
    poison,
    robust_logits,
    screen_replies,
)
from flower_records import array_record
from harness.local_grid import LocalGrid
from server_app.app import Experiment
from server_app.strategy import SearchStrategy, build_base_strategy

pytestmark = pytest.mark.usefixtures("flower_task_identity", "single_thread")

N, ATTACKERS, SCALE = 10, (0, 1), 5.0


@pytest.fixture(scope="module")
def space():
    return space_from_config(RunConfig.from_flat({}), 10, 1)


@pytest.fixture(scope="module")
def global_state(space):
    torch.manual_seed(0)
    return {k: v.detach().numpy().copy() for k, v in SearchModel(space).state_dict().items()}


def _honest(global_state, i: int) -> dict[str, np.ndarray]:
    """Client i's honest trained state: weights moved a little, alphas moved towards sep_conv_3x3,
    betas towards their first input pair."""
    rng = np.random.default_rng(i)
    out = {}
    for k, v in global_state.items():
        step = rng.normal(0, 0.05, v.shape)
        if is_arch(k) and ".alpha." in k:
            step[..., PRIMITIVES.index("sep_conv_3x3")] += 0.5
        elif is_arch(k):  # betas: a clear input pair, so every aggregate of them agrees on it
            step[..., 0] += 0.5
        out[k] = (v + step).astype(v.dtype)
    return out


def _genotype(space, state):
    return derive_genotype(space, {k: torch.from_numpy(v) for k, v in state.items() if is_arch(k)})


def test_sign_flip_reverses_and_scales_the_update_of_every_array(global_state):
    honest = _honest(global_state, 3)
    out = poison("sign-flip", global_state, honest, SCALE)
    assert set(out) == set(honest)
    for k in honest:
        np.testing.assert_allclose(
            out[k] - global_state[k], -SCALE * (honest[k] - global_state[k]), rtol=1e-4, atol=1e-5
        )
    # the wire may carry only some keys: a key the server did not send is left as it is
    sent = {k: v for k, v in list(global_state.items())[:3]}
    partial = poison("sign-flip", sent, honest, SCALE)
    assert all(np.array_equal(partial[k], honest[k]) for k in list(honest)[3:])
    assert not np.allclose(partial[next(iter(sent))], honest[next(iter(sent))])


def test_alpha_poison_keeps_weights_and_favours_parameter_free_ops(space, global_state):
    honest = _honest(global_state, 3)
    out = poison("alpha-poison", global_state, honest, SCALE)
    for k in honest:
        if is_arch(k) and ".alpha." in k:
            shift = out[k] - global_state[k]
            free = [PRIMITIVES.index(p) for p in PARAMETER_FREE]
            others = [i for i in range(len(PRIMITIVES)) if i not in free]
            np.testing.assert_allclose(shift[..., free], SCALE, rtol=1e-5)
            np.testing.assert_allclose(shift[..., others], -SCALE, rtol=1e-5)
        else:  # weights and betas: the honest reply, untouched
            assert np.array_equal(out[k], honest[k]), k
    assert parameter_free_count(_genotype(space, honest).to_dict()) == {"normal": 0, "reduce": 0}
    assert parameter_free_count(_genotype(space, out).to_dict()) == {"normal": 4, "reduce": 4}


def _replies(strategy, global_state, attack: str = "alpha-poison"):
    """Ten real reply Messages to the strategy's own train messages; partitions 0 and 1 poisoned."""
    grid = NodeIds(range(101, 101 + N))
    messages = list(strategy.configure_train(2, array_record(global_state), ConfigRecord({"phase": "search"}), grid))
    assert len(messages) == N
    replies, honest_states = [], []
    for pid, msg in enumerate(messages):
        state = _honest(global_state, pid)
        if pid in ATTACKERS:
            state = poison(attack, global_state, state, SCALE)
        else:
            honest_states.append(state)
        metrics = MetricRecord({"num-examples": 100, "partition-id": pid})
        replies.append(Message(RecordDict({"arrays": array_record(state), "metrics": metrics}), reply_to=msg))
    return replies, honest_states


def _aggregate(base: str, defence: str, global_state, attack: str = "alpha-poison"):
    cfg = RunConfig.from_flat({"strategy": base, "num-malicious-nodes": 2, "min-available-nodes": N})
    strategy = SearchStrategy(build_base_strategy(cfg), "logits", 2, alpha_defence=defence)
    replies, honest = _replies(strategy, global_state, attack)
    attackers = [f"node {r.metadata.src_node_id}" for r in replies[: len(ATTACKERS)]]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    return {k: v.numpy() for k, v in arrays.items()}, honest, strategy, attackers


def test_without_defence_two_poisoned_replies_take_fedavgs_cells_over(space, global_state):
    state, _, _, _ = _aggregate("FedAvg", "none", global_state)
    counts = parameter_free_count(_genotype(space, state).to_dict())
    assert counts["normal"] + counts["reduce"] >= 6, counts


@pytest.mark.parametrize("defence", ["median", "trimmed-mean", "norm-screen"])
@pytest.mark.parametrize("base", ["FedAvg", "Krum", "FedMedian"])  # FedMedian pops the arrays out of the replies
def test_defence_recovers_the_honest_alphas_with_two_of_ten_poisoned(space, global_state, base, defence):
    state, honest, strategy, attackers = _aggregate(base, defence, global_state)
    honest_mean = {k: np.mean([s[k] for s in honest], axis=0) for k in state if is_arch(k)}
    for k, want in honest_mean.items():
        assert np.abs(state[k] - want).max() < 0.05, k  # honest spread: noise sd 0.05; poison: +-5
    assert _genotype(space, state) == _genotype(space, honest_mean)
    assert parameter_free_count(_genotype(space, state).to_dict()) == {"normal": 0, "reduce": 0}
    assert strategy.alpha_screened == (attackers if defence == "norm-screen" else [])
    if base == "FedAvg":  # the weights stay the base strategy's: the mean over all ten replies
        w = next(k for k in state if not is_arch(k))
        everyone = [{k: v.numpy() for k, v in r.content["arrays"].items()} for r in _replies(strategy, global_state)[0]]
        np.testing.assert_allclose(state[w], np.mean([s[w] for s in everyone], axis=0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("attack", ["sign-flip", "alpha-poison"])
@pytest.mark.parametrize("base", ["FedAvg", "FedMedian"])
def test_update_screen_leaves_the_attackers_replies_out_entirely(global_state, base, attack):
    """Weights and logits alike are the base strategy's aggregate of the eight honest replies."""
    state, honest, strategy, attackers = _aggregate(base, "update-screen", global_state, attack)
    assert strategy.alpha_screened == attackers
    combine = (lambda xs: np.mean(xs, axis=0)) if base == "FedAvg" else (lambda xs: np.median(xs, axis=0))
    for k in state:
        np.testing.assert_allclose(state[k], combine([h[k] for h in honest]), rtol=1e-4, atol=1e-5, err_msg=k)


def test_update_screen_keeps_every_honest_reply():
    """Ordinary spread (norms within 3x of the median) is kept; a weight or a logit outlier is not."""
    norms = [(math.hypot(w, a), a) for w, a in [(3.0, 1.0), (2.5, 1.2), (3.6, 0.8), (2.8, 1.1)]]
    assert screen_replies(norms, 3.0) == []
    assert screen_replies([*norms, (math.hypot(15.0, 1.0), 1.0)], 3.0) == [4]  # weights scaled
    assert screen_replies([*norms, (math.hypot(3.0, 9.0), 9.0)], 3.0) == [4]  # logits poisoned


def test_norm_screen_keeps_every_reply_when_no_one_attacks(global_state):
    states = [_honest(global_state, i) for i in range(N)]
    logits, dropped = robust_logits(states, [1.0] * N, global_state, "norm-screen", norm_factor=3.0)
    assert dropped == []
    k = next(iter(logits))
    np.testing.assert_allclose(logits[k], np.mean([s[k] for s in states], axis=0), rtol=1e-5)


def test_client_hook_poisons_only_the_attacking_partitions(global_state):
    cfg = RunConfig.from_flat({"attack": "sign-flip", "attack-clients": "1,3", "attack-scale": 2.0})
    honest = _honest(global_state, 0)
    assert attacked(cfg, 0, global_state, honest) is honest
    out = attacked(cfg, 3, global_state, honest)
    k = next(iter(global_state))
    np.testing.assert_allclose(out[k] - global_state[k], -2.0 * (honest[k] - global_state[k]), rtol=1e-4, atol=1e-6)
    assert attacked(cfg.replace(attack="none", attack_clients=""), 3, global_state, honest) is honest


def test_attack_keys_are_validated():
    assert parse_attack_clients(" 0, 1 ,") == (0, 1)
    for flat, key in [
        ({"attack": "label-flip"}, "attack"),
        ({"attack": "sign-flip"}, "attack-clients"),
        ({"attack-clients": "0;1"}, "attack-clients"),
        ({"attack-clients": "2,2"}, "attack-clients"),
        (
            {"attack": "alpha-poison", "attack-clients": "0,4", "num-partitions": 4, "min-available-nodes": 4},
            "attack-clients",
        ),
        ({"attack-scale": -1.0}, "attack-scale"),
        ({"alpha-defence": "krum"}, "alpha-defence"),
        ({"alpha-screen-factor": 0.9}, "alpha-screen-factor"),
    ]:
        with pytest.raises(ConfigError) as err:
            RunConfig.from_flat(flat)
        assert err.value.key == key, flat


TINY = {
    "num-server-rounds": 1,
    "local-meta-iters": 1,
    "batch-size": 16,
    "init-channels": 4,
    "num-partitions": 4,
    "min-available-nodes": 4,
    "train-subset": 240,
    "test-subset": 120,
    "personalize-steps": 1,
    "fraction-evaluate": 0.0,
    "attack": "alpha-poison",
    "attack-clients": "0",
    "attack-scale": 5.0,
    "checkpoint": False,
}


@pytest.mark.parametrize("defence", ["none", "median"])
def test_a_real_run_with_one_alpha_poisoner(tmp_path, defence):
    """The real server round (``Experiment.run_phase``) and ClientApp. Round 1 is the warm-up (honest
    alphas frozen), so FedAvg's logits move only by the poisoner's share; the median of 3 unchanged
    and 1 poisoned reply is the unchanged logits."""
    cfg = RunConfig.from_flat({**TINY, "alpha-defence": defence, "results-dir": str(tmp_path)})
    with run_settings(cfg, 1):  # the phase's round only: export and figures are not under test
        exp = Experiment(LocalGrid(8800 + len(defence), dict(cfg), 4), cfg)
        exp.run_phase(0, exp.phases[0])
    (row,) = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    torch.manual_seed(0)
    from fedmetanas_core.federation.coordinator import seeded_init

    space = space_from_config(cfg, 10, 1)
    init = seeded_init(lambda: SearchModel(space), cfg.seed, "search").arch.state_dict()["alpha.normal"].numpy()
    got = np.array(row["alpha-logits"]["normal"])
    free = [PRIMITIVES.index(p) for p in PARAMETER_FREE]
    shift = (got - init)[..., free]
    if defence == "none":
        assert shift.min() > 0.5, "the poisoner's share (about a quarter of +5) reached the logits"
    else:
        np.testing.assert_allclose(got, init, atol=1e-3)

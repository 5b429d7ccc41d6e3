"""Device tiers (issue 28): width slices share weights exactly, tiers and clients pair up as declared.

The slice test is the one that would break if the shared weights meant different things to
different tiers: a narrow network must compute the same logits as the wide one holding its weights
with every other channel zeroed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedmetanas_core.method.genotype import DiscreteNetwork, Genotype, SimpleCNN
from fedmetanas_core.method.tiers import (
    assign_partitions,
    declared_budget,
    parse_tiers,
    tier_for_budget,
)
from fedmetanas_core.method.training import state_arrays
from fedmetanas_core.method.width_slices import aggregate_slices, channel_index, narrow_state, slice_indices
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.run.config_keys import parse_tier_shares
from fedmetanas_core.run.node_config import validate_node_config
from fedmetanas_core.space import SearchModel, SpaceConfig
from fedmetanas_core.space.model import RelaxSettings

SPACE = SpaceConfig(num_classes=10, in_channels=1, init_channels=6, num_cells=3, num_nodes=2)
GENOTYPE = Genotype(
    normal=((("sep_conv_3x3", 0), ("dil_conv_5x5", 1)), (("skip_connect", 0), ("avg_pool_3x3", 2))),
    reduce=((("max_pool_3x3", 0), ("skip_connect", 1)), (("sep_conv_5x5", 2), ("dil_conv_3x3", 0))),
)


def embedded(narrow: torch.nn.Module, wide: torch.nn.Module, width: int, wide_width: int) -> None:
    """Put ``narrow``'s tensors at their slice of ``wide`` and zero everything else."""
    state = {}
    for key, value in wide.state_dict().items():
        out = torch.zeros_like(value)
        part = narrow.state_dict()[key]
        if value.ndim == 0:
            out = part.clone()
        else:
            out[slice_indices(tuple(part.shape), tuple(value.shape), width, wide_width)] = part
        state[key] = out
    wide.load_state_dict(state)


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


@pytest.mark.parametrize("reductions", [None, (0, 1, 2)])
def test_narrow_network_is_the_wide_one_with_the_other_channels_zeroed(reductions):
    small, large = (
        replace(SPACE, init_channels=2, reduction_positions=reductions),
        replace(SPACE, reduction_positions=reductions),
    )
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for build in (lambda s: DiscreteNetwork(s, GENOTYPE), lambda s: SimpleCNN(s)):
        narrow, wide = randomised(build(small), 1).eval(), randomised(build(large), 2).eval()
        embedded(narrow, wide, width_of(narrow), width_of(wide))
        torch.testing.assert_close(wide(x), narrow(x), rtol=1e-5, atol=1e-5)
        # and narrow_state cuts exactly those tensors back out
        shapes = {k: tuple(v.shape) for k, v in narrow.state_dict().items()}
        back = narrow_state(state_arrays(wide), shapes, width_of(narrow), width_of(wide))
        for key, value in state_arrays(narrow).items():
            np.testing.assert_array_equal(back[key], value)


def width_of(net) -> int:
    return net.channels if isinstance(net, SimpleCNN) else net.space.init_channels


def test_supernet_slice_computes_the_narrow_supernet():
    small, large = replace(SPACE, init_channels=3), SPACE
    narrow, wide = randomised(SearchModel(small), 3).eval(), randomised(SearchModel(large), 4).eval()
    wide.arch.load_state_dict(narrow.arch.state_dict())
    embedded(narrow.net, wide.net, 3, 6)
    settings = RelaxSettings(tau=1.0, mode="softmax", noise=False, threshold=0.0)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(wide(x, settings), narrow(x, settings), rtol=1e-5, atol=1e-5)


def test_channel_index_refuses_what_is_not_a_slice():
    assert channel_index(4, 12, 2, 6).tolist() == [0, 1, 6, 7]
    assert channel_index(10, 10, 2, 6).tolist() == list(range(10))  # classes: whole
    with pytest.raises(ValueError, match="not a slice"):
        channel_index(5, 12, 2, 6)


def test_each_element_is_averaged_over_the_clients_that_trained_it():
    wide = {"w": np.zeros((4, 4), np.float32), "n": np.array(7, np.int64), "untouched": np.ones(3, np.float32)}
    narrow_reply = {"w": np.full((2, 2), 1.0, np.float32), "n": np.array(1, np.int64)}
    wide_reply = {"w": np.full((4, 4), 4.0, np.float32), "n": np.array(3, np.int64)}
    out = aggregate_slices(wide, [(narrow_reply, 1, 1.0), (wide_reply, 2, 3.0)], 2)
    # the narrow client (width 1 of 2) trained rows/cols {0, 2}: (1*1 + 3*4) / 4 there, 4 elsewhere
    expected = np.full((4, 4), 4.0)
    expected[np.ix_([0, 2], [0, 2])] = 13 / 4
    np.testing.assert_allclose(out["w"], expected)
    assert out["n"] == 2 and out["n"].dtype == np.int64
    np.testing.assert_array_equal(out["untouched"], wide["untouched"])


def test_tiers_and_shares():
    tiers = parse_tiers("macs:160000,macs:20000")
    assert [t.name for t in tiers] == ["macs-20000", "macs-160000"] and tiers[1].budget == "macs:160000"
    assert tier_for_budget(tiers, "macs", 100_000) == tiers[0]
    assert tier_for_budget(tiers, "macs", 160_000) == tiers[1]
    assert tier_for_budget(tiers, "macs", 19_999) is None
    assert tier_for_budget(tiers, "params", 1e9) is None
    shares = parse_tier_shares("1,3", 2)
    assignment = assign_partitions(10, shares, seed=0)
    assert assignment == assign_partitions(10, shares, seed=0) != assign_partitions(10, shares, seed=1)
    assert sorted(assignment).count(0) == 2 or sorted(assignment).count(0) == 3  # 2.5 rounds to 2 or 3
    assert sum(assignment) + assignment.count(0) == 10
    assert assign_partitions(3, parse_tier_shares("", 3), 0).count(2) == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("macs:20000", "one tier"),
        ("macs:20000,params:1000", "same kind"),
        ("latency-ms:2,latency-ms:5", "macs or params"),
        ("macs:20000,macs:20000", "must differ"),
        ("macs:-1,macs:2", "> 0"),
    ],
)
def test_bad_tiers_name_the_key(text, message):
    with pytest.raises(ConfigError, match=rf"'tiers'.*{message}"):
        RunConfig.from_flat({"tiers": text, "init-channels": 0}, check_paths=False)


@pytest.mark.parametrize(
    "extra, key",
    [
        ({"method": "fednas"}, "tiers"),
        ({"strategy": "FedMedian"}, "strategy"),
        ({"tier-shares": "1,2,3"}, "tier-shares"),
        ({"tier-shares": "1,x"}, "tier-shares"),
        ({"only-tier": 2}, "only-tier"),
        ({"budget": "params:500"}, "budget"),
    ],
)
def test_tier_settings_that_cannot_work_name_their_key(extra, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        RunConfig.from_flat({"tiers": "macs:20000,macs:160000", "init-channels": 0, **extra}, check_paths=False)


def test_tier_keys_without_tiers_are_refused():
    with pytest.raises(ConfigError, match="'only-tier'.*only with tiers"):
        RunConfig.from_flat({"only-tier": 0}, check_paths=False)


def test_node_budget_is_validated_and_read():
    assert declared_budget(validate_node_config({"budget-macs": "20000"})) == ("macs", 20000.0)
    assert declared_budget(validate_node_config({"partition-id": 0, "num-partitions": 2})) is None
    for bad in ("abc", 0, -5, "inf", True):
        with pytest.raises(ConfigError, match="node-config 'budget-macs'.*> 0"):
            validate_node_config({"budget-macs": bad})
    with pytest.raises(ConfigError, match="one budget"):
        validate_node_config({"budget-macs": 1, "budget-params": 2})
    with pytest.raises(ConfigError, match="did you mean 'budget-macs'"):
        validate_node_config({"budget_macs": 1})


@pytest.mark.parametrize("method", ["fedmetanas", "fedavg"])
def test_a_tier_nothing_fits_is_refused_up_front_naming_tiers(method):
    from harness.cli import check_budget_up_front

    cfg = RunConfig.from_flat(
        {"dataset": "digits", "method": method, "tiers": "macs:300,macs:160000", "init-channels": 0},
        check_paths=False,
    )
    with pytest.raises(ConfigError, match=r"run-config 'tiers'.*tier macs:300: .*fits"):
        check_budget_up_front(cfg)
    check_budget_up_front(cfg.replace(tiers="macs:20000,macs:160000"))  # both fit: no error


@pytest.mark.parametrize("train_smaller", [True, False])
def test_larger_clients_train_the_smaller_tiers_slice_but_never_its_architecture(digits_test, train_smaller):
    from fedmetanas_core.federation.phases import Handoff
    from fedmetanas_core.federation.tiered import tier_prefix, tiered_phases

    flat = {"dataset": "digits", "tiers": "macs:20000,macs:60000", "init-channels": 0, "reduction-cells": "0,1"}
    cfg = RunConfig.from_flat({**flat, "train-smaller-tiers": train_smaller}, check_paths=False)
    (phase,) = tiered_phases(cfg, digits_test, torch.device("cpu"))
    phase.start(Handoff())
    assert phase.widths[0] < phase.widths[1]
    state = phase.initial_state()
    config, arrays = phase.tier_round(1, 1, state)  # what a large-tier client gets
    assert any(k.startswith("sub0/") for k in arrays) is train_smaller
    assert config.get("sub0/alpha-frozen") is (True if train_smaller else None)
    # its reply: its own network moved by +1, the small tier's by +10 (architecture included)
    reply = {k: v + (10 if k.startswith("sub0/") else 1) for k, v in arrays.items()}
    out = phase.aggregate(state, [(1, reply, 1.0)])
    stem = "net.stem.0.weight"
    small_before, small_after = phase.tier_state(0, state), phase.tier_state(0, out)
    # the small slice: the mean of the two networks that trained it, or the large one's alone
    np.testing.assert_allclose(small_after[stem], small_before[stem] + (5.5 if train_smaller else 1.0), rtol=1e-6)
    wide_only = np.ones_like(out[stem], dtype=bool)
    wide_only[slice_indices(small_before[stem].shape, out[stem].shape, phase.widths[0], phase.wide_width)] = False
    np.testing.assert_allclose(out[stem][wide_only], state[stem][wide_only] + 1.0, rtol=1e-6)
    for key in (k for k in state if k.startswith(tier_prefix(0))):  # tier 0's own clients move it, no one else
        np.testing.assert_array_equal(out[key], state[key])
    for key in (k for k in state if k.startswith(tier_prefix(1))):
        np.testing.assert_allclose(out[key], state[key] + 1.0, rtol=1e-6)


def test_a_clients_tier_comes_from_its_budget_then_its_partition_then_the_run():
    from fedmetanas_core.method.tiers import client_tier

    tiers = parse_tiers("macs:20000,macs:160000")
    shares = [0.5, 0.5]
    split = assign_partitions(4, shares, 3)
    # a declared budget wins over the partition's share
    tier, why = client_tier(tiers, ("macs", 500_000), 0, 4, shares, 3, None)
    assert tier == tiers[1] and "budget-macs=500000" in why
    tier, why = client_tier(tiers, ("macs", 100), 0, 4, shares, 3, None)
    assert tier is None and "no tier fits" in why
    assert client_tier(tiers, ("params", 1e9), 0, 4, shares, 3, None)[0] is None  # another kind
    # simulation: the partition's share
    assert [client_tier(tiers, None, p, 4, shares, 3, None)[0].index for p in range(4)] == split
    # neither: the run's budget, else the smallest tier
    assert client_tier(tiers, None, None, None, shares, 3, ("macs", 200_000))[0] == tiers[1]
    assert client_tier(tiers, None, None, None, shares, 3, ("macs", 1_000))[0] is None
    assert client_tier(tiers, None, None, None, shares, 3, None)[0] == tiers[0]


def test_the_benchmark_scores_one_network_for_all_on_each_tiers_own_clients():
    from benchmarks.tiers import tier_rows

    tiers = parse_tiers("macs:20000,macs:160000")
    split = [0, 1, 0, 1]  # partition -> tier
    clients = [
        {"partition-id": p, "num-examples": n, "accuracy-before": a, "accuracy-after": a + 0.05}
        for p, n, a in ((0, 10, 0.9), (1, 30, 0.5), (2, 30, 0.7), (3, 10, 0.1))
    ]
    summary = {
        "final_test_accuracy": 0.8,
        "personalized_per_client": clients,
        "cost": {"macs": 15000.0, "latency_ms": 0.1},
        "params": 1000,
    }
    rows = tier_rows(summary, tiers, split)
    assert rows["macs-20000"]["local_test_accuracy"] == pytest.approx((10 * 0.9 + 30 * 0.7) / 40)
    assert rows["macs-160000"]["local_test_accuracy"] == pytest.approx((30 * 0.5 + 10 * 0.1) / 40)
    assert rows["macs-160000"]["personalized_accuracy"] == pytest.approx((30 * 0.55 + 10 * 0.15) / 40)
    assert rows["macs-20000"]["final_test_accuracy"] == rows["macs-160000"]["final_test_accuracy"] == 0.8
    assert rows["macs-20000"]["within_budget"] and rows["macs-160000"]["within_budget"]
    tiered = {"tiers": [{"tier": "macs-20000", "x": 1}, {"tier": "macs-160000", "x": 2}]}
    assert tier_rows(tiered, tiers, split)["macs-160000"] == {"tier": "macs-160000", "x": 2}


def test_an_op_a_reply_lacks_is_averaged_over_the_replies_that_have_it(digits_test):
    """Live transfer: a tier whose masks pruned an op neither gets nor returns its weights; the op's
    slice is then averaged over the networks that still trained it."""
    from fedmetanas_core.federation.phases import Handoff
    from fedmetanas_core.federation.tiered import tiered_phases

    flat = {"dataset": "digits", "tiers": "macs:20000,macs:60000", "init-channels": 0, "reduction-cells": "0,1"}
    (phase,) = tiered_phases(RunConfig.from_flat(flat, check_paths=False), digits_test, torch.device("cpu"))
    phase.start(Handoff())
    state = phase.initial_state()
    _, small = phase.tier_round(0, 1, state)
    _, large = phase.tier_round(1, 1, state)
    pruned = next(k for k in small if "sep_conv_3x3" in k)
    small_reply = {k: v + 2 for k, v in small.items() if k != pruned}  # as if tier 0 had pruned the op
    large_reply = {k: v + (4 if k.startswith("sub0/") else 8) for k, v in large.items()}
    out = phase.aggregate(state, [(0, small_reply, 1.0), (1, large_reply, 1.0)])
    before, after = phase.tier_state(0, state), phase.tier_state(0, out)
    stem = "net.stem.0.weight"
    np.testing.assert_allclose(after[stem], before[stem] + (2 + 4 + 8) / 3, rtol=1e-6)  # three networks
    np.testing.assert_allclose(after[pruned], before[pruned] + (4 + 8) / 2, rtol=1e-6)  # two had the op


def test_a_cnn_tier_nothing_fits_is_named_with_the_runs_tiers_at_the_servers_start(digits_test):
    """The ServerApp's own check (a run started with plain `flwr run` skips the CLI's): the error
    quotes the run's tiers, not the empty value a tier's own config holds."""
    from fedmetanas_core.federation.phases import Handoff
    from fedmetanas_core.federation.tiered import tiered_phases

    flat = {"dataset": "digits", "method": "fedavg", "tiers": "macs:300,macs:160000", "init-channels": 0}
    (phase,) = tiered_phases(RunConfig.from_flat(flat, check_paths=False), digits_test, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"'tiers' = 'macs:300,macs:160000'.*tier macs:300: .*fits"):
        phase.start(Handoff())


def test_each_tiers_clients_search_with_their_tiers_cost_term(digits_test):
    """The run's own budget is empty here (it may also be the smallest tier's): a client must pull
    its expected cost to its tier's budget, which the server sends with the tier's cost model;
    reading the run's would leave the tiers without a cost term (or give every tier the smallest's)."""
    from fedmetanas_core.federation.coordinator import plan_from_config
    from fedmetanas_core.federation.phases import Handoff
    from fedmetanas_core.federation.tiered import tiered_phases
    from fedmetanas_core.method.training import cost_penalty
    from fedmetanas_core.names import is_arch

    flat = {"dataset": "digits", "tiers": "macs:20000,macs:60000", "init-channels": 0, "reduction-cells": "0,1"}
    cfg = RunConfig.from_flat(flat, check_paths=False)
    assert cfg.budget == ""
    (phase,) = tiered_phases(cfg, digits_test, torch.device("cpu"))
    phase.start(Handoff())
    state = phase.initial_state()
    for i, limit in enumerate((20000.0, 60000.0)):
        config, arrays = phase.tier_round(i, 1, state)  # what tier i's client gets
        tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
        plan = plan_from_config(config, {k: v.shape for k, v in tensors.items()})
        penalty = cost_penalty(cfg, plan)
        assert penalty is not None
        arch = {k: v for k, v in tensors.items() if is_arch(k)}
        expected = float(plan.cost.expected_cost(arch, plan.masks))
        assert float(penalty(arch)) == pytest.approx(abs(expected / limit - 1.0))

"""Distillation across device tiers (``tier-distill``): the targets, the teacher, the config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import arch_state, mask_space, randomize_arch

from fedmetanas_core.data import ClientData, ImageData
from fedmetanas_core.method.aggregation import update_masks
from fedmetanas_core.method.genotype import DiscreteNetwork, derive_genotype
from fedmetanas_core.method.tier_distill import deployed_forward, distilled, soft_targets
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.space import SearchModel

CPU = torch.device("cpu")


def images(n: int = 12, classes: int = 4, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    return ImageData(x, torch.randint(0, classes, (n,), generator=g), tuple(str(c) for c in range(classes)))


def linear_teacher(classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, classes))


def test_cross_entropy_on_the_targets_is_the_label_loss_plus_weight_times_the_teachers():
    data, teacher, weight = images(), linear_teacher(), 0.3
    soft = soft_targets(teacher, data, weight, batch_size=5, device=CPU)  # batches of 5, 5 and 2
    torch.testing.assert_close(soft.y.sum(1), torch.ones(len(data)))
    student = torch.randn(len(data), 4)
    with torch.no_grad():
        teacher_probs = F.softmax(teacher(data.x), dim=1)
    want = (1 - weight) * F.cross_entropy(student, data.y) + weight * F.cross_entropy(student, teacher_probs)
    torch.testing.assert_close(F.cross_entropy(student, soft.y), want)
    torch.testing.assert_close(soft_targets(teacher, data, 0.0, 5, CPU).y, F.one_hot(data.y, 4).float())


def test_only_the_training_splits_get_the_teachers_targets():
    client = ClientData(images(seed=0), images(seed=1), images(seed=2), partition_id=3)
    out = distilled(client, linear_teacher(), 0.5, 4, CPU)
    assert out.train.y.ndim == out.query.y.ndim == 2 and out.pool.y.shape == (24, 4)
    torch.testing.assert_close(out.query.y, soft_targets(linear_teacher(), client.query, 0.5, 4, CPU).y)
    one = ClientData(images(seed=0), images(n=1, seed=1), images(seed=2), partition_id=0)  # a 1-example split
    assert distilled(one, linear_teacher(), 0.5, 4, CPU).query.y.shape == (1, 4)
    assert out.test is client.test and out.partition_id == 3
    torch.testing.assert_close(out.train.x, client.train.x)


def test_the_teacher_is_the_tiers_deployed_network_once_its_cell_is_decided():
    model = SearchModel(mask_space())
    randomize_arch(model, scale=1.0, seed=8)
    assert deployed_forward(model, {}) is None  # undecided: no deployed network yet
    masks = update_masks(model.space, arch_state(model), {}, threshold=0.0, tau_min=0.1, discreteness=1.0)
    teacher = deployed_forward(model, masks)
    assert isinstance(teacher, DiscreteNetwork)
    x = torch.randn(6, model.space.in_channels, 8, 8)
    want = DiscreteNetwork.inherit(model, derive_genotype(model.space, arch_state(model), masks))
    torch.testing.assert_close(teacher(x), want(x))
    cnn = linear_teacher()
    assert deployed_forward(cnn, {}) is cnn  # a fixed network is deployed as it is


def test_bad_tier_distill_names_the_key():
    tiers = {"tiers": "macs:20000,macs:160000", "init-channels": 0}
    RunConfig.from_flat({**tiers, "tier-distill": 0.5}, check_paths=False)
    for flat, message in (
        ({"tier-distill": 0.5}, "only with tiers"),
        ({**tiers, "tier-distill": 0.5, "train-smaller-tiers": False}, "needs train-smaller-tiers"),
        ({**tiers, "tier-distill": 1.5}, ""),
        ({**tiers, "tier-distill": -0.1}, ""),
    ):
        with pytest.raises(ConfigError, match=f"'tier-distill'.*{message}"):
            RunConfig.from_flat(flat, check_paths=False)


def started_tiers(digits_test, **flat):
    """A digits run with two tiers, one meta-step a round, its tiered phase started: a large-tier
    client's round is ``phase.tier_round(1, 5, ...)``."""
    from fedmetanas_core.federation.phases import Handoff
    from fedmetanas_core.federation.tiered import tiered_phases

    base = {"dataset": "digits", "reduction-cells": "0,1", "local-meta-iters": 1, "tasks-per-meta-batch": 1}
    cfg = RunConfig.from_flat({**base, "num-partitions": 4, **flat}, check_paths=False)
    (phase,) = tiered_phases(cfg, digits_test, CPU)
    phase.start(Handoff())
    return cfg, phase


def decide_small_tier(phase) -> None:
    small = phase.phases[0]
    small.masks = update_masks(small.model.space, small.arch_state(), {}, 0.0, 0.1, discreteness=1.0)


def large_tier_reply(cfg, config, arrays) -> dict:
    """Partition 1's reply (a large-tier client) to the round ``config`` / ``arrays``."""
    import numpy as np

    from fedmetanas_core.federation.client_round import train_round
    from fedmetanas_core.federation.coordinator import plan_from_config

    tensors = {k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()}
    plan = plan_from_config(config, {k: v.shape for k, v in tensors.items()})
    return train_round(cfg, config, tensors, plan, {"partition-id": 1}, 1)[0]


def test_a_large_tier_client_learns_from_the_small_tiers_network_once_its_cell_is_decided(digits_test):
    """Bit for bit the same round without a deployed small network; once the small tier's cell is
    decided, the large tier's own network trains differently and the small one it also trains does not."""
    import numpy as np

    cfg, phase = started_tiers(digits_test, **{"tiers": "macs:20000,macs:60000", "init-channels": 0})
    replies = {}
    for decided in (False, True):
        if decided:
            decide_small_tier(phase)
        config, arrays = phase.tier_round(1, 5, phase.initial_state())  # a large-tier client's round
        for distill in (0.0, 0.5):
            replies[distill, decided] = large_tier_reply(cfg.replace(tier_distill=distill), config, arrays)
    for decided in (False, True):
        plain, taught = replies[0.0, decided], replies[0.5, decided]
        own = [k for k in plain if not k.startswith("sub0/")]
        assert any(not np.array_equal(plain[k], taught[k]) for k in own) is decided
        for key in (k for k in plain if k.startswith("sub0/")):  # the small network learns from labels only
            np.testing.assert_array_equal(plain[key], taught[key])


def test_the_teacher_never_overwrites_the_nodes_own_network_when_tiers_share_a_width(digits_test, monkeypatch):
    """Tiers of one width reuse one network per node (``client_round.NETWORKS``): a large-tier
    client's reply with reuse equals the one with every network built afresh, though the small
    tier's alphas differ from its own."""
    import numpy as np

    from fedmetanas_core.federation import client_round
    from fedmetanas_core.util.lru import LruCache

    # both tiers within reach of the run's width (8)
    cfg, phase = started_tiers(digits_test, **{"tiers": "macs:120000,macs:240000", "tier-distill": 0.5})
    assert phase.widths[0] == phase.widths[1]
    decide_small_tier(phase)
    config, arrays = phase.tier_round(1, 5, phase.initial_state())  # a large-tier client's round
    rng = np.random.default_rng(0)
    arrays = {
        k: v + rng.normal(0, 1, v.shape).astype(v.dtype) if k.startswith("sub0/arch.") else v for k, v in arrays.items()
    }
    replies = []
    for capacity in (4, 0):
        monkeypatch.setattr(client_round, "NETWORKS", LruCache(capacity))
        replies.append(large_tier_reply(cfg, config, arrays))
    for key in replies[1]:
        np.testing.assert_array_equal(replies[0][key], replies[1][key], err_msg=key)

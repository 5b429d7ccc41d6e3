"""Soft pruning masks: pruned by probability, monotone, never without a real op, capped by the
discreteness budget until the supernet is the derived network by the discrete round."""

from __future__ import annotations

import pytest
import torch
from helpers import arch_state, mask_space, randomize_arch, tiny_space, x_batch

from fedmetanas_core.method.aggregation import arch_statistics, keep_budget, update_masks
from fedmetanas_core.method.genotype import DiscreteNetwork, derive_genotype
from fedmetanas_core.method.training import space_from_config
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.space import RelaxSettings, SearchModel
from fedmetanas_core.space.relaxation import probabilities

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


# --- masks ------------------------------------------------------------------------------------


def test_update_masks_prunes_low_probability_entries_and_keeps_the_best():
    space = mask_space()
    E = len(space.topology.edges)
    a = torch.zeros(E, 4)
    a[0] = torch.tensor([0.0, 0.1, 0.0, -1.0])  # at tau 0.1: op 3 prob ~ e^-11 -> pruned
    a[1] = torch.tensor([5.0, 0.0, -0.1, -0.3])  # none dominates: best real op (1) is kept
    b = torch.tensor([2.0, 0.0, -0.5])
    arch = {"arch.alpha.normal": a, "arch.alpha.reduce": a.clone(), "arch.beta.normal-3": b}
    m = update_masks(space, arch, {}, threshold=0.01, tau_min=0.1)
    probs = probabilities(a, tau=0.1)
    want = probs >= 0.01
    want[torch.arange(E), 1 + probs[:, 1:].argmax(-1)] = True
    assert torch.equal(m["arch.alpha.normal"], want)
    assert not m["arch.alpha.normal"][0, 3]
    assert m["arch.alpha.normal"][1, 1]
    assert torch.equal(m["arch.beta.normal-3"], torch.tensor([True, False, False]))
    assert m["arch.alpha.normal"].dtype == torch.bool
    # threshold 0: nothing ever masked
    m0 = update_masks(space, arch, {}, threshold=0.0, tau_min=0.1)
    assert all(bool(v.all()) for v in m0.values())


def test_update_masks_is_monotone():
    space = mask_space()
    E = len(space.topology.edges)
    a = torch.zeros(E, 4)
    a[:, 3] = -2.0
    m1 = update_masks(space, {"arch.alpha.normal": a}, {}, 0.01, 0.1)
    assert not m1["arch.alpha.normal"][:, 3].any()
    a2 = a.clone()
    a2[:, 3] = 3.0  # the pruned op's logit rises above all others
    m2 = update_masks(space, {"arch.alpha.normal": a2}, m1, 0.01, 0.1)
    assert not m2["arch.alpha.normal"][:, 3].any(), "a pruned entry must stay pruned"
    assert torch.all(m2["arch.alpha.normal"] <= m1["arch.alpha.normal"])
    assert m1["arch.alpha.normal"] is not m2["arch.alpha.normal"]


def test_update_masks_random_rounds_monotone_and_well_formed():
    space = mask_space()
    model = SearchModel(space)
    masks = {}
    g = torch.Generator().manual_seed(0)
    none = 0
    for _ in range(6):
        arch = {k: 3 * torch.randn(v.shape, generator=g) for k, v in arch_state(model).items()}
        new = update_masks(space, arch, masks, 0.05, 0.3)
        for k, m in new.items():
            if k in masks:
                assert torch.all(m <= masks[k])
            if ".alpha." in k:
                real = m.clone()
                real[:, none] = False
                assert torch.all(real.any(-1))
            else:
                assert m.any()
        masks = new
    stats = arch_statistics(space, {k: torch.randn(v.shape) for k, v in arch_state(model).items()}, masks, 1.0)
    assert 0 <= stats["pruned-fraction"] <= 1


def test_update_masks_guard_survives_probability_underflow():
    space = mask_space()
    E = len(space.topology.edges)
    a = torch.zeros(E, 4)
    a[0] = torch.tensor([20.0, 0.0, 1.0, -1.0])  # at tau 0.1 every real op's prob underflows to 0
    old = torch.ones(E, 4, dtype=torch.bool)
    old[0, 1] = False  # op 1 was pruned in an earlier round
    m = update_masks(space, {"arch.alpha.normal": a}, {"arch.alpha.normal": old}, 0.01, 0.1)["arch.alpha.normal"]
    assert not m[0, 1], "monotone: a pruned op must not come back"
    assert m[0, 2], "the best real op (largest real logit) must never be masked"


def test_keep_budget_goes_linearly_from_all_entries_to_one():
    assert [keep_budget(8, d) for d in (0.0, 0.25, 0.5, 0.75, 1.0)] == [8, 7, 5, 3, 1]
    assert keep_budget(1, 0.5) == 1 and keep_budget(3, 1.0) == 1 and keep_budget(3, -1.0) == 3


def test_discreteness_caps_each_row_to_the_best_real_op_plus_next_logits():
    space = tiny_space(input_pruning=True)
    model = SearchModel(space)
    randomize_arch(model, scale=2.0, seed=4)
    arch = arch_state(model)
    none = space.primitives.index("none")
    half = update_masks(space, arch, {}, threshold=0.0, tau_min=0.1, discreteness=0.5)
    for name, m in half.items():
        n = m.shape[-1]
        assert torch.all(m.sum(-1) == keep_budget(n, 0.5)), name
        if ".alpha." in name:  # the kept entries are the best real op and the largest other logits
            real = arch[name].clone()
            real[..., none] = float("-inf")
            assert torch.all(m.gather(-1, real.argmax(-1, keepdim=True)))
    one = update_masks(space, arch, half, threshold=0.01, tau_min=0.1, discreteness=1.0)
    for name, m in one.items():
        assert torch.all(m.sum(-1) == 1), name
        assert torch.all(m <= half[name]), "monotone"
        if ".alpha." in name:
            assert not m[..., none].any(), "the last op of an edge is a real op, never 'none'"


def test_discrete_supernet_is_the_derived_network():
    """Once soft pruning is complete the relaxed supernet (Gumbel noise and all) computes the derived cell."""
    space = tiny_space(input_pruning=True)
    model = SearchModel(space)
    randomize_arch(model, scale=1.0, seed=8)
    masks = update_masks(space, arch_state(model), {}, threshold=0.0, tau_min=0.1, discreteness=1.0)
    net = DiscreteNetwork.inherit(model, derive_genotype(space, arch_state(model), masks))
    x = x_batch()
    with torch.no_grad():
        noisy = model(
            x,
            RelaxSettings(tau=0.7, mode="gumbel-soft", noise=True, threshold=0.01),
            masks,
            torch.Generator().manual_seed(0),
        )
        torch.testing.assert_close(noisy, net(x), rtol=1e-5, atol=1e-5)


# --- the discrete round -----------------------------------------------------------------------


def test_discrete_round_anneals_and_prunes_by_that_round():
    from fedmetanas_core.data import ImageData
    from fedmetanas_core.federation.phases import Handoff, SearchPhase

    cfg = RunConfig.from_flat(
        {
            "num-server-rounds": 10,
            "warmup-rounds": 2,
            "discrete-round": 6,
            "num-cells": 3,
            "num-nodes": 2,
            "init-channels": 4,
        },
        check_paths=False,
    )
    test = ImageData(torch.randn(4, 3, 8, 8), torch.arange(4) % 2, ("a", "b"))
    phase = SearchPhase(cfg, space_from_config(cfg, 2, 3), test, torch.device("cpu"), cfg.num_server_rounds)
    phase.start(Handoff())
    assert [phase.discreteness(r) for r in (1, 2, 4, 6, 9)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert phase.plan(6).tau == pytest.approx(cfg.tau_min) and phase.plan(9).tau == pytest.approx(cfg.tau_min)
    assert phase.plan(3).tau == pytest.approx(cfg.tau_max)
    assert not phase.is_discrete()
    phase.masks = update_masks(phase.space, phase.arch_state(), {}, 0.01, cfg.tau_min, discreteness=0.5)
    assert not phase.is_discrete()
    phase.masks = update_masks(phase.space, phase.arch_state(), phase.masks, 0.01, cfg.tau_min, discreteness=1.0)
    assert phase.is_discrete()  # the server then evaluates the derived network once for both
    with pytest.raises(ConfigError, match="discrete-round"):
        RunConfig.from_flat({"num-server-rounds": 10, "warmup-rounds": 3, "discrete-round": 3}, check_paths=False)

"""Relaxation of the architecture logits (softmax, Gumbel soft and hard, masks, seeded noise) and
the temperature schedule that anneals it."""

from __future__ import annotations

import pytest
import torch

from fedmetanas_core.space.relaxation import TemperatureSchedule, probabilities, relax

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


# --- relaxation -------------------------------------------------------------------------------


def test_relax_rows_sum_to_one_and_masked_entries_are_exactly_zero():
    logits = torch.randn(5, 7)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 2] = True
    for mode in ("gumbel-soft", "softmax", "gumbel-hard"):
        w = relax(logits, 0.5, mode, mask, torch.Generator().manual_seed(0))
        torch.testing.assert_close(w.sum(-1), torch.ones(5))
        assert torch.all(w[~mask] == 0)
        assert torch.all(w >= 0)


def test_relax_noise_depends_only_on_generator_seed():
    logits = torch.randn(4, 6)
    a = relax(logits, 1.0, "gumbel-soft", generator=torch.Generator().manual_seed(7))
    b = relax(logits, 1.0, "gumbel-soft", generator=torch.Generator().manual_seed(7))
    c = relax(logits, 1.0, "gumbel-soft", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the global RNG is not consumed when a generator is given
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    relax(logits, 1.0, "gumbel-soft", generator=torch.Generator().manual_seed(7))
    assert torch.equal(before, torch.random.get_rng_state())


def test_relax_without_noise_is_plain_softmax_over_tau():
    logits = torch.randn(3, 5)
    for mode in ("gumbel-soft", "softmax"):
        torch.testing.assert_close(relax(logits, 0.4, mode, noise=False), torch.softmax(logits / 0.4, -1))
    torch.testing.assert_close(probabilities(logits, tau=0.4), torch.softmax(logits / 0.4, -1))


def test_gumbel_hard_is_one_hot_forward_with_gradient_to_all_logits():
    logits = torch.randn(4, 6, requires_grad=True)
    w = relax(logits, 1.0, "gumbel-hard", generator=torch.Generator().manual_seed(0))
    assert torch.all((w == 0) | (w == 1)) or torch.allclose(w, w.round(), atol=1e-6)
    torch.testing.assert_close(w.detach().sum(-1), torch.ones(4))
    assert torch.all((w.detach() > 0.5).sum(-1) == 1)
    coeff = torch.randn(4, 6)
    (w * coeff).sum().backward()
    unselected = w.detach() < 0.5
    assert torch.all(logits.grad[unselected] != 0), "straight-through must reach non-selected logits"


def test_low_temperature_gives_near_one_hot():
    logits = torch.tensor([[0.3, 0.1, -0.2, 0.25]])
    w = relax(logits, 0.005, "softmax", noise=False)
    assert float(w.max()) > 0.999
    assert int(w.argmax()) == 0
    hot = relax(logits, 100.0, "softmax", noise=False)
    assert float(hot.max() - hot.min()) < 0.01  # high tau: near uniform


def test_gumbel_max_sampling_frequencies_match_softmax():
    """argmax(logits + Gumbel) ~ softmax(logits): catches a wrong sign or wrong noise law."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    n = 40000
    w = relax(logits.expand(n, 4), 1.0, "gumbel-hard", generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(w.argmax(-1), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.012, rtol=0)


# --- temperature schedule ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_temperature_schedule(kind, warmup):
    s = TemperatureSchedule(2.0, 0.1, 12, kind, warmup)
    taus = [s(r) for r in range(1, 13)]
    assert taus[0] == pytest.approx(2.0)
    assert taus[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(taus, taus[1:], strict=False))
    for r in range(1, warmup + 2):  # warm-up rounds and the first annealing round
        assert s(r) == pytest.approx(2.0)
    assert taus[warmup + 1] < 2.0
    assert s(100) == pytest.approx(0.1)  # past the end it stays at tau_min
    if kind == "linear":
        s5 = TemperatureSchedule(1.0, 0.2, 5, kind)
        assert s5(3) == pytest.approx(0.6)
    if kind == "exponential":
        s5 = TemperatureSchedule(1.0, 0.01, 5, kind)
        assert s5(3) == pytest.approx(0.1)

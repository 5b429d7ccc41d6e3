"""Server-side aggregation: the sample-weighted mean of weights and logits, the logit transforms,
and the screen that rejects bad replies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmetanas_core.method.aggregation import reply_problem, transform_logits, weighted_average
from fedmetanas_core.space import is_arch

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


def three_states():
    rng = np.random.default_rng(0)
    shapes = {"net.w": (3, 2), "net.b": (4,), "arch.alpha.normal": (5, 4), "arch.beta.normal-3": (3,)}
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]


def test_weighted_average_is_sample_weighted_mean_of_weights_and_logits():
    states = three_states()
    copies = [{k: v.copy() for k, v in s.items()} for s in states]
    n = [10, 30, 60]
    avg = weighted_average(states, n)
    for k in states[0]:
        want = sum(ni * s[k].astype(np.float64) for ni, s in zip(n, states, strict=False)) / sum(n)
        np.testing.assert_allclose(avg[k], want, rtol=1e-6, atol=1e-6)
        assert avg[k].dtype == states[0][k].dtype
    for s, c in zip(states, copies, strict=False):
        for k in s:
            np.testing.assert_array_equal(s[k], c[k])
    # not the plain mean
    assert not np.allclose(avg["net.w"], np.mean([s["net.w"] for s in states], axis=0))
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average(states, [0, 0, 0])


def test_transform_logits():
    s = three_states()[0]
    copy = {k: v.copy() for k, v in s.items()}
    assert transform_logits(s, "logits") is s or all(np.array_equal(transform_logits(s, "logits")[k], s[k]) for k in s)
    c = transform_logits(s, "centered")
    ls = transform_logits(s, "log-softmax")
    for k in s:
        np.testing.assert_array_equal(s[k], copy[k])  # input not mutated
        if is_arch(k):
            np.testing.assert_allclose(c[k].mean(-1), 0, atol=1e-6)
            np.testing.assert_allclose(np.log(np.exp(ls[k].astype(np.float64)).sum(-1)), 0, atol=1e-6)
            # same distribution as the raw logits
            np.testing.assert_allclose(
                torch.softmax(torch.from_numpy(c[k]), -1).numpy(),
                torch.softmax(torch.from_numpy(s[k]), -1).numpy(),
                rtol=1e-5,
                atol=1e-6,
            )
        else:
            np.testing.assert_array_equal(c[k], s[k])
            np.testing.assert_array_equal(ls[k], s[k])
    with pytest.raises(ValueError):
        transform_logits(s, "bogus")


def test_reply_problem_screens_bad_replies():
    ref = three_states()[0]
    good = {k: v + 0.1 for k, v in ref.items()}
    assert reply_problem(good, ref) is None
    nan = dict(good, **{"net.w": np.full((3, 2), np.nan, np.float32)})
    assert "non-finite" in reply_problem(nan, ref)
    inf = dict(good, **{"arch.alpha.normal": np.full((5, 4), np.inf, np.float32)})
    assert "non-finite" in reply_problem(inf, ref)
    shape = dict(good, **{"net.b": np.zeros(5, np.float32)})
    assert "shape" in reply_problem(shape, ref)
    names = {("net.x" if k == "net.b" else k): v for k, v in good.items()}
    assert "names" in reply_problem(names, ref)
    missing = {k: v for k, v in good.items() if k != "net.b"}
    assert reply_problem(missing, ref) is not None
    huge = dict(good, **{"net.w": np.full((3, 2), 1e6, np.float32)})
    assert "norm" in reply_problem(huge, ref)

"""MAML: first-order and second-order task gradients, the inner loop's separate learning rates, and
exactly zero meta-gradient on masked logits. A toy model in float64 checks the algebra."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import SMALL_OPS, random_masks, randomize_arch, tiny_space
from torch.func import functional_call

from fedmetanas_core.method.maml import (
    InnerLoop,
    fomaml_task_gradient,
    inner_adapt,
    loss_on,
    second_order_task_gradient,
)
from fedmetanas_core.space import RelaxSettings, SearchModel, is_arch

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


class Toy(nn.Module):
    """Logistic regression: weight ``w`` and an architecture-named bias ``arch.b``."""

    def __init__(self, d=3, c=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, d))
        self.arch = nn.Module()
        self.arch.b = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return x @ self.w.T + self.arch.b


def toy_problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Toy().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    support = (torch.randn(8, 3, generator=g, dtype=dtype), torch.randint(3, (8,), generator=g))
    query = (torch.randn(8, 3, generator=g, dtype=dtype), torch.randint(3, (8,), generator=g))
    return model, support, query


def manual_adapt(model, params, support, steps, lr_w, lr_a, adapt_arch=True):
    cur = {k: v.detach().clone() for k, v in params.items()}
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_(True) for k, v in cur.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (support[0],)), support[1])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        new = {}
        for (k, v), gr in zip(leaves.items(), grads, strict=False):
            if is_arch(k):
                new[k] = v.detach() - lr_a * gr if adapt_arch else v.detach()
            else:
                new[k] = v.detach() - lr_w * gr
        cur = new
    return cur


def test_fomaml_gradient_is_query_gradient_at_adapted_params():
    model, support, query = toy_problem()
    params = dict(model.named_parameters())
    inner = InnerLoop(steps=3, lr_w=0.3, lr_alpha=0.7)
    grads, loss = fomaml_task_gradient(model, params, support, query, inner)
    adapted = manual_adapt(model, params, support, 3, 0.3, 0.7)
    leaves = {k: v.requires_grad_(True) for k, v in adapted.items()}
    q = F.cross_entropy(functional_call(model, leaves, (query[0],)), query[1])
    ref = dict(zip(leaves, torch.autograd.grad(q, list(leaves.values())), strict=False))
    assert set(grads) == {"w", "arch.b"}
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k])
    assert loss == pytest.approx(float(q.detach()))


def test_inner_adapt_does_not_modify_module_in_place():
    model, support, _ = toy_problem()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for create_graph in (False, True):
        adapted = inner_adapt(
            model, dict(model.named_parameters()), support, InnerLoop(2, 0.5, 0.5), create_graph=create_graph
        )
        for k, v in model.named_parameters():
            assert torch.equal(v, before[k])
            assert v.grad is None
        assert not torch.allclose(adapted["w"], before["w"])


def test_inner_lrs_apply_to_weights_and_arch_separately():
    model, support, _ = toy_problem()
    params = dict(model.named_parameters())
    only_arch = inner_adapt(model, params, support, InnerLoop(2, 0.0, 0.5))
    assert torch.equal(only_arch["w"], params["w"].detach())
    assert not torch.allclose(only_arch["arch.b"], params["arch.b"])
    only_w = inner_adapt(model, params, support, InnerLoop(2, 0.5, 0.0))
    assert torch.equal(only_w["arch.b"], params["arch.b"].detach())
    assert not torch.allclose(only_w["w"], params["w"])
    frozen = inner_adapt(model, params, support, InnerLoop(2, 0.5, 0.5, adapt_arch=False))
    assert torch.equal(frozen["arch.b"], params["arch.b"].detach())
    ref = manual_adapt(model, params, support, 2, 0.5, 0.5, adapt_arch=False)
    torch.testing.assert_close(frozen["w"], ref["w"])


def test_inner_adapt_step_values_match_manual():
    model, support, _ = toy_problem()
    params = dict(model.named_parameters())
    got = inner_adapt(model, params, support, InnerLoop(2, 0.2, 0.9))
    ref = manual_adapt(model, params, support, 2, 0.2, 0.9)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_second_order_matches_finite_differences_and_differs_from_first_order():
    model, support, query = toy_problem(torch.float64)
    inner = InnerLoop(steps=2, lr_w=0.5, lr_alpha=0.8)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def meta_loss(p):
        adapted = inner_adapt(model, p, support, inner)
        with torch.no_grad():
            return float(loss_on(model, adapted, query))

    so, loss = second_order_task_gradient(model, params, support, query, inner)
    fo, _ = fomaml_task_gradient(model, params, support, query, inner)
    assert loss == pytest.approx(meta_loss(params), rel=1e-12)
    eps = 1e-6
    for k, v in params.items():
        fd = torch.zeros_like(v)
        for idx in np.ndindex(*v.shape):
            plus = {kk: vv.clone() for kk, vv in params.items()}
            minus = {kk: vv.clone() for kk, vv in params.items()}
            plus[k][idx] += eps
            minus[k][idx] -= eps
            fd[idx] = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
        torch.testing.assert_close(so[k], fd, rtol=1e-5, atol=1e-7)
    diff = sum(float((so[k] - fo[k]).abs().sum()) for k in so)
    assert diff > 1e-3, "second-order and first-order gradients must differ"


def test_second_order_without_inner_steps_equals_first_order():
    model, support, query = toy_problem(torch.float64)
    inner = InnerLoop(steps=0, lr_w=0.5, lr_alpha=0.5)
    params = dict(model.named_parameters())
    so, _ = second_order_task_gradient(model, params, support, query, inner)
    fo, _ = fomaml_task_gradient(model, params, support, query, inner)
    for k in so:
        torch.testing.assert_close(so[k], fo[k])


def test_fomaml_on_search_model_matches_manual_one_step():
    space = tiny_space(
        num_classes=3, in_channels=1, num_cells=2, primitives=("none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3")
    )
    model = SearchModel(space)
    randomize_arch(model, scale=0.5)
    fw = dict(settings=RelaxSettings(tau=1.0, mode="softmax", noise=False, threshold=0.0), masks=None, generator=None)
    g = torch.Generator().manual_seed(0)
    support = (torch.randn(6, 1, 8, 8, generator=g), torch.randint(3, (6,), generator=g))
    query = (torch.randn(6, 1, 8, 8, generator=g), torch.randint(3, (6,), generator=g))
    params = dict(model.named_parameters())
    grads, _ = fomaml_task_gradient(model, params, support, query, InnerLoop(1, 0.1, 0.3), **fw)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    ls = F.cross_entropy(functional_call(model, leaves, (support[0],), fw), support[1])
    gs = torch.autograd.grad(ls, list(leaves.values()))
    adapted = {
        k: (v.detach() - (0.3 if is_arch(k) else 0.1) * gr).requires_grad_(True)
        for (k, v), gr in zip(leaves.items(), gs, strict=False)
    }
    lq = F.cross_entropy(functional_call(model, adapted, (query[0],), fw), query[1])
    ref = dict(zip(adapted, torch.autograd.grad(lq, list(adapted.values())), strict=False))
    assert any(k.startswith("arch.alpha") for k in grads) and any(k.startswith("arch.beta") for k in grads)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_masked_alpha_entries_get_exactly_zero_meta_gradient():
    space = tiny_space(num_classes=3, in_channels=1, num_cells=2, primitives=SMALL_OPS)
    model = SearchModel(space)
    masks = random_masks(space, model, seed=1)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 1, 8, 8, generator=g), torch.randint(3, (4,), generator=g))
    fw = dict(settings=RelaxSettings(tau=0.7, mode="gumbel-soft", threshold=0.0), masks=masks, generator=g)
    grads, _ = fomaml_task_gradient(model, dict(model.named_parameters()), batch, batch, InnerLoop(1, 0.1, 0.1), **fw)
    for name, m in masks.items():
        assert torch.all(grads[name][~m] == 0)
        assert torch.any(grads[name][m] != 0)

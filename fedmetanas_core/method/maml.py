"""Functional MAML over network weights AND architecture logits.

Parameters travel as flat ``{name: tensor}`` dicts (``net.*`` and ``arch.*``); adapted parameters are
new tensors, so the inner loop never mutates the module (the classic ``.data`` write silently cuts
the graph and makes "second order" first order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..names import is_arch

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]
Penalty = Callable[[Params], torch.Tensor]  # a term of the parameters added to every loss (the cost term)


@dataclass(frozen=True)
class InnerLoop:
    steps: int
    lr_w: float
    lr_alpha: float
    adapt_arch: bool = True  # False while alphas are frozen (warm-up)


def loss_on(
    model: torch.nn.Module, params: Params, batch: Batch, penalty: Penalty | None = None, **forward_kwargs
) -> torch.Tensor:
    """Cross-entropy on ``batch`` at ``params``, plus ``penalty(params)`` (a budget's cost term of the
    architecture logits: the task learner and the meta learner see the same objective)."""
    x, y = batch
    # no tied weights in these networks: without the check, a call skips a walk over every module
    loss = F.cross_entropy(functional_call(model, params, (x,), forward_kwargs, tie_weights=False), y)
    return loss if penalty is None else loss + penalty(params)


def inner_adapt(
    model: torch.nn.Module,
    params: Params,
    support: Batch | Callable[[int], Batch],
    inner: InnerLoop,
    create_graph: bool = False,
    penalty: Penalty | None = None,
    **forward_kwargs,
) -> Params:
    """K plain gradient steps on the support batch; weights and alphas each with their own step size.

    ``create_graph=False`` (first order): each step starts from detached leaves, so the result is a
    fresh leaf dict whose gradients are the FOMAML meta-gradient. ``create_graph=True`` keeps the
    graph back to ``params`` for exact second-order MAML. ``support`` may be a function of the step
    (personalization walks over several batches).
    """
    current = params if create_graph else {k: v.detach().requires_grad_(True) for k, v in params.items()}
    for step in range(inner.steps):
        batch = support(step) if callable(support) else support
        names = [k for k in current if inner.adapt_arch or not is_arch(k)]
        loss = loss_on(model, current, batch, penalty if inner.adapt_arch else None, **forward_kwargs)
        grads = torch.autograd.grad(loss, [current[k] for k in names], create_graph=create_graph, allow_unused=True)
        updated = dict(current)
        for name, grad in zip(names, grads, strict=False):
            if grad is None:
                continue
            lr = inner.lr_alpha if is_arch(name) else inner.lr_w
            updated[name] = current[name] - lr * grad
        current = updated if create_graph else {k: v.detach().requires_grad_(True) for k, v in updated.items()}
    return current


def fomaml_task_gradient(
    model, params: Params, support: Batch, query: Batch, inner: InnerLoop, penalty: Penalty | None = None, **fw
) -> tuple[Params, float]:
    """Query-loss gradient at the adapted parameters: the first-order meta-gradient for ``params``."""
    adapted = inner_adapt(model, params, support, inner, create_graph=False, penalty=penalty, **fw)
    loss = loss_on(model, adapted, query, penalty, **fw)
    return _gradients(loss, adapted), float(loss.detach())


def second_order_task_gradient(
    model, params: Params, support: Batch, query: Batch, inner: InnerLoop, penalty: Penalty | None = None, **fw
) -> tuple[Params, float]:
    """Exact MAML: differentiate the query loss through the inner steps back to ``params``."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    adapted = inner_adapt(model, leaves, support, inner, create_graph=True, penalty=penalty, **fw)
    loss = loss_on(model, adapted, query, penalty, **fw)
    return _gradients(loss, leaves), float(loss.detach())


def _gradients(loss: torch.Tensor, params: Params) -> Params:
    """d loss / d params, zeros for the parameters the loss does not reach."""
    names = list(params)
    grads = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, grads, strict=False)}


def reptile_task_delta(
    model, params: Params, support: Batch, inner: InnerLoop, penalty: Penalty | None = None, **fw
) -> tuple[Params, float]:
    """Reptile direction: adapted minus initial parameters (the inner loop runs on support only)."""
    adapted = inner_adapt(model, params, support, inner, create_graph=False, penalty=penalty, **fw)
    with torch.no_grad():
        loss = float(loss_on(model, adapted, support, **fw))
    return {k: (adapted[k].detach() - params[k].detach()) for k in params}, loss


def mean_dicts(dicts: list[Params]) -> Params:
    return {k: torch.stack([d[k] for d in dicts]).mean(0) for k in dicts[0]}

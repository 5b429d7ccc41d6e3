"""Server-side maths on client states: screening, averaging rules for logits, permanent masks.

Client states are ``{name: np.ndarray}``. Nothing here mutates an input (FedNAS's aggregation edited
client 0's dict in place; FedML's rebound a loop variable and "averaged" client 0 alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from ..names import CELL_TYPES, arch_param_name, is_arch
from ..space import SpaceConfig
from ..space.relaxation import probabilities

State = dict[str, np.ndarray]


def weighted_average(states: list[State], weights: list[float]) -> State:
    """Sample-weighted mean over the replies of this round (n_k / sum of this round's n)."""
    if not states:
        raise ValueError("nothing to aggregate")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to > 0")
    out = {}
    for key in states[0]:
        acc = np.zeros_like(states[0][key], dtype=np.float64)
        for s, w in zip(states, weights, strict=False):
            acc += (w / total) * s[key].astype(np.float64)
        out[key] = acc.astype(states[0][key].dtype)
    return out


def transform_logits(state: State, rule: str) -> State:
    """Put architecture logits into the form that a *linear* average should see.

    Logits are defined up to a per-row shift, so averaging raw logits (``logits``, FedNAS) is not
    averaging distributions; ``centered`` removes the shift, ``log-softmax`` makes the mean a
    geometric mean of probabilities. Applied per reply, so every linear Flower strategy composes.
    """
    if rule == "logits":
        return state
    out = dict(state)
    for key, value in state.items():
        if not is_arch(key):
            continue
        v = value.astype(np.float64)
        if rule == "centered":
            v = v - v.mean(axis=-1, keepdims=True)
        elif rule == "log-softmax":
            v = torch.log_softmax(torch.from_numpy(v), dim=-1).numpy()
        else:
            raise ValueError(f"unknown alpha aggregation {rule!r}")
        out[key] = v.astype(value.dtype)
    return out


def reply_problem(state: State, reference: State, max_norm_ratio: float = 1e3) -> str | None:
    """Why a client's state must not be aggregated, or None. Checks names, shapes, finiteness, norm."""
    if set(state) != set(reference):
        missing = sorted(set(reference) - set(state))[:3]
        extra = sorted(set(state) - set(reference))[:3]
        return f"wrong array names (missing {missing}, unexpected {extra})"
    for key, ref in reference.items():
        value = state[key]
        if value.shape != ref.shape:
            return f"wrong shape for {key}: {value.shape} != {ref.shape}"
        if not np.all(np.isfinite(value)):
            return f"non-finite values in {key}"
    ref_norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in reference.values()))
    norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in state.values()))
    if norm > max_norm_ratio * max(ref_norm, 1.0):
        return f"absurd norm {norm:.3g} (global model {ref_norm:.3g})"
    return None


def keep_budget(num_entries: int, discreteness: float) -> int:
    """How many entries of a row may stay: all at discreteness 0, exactly one at 1 (linear between)."""
    return max(1, math.ceil(num_entries - (num_entries - 1) * min(max(discreteness, 0.0), 1.0) - 1e-9))


def update_masks(
    space: SpaceConfig,
    arch: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    threshold: float,
    tau_min: float,
    discreteness: float = 0.0,
    keep_choice: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Monotone permanent masks (True = keep) decided on the aggregated logits at ``tau_min``.

    An entry whose probability at tau_min falls below ``threshold`` is pruned for good. The best
    real op of each edge and the best input pair of each node are never pruned, so every client keeps
    searching one well-formed space. ``discreteness`` in [0, 1] also caps the entries a row keeps
    (``keep_budget``: the best real op plus the next-best logits), so at 1 every edge holds one real op
    and every node one input pair: the supernet *is* the derived cell and costs what it costs.
    ``keep_choice`` (a budget's cell, ``budget.choice_masks``) names per row the entry kept instead of
    the best logit (-1: the best logit), so the cell that fits is the one left at the end.
    """
    keep_choice = keep_choice or {}
    new = {}
    none_idx = space.primitives.index("none") if "none" in space.primitives else -1
    for name, logits in arch.items():
        old = masks.get(name, torch.ones_like(logits, dtype=torch.bool))
        if threshold <= 0 and discreteness <= 0:
            new[name] = old.clone()
            continue
        keep = old.clone()
        if threshold > 0:
            keep &= probabilities(logits, old, tau=tau_min) >= threshold
        # the guard ranks logits, not probabilities: at tau_min every real op may underflow to 0
        guard = logits.detach().float().masked_fill(~old, float("-inf"))
        if ".alpha." in name and none_idx >= 0:
            guard[..., none_idx] = float("-inf")
        best = guard.argmax(dim=-1, keepdim=True)
        if name in keep_choice:
            forced = keep_choice[name].to(best.device).reshape(best.shape)
            best = torch.where(forced >= 0, forced, best)
        keep.scatter_(-1, best, True)
        budget = keep_budget(logits.shape[-1], discreteness)
        if budget < logits.shape[-1]:
            others = logits.detach().float().masked_fill(~keep, float("-inf")).scatter(-1, best, float("-inf"))
            capped = torch.zeros_like(keep).scatter_(-1, best, True)
            if budget > 1:
                top = others.topk(budget - 1, dim=-1).indices
                capped.scatter_(-1, top, True)
            keep &= capped
        new[name] = keep
    return new


def masks_are_discrete(space: SpaceConfig, arch_names: Iterable[str], masks: dict[str, torch.Tensor]) -> bool:
    """One op per edge and one input pair per node: the supernet computes the derived network.

    Without input pruning every edge feeds its node, so the supernet never equals the derived cell.
    """
    names = list(arch_names)
    if not space.input_pruning or any(n not in masks for n in names):
        return False
    return all(bool((masks[n].sum(-1) == 1).all()) for n in names)


def arch_statistics(
    space: SpaceConfig, arch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], tau: float
) -> dict[str, float]:
    """Entropy of op and pair distributions per cell type (near 0 = near one-hot), and pruned share."""
    from ..space.relaxation import entropy

    stats: dict[str, float] = {}
    for cell_type in CELL_TYPES:
        name = arch_param_name("alpha", cell_type)
        stats[f"alpha-entropy-{cell_type}"] = entropy(probabilities(arch[name], masks.get(name), tau))
        betas = [k for k in (arch_param_name("beta", cell_type, j) for j in space.topology.nodes) if k in arch]
        if betas:
            stats[f"beta-entropy-{cell_type}"] = float(
                np.mean([entropy(probabilities(arch[k], masks.get(k), tau)[None]) for k in betas])
            )
    total = sum(m.numel() for m in masks.values()) or 1
    stats["pruned-fraction"] = sum(int((~m).sum()) for m in masks.values()) / total
    return stats

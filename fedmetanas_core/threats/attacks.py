"""Attack injection and the robust aggregation of architecture logits, Flower-free.

A federated NAS has an attack surface that weight-only FL lacks: a few clients can push the
aggregated alphas towards parameter-free ops and steer the whole federation's architecture. These
functions make a client's reply malicious (for simulations that measure that) and aggregate the
architecture logits robustly on the server (the defence, independent of the weight strategy).

States are ``{name: np.ndarray}`` holding whatever keys the server sent (the wire may carry a
subset of the model's keys); architecture keys are the ``arch.*`` logits (``names.is_arch``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..names import PRIMITIVES, is_arch

if TYPE_CHECKING:
    from ..run.config import RunConfig

State = dict[str, np.ndarray]

ATTACKS = ("none", "sign-flip", "alpha-poison")
ALPHA_DEFENCES = ("none", "median", "trimmed-mean", "norm-screen", "update-screen")
LOGIT_RULES = ("median", "trimmed-mean", "norm-screen")  # replace the logits only; update-screen drops replies
# ops without weights that still show up in a derived cell ('none' is excluded when deriving it)
PARAMETER_FREE = ("max_pool_3x3", "avg_pool_3x3", "skip_connect")


def parse_attack_clients(text: str) -> tuple[int, ...]:
    """'0,1' -> (0, 1): the attacking partition ids. Raises ValueError on anything else."""
    ids = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if not item.isdigit():
            raise ValueError(f"{item!r} is not a partition id (an int >= 0)")
        ids.append(int(item))
    if len(set(ids)) != len(ids):
        raise ValueError("partition ids must not repeat")
    return tuple(ids)


def poison(
    attack: str, received: State, honest: State, scale: float, primitives: tuple[str, ...] = PRIMITIVES
) -> State:
    """The reply an attacking client sends instead of its honest trained ``honest`` state.

    ``sign-flip``: every array's update is reversed and scaled: ``g - scale * (h - g)`` for the
    global ``g`` it received (weights and logits alike). ``alpha-poison``: weights stay honest (so a
    weight-distance screen such as Krum sees an ordinary reply); every alpha row is the received
    logits plus ``scale`` on the parameter-free ops and minus ``scale`` on all others, i.e. the
    cell's ops pushed towards skip / pooling. Betas (input pairs) stay honest.
    """
    if attack == "none":
        return dict(honest)
    if attack == "sign-flip":
        out = dict(honest)  # a key the server did not send has no update to flip
        for key in honest.keys() & received.keys():
            g = received[key].astype(np.float64)
            out[key] = (g - scale * (honest[key].astype(np.float64) - g)).astype(honest[key].dtype)
        return out
    if attack == "alpha-poison":
        direction = np.array([1.0 if p in PARAMETER_FREE else -1.0 for p in primitives])
        out = dict(honest)
        for key, value in honest.items():
            if is_arch(key) and ".alpha." in key and key in received and value.shape[-1] == len(primitives):
                out[key] = (received[key].astype(np.float64) + scale * direction).astype(value.dtype)
        return out
    raise ValueError(f"unknown attack {attack!r}; one of {', '.join(ATTACKS)}")


def attacked(cfg: RunConfig, partition_id: int, received: State, honest: State) -> State:
    """The client's hook (simulations only): an attacking partition (``attack-clients``) replies
    with the state ``poison`` makes from what the server sent and its honest reply; any other
    partition's ``honest`` is returned as it is (the same object)."""
    if cfg.attack == "none" or partition_id not in parse_attack_clients(cfg.attack_clients):
        return honest
    return poison(cfg.attack, received, honest, cfg.attack_scale, cfg.primitive_list)


def robust_logits(
    states: list[State],
    weights: list[float],
    reference: State,
    rule: str,
    trim_beta: float = 0.2,
    norm_factor: float = 3.0,
) -> tuple[State, list[int]]:
    """Architecture logits (the ``arch.*`` keys of the replies) aggregated robustly, per element.

    ``median``: coordinate-wise median. ``trimmed-mean``: coordinate-wise mean after cutting
    ``int(trim_beta * n)`` values at each end. ``norm-screen``: replies whose logit update
    ``||reply - reference||`` exceeds ``norm_factor`` times the median update norm are dropped and
    the rest averaged by ``weights`` (num-examples). Returns the logits and the indices of the
    replies the screen dropped (always empty for the coordinate-wise rules).
    """
    if not states:
        raise ValueError("nothing to aggregate")
    keys = [k for k in states[0] if is_arch(k)]
    if rule == "median":
        return {
            k: np.median(np.stack([s[k] for s in states]).astype(np.float64), axis=0).astype(states[0][k].dtype)
            for k in keys
        }, []
    if rule == "trimmed-mean":
        cut = int(trim_beta * len(states))
        out = {}
        for k in keys:
            stacked = np.sort(np.stack([s[k] for s in states]).astype(np.float64), axis=0)
            out[k] = stacked[cut : len(states) - cut].mean(axis=0).astype(states[0][k].dtype)
        return out, []
    if rule == "norm-screen":
        norms = [
            math.sqrt(sum(float(np.sum((s[k].astype(np.float64) - reference[k]) ** 2)) for k in keys)) for s in states
        ]
        limit = norm_factor * float(np.median(norms))
        kept = [i for i, n in enumerate(norms) if n <= limit + 1e-9]
        total = float(sum(weights[i] for i in kept))
        out = {}
        for k in keys:
            acc = sum((weights[i] / total) * states[i][k].astype(np.float64) for i in kept)
            out[k] = np.asarray(acc).astype(states[0][k].dtype)
        return out, [i for i in range(len(states)) if i not in kept]
    raise ValueError(f"unknown alpha defence {rule!r}; one of {', '.join(ALPHA_DEFENCES)}")


def screen_replies(norms: list[tuple[float, float]], factor: float) -> list[int]:
    """Indices of the replies ``update-screen`` leaves out entirely (weights and logits): those whose
    weight update norm or logit update norm exceeds ``factor`` times that norm's median over the
    round's replies. ``norms`` holds (all arrays, logits only) per reply, as
    ``privacy.update_norms`` measures them. A scaled attack (sign-flip) and a logit attack
    (alpha-poison) both stand out; honest non-IID updates differ by far less (rounds.jsonl's
    ``update-norms``). Unlike the logit-only rules, a weight attack never reaches the base strategy.
    """
    if not norms:
        return []
    weight = [math.sqrt(max(total * total - arch * arch, 0.0)) for total, arch in norms]
    arch = [a for _, a in norms]
    limits = [factor * float(np.median(values)) + 1e-9 for values in (weight, arch)]
    return [i for i in range(len(norms)) if weight[i] > limits[0] or arch[i] > limits[1]]


def parameter_free_count(genotype_dict: dict) -> dict[str, int]:
    """Parameter-free ops (skip, pooling) per cell type of a genotype (``Genotype.to_dict()`` form)."""
    return {
        cell: sum(1 for node in rows for choice in node if choice["op"] in PARAMETER_FREE)
        for cell, rows in genotype_dict.items()
    }

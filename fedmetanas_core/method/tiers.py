"""Device tiers: which budgets a run serves and which client searches for which.

``tiers = "macs:20000,macs:160000"`` makes one search give one network per budget (tier). A client's
tier is the largest budget within what it can run: a SuperNode declares that in its node config
(``budget-macs`` / ``budget-params``); in simulation ``tier-shares`` splits the partitions over the
tiers (deterministic by seed); a client with neither takes the run's ``budget`` (the smallest tier
when the run has none). What is shared between tiers and what is not is
``federation.tiered`` (weights: slices of one set, ``method.width_slices``; architecture: per tier).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..run.config_keys import parse_tier_budgets
from ..run.node_config import NODE_BUDGET_KEYS
from ..util.seeding import derive_seed

if TYPE_CHECKING:
    from ..run.config import RunConfig


@dataclass(frozen=True)
class Tier:
    index: int  # 0 = the smallest budget
    kind: str
    limit: float

    @property
    def name(self) -> str:
        """The tier's folder and row name, e.g. ``macs-20000``."""
        return f"{self.kind}-{self.limit:g}"

    @property
    def budget(self) -> str:
        """The tier's budget as a ``budget`` run-config value."""
        return f"{self.kind}:{self.limit:g}"


def parse_tiers(text: str) -> list[Tier]:
    """``tiers`` as tiers by increasing limit ('' -> []); ValueError saying why (``parse_tier_budgets``)."""
    return [Tier(i, kind, limit) for i, (kind, limit) in enumerate(parse_tier_budgets(text))]


def run_tiers(cfg: RunConfig) -> list[Tier]:
    """The tiers this run searches for: all of them, or ``only-tier``'s; the last is the largest."""
    tiers = parse_tiers(cfg.tiers)
    return [tiers[cfg.only_tier]] if cfg.only_tier >= 0 else tiers


def assign_partitions(num_partitions: int, shares: list[float], seed: int) -> list[int]:
    """Each partition's tier: a seeded shuffle of the partitions cut by the shares (largest
    remainders, so the counts add up and every tier with a share of at least one client has one)."""
    exact = np.asarray(shares) * num_partitions
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_partitions - counts.sum()]:
        counts[i] += 1
    order = np.random.default_rng(derive_seed(seed, "tiers")).permutation(num_partitions)
    tier_of = np.empty(num_partitions, dtype=int)
    start = 0
    for tier, count in enumerate(counts):
        tier_of[order[start : start + count]] = tier
        start += count
    return tier_of.tolist()


def tier_for_budget(tiers: list[Tier], kind: str, limit: float) -> Tier | None:
    """The largest tier within a device's budget (None: no tier fits, or the budget limits another kind)."""
    fitting = [t for t in tiers if t.kind == kind and t.limit <= limit * (1 + 1e-9)]
    return fitting[-1] if fitting else None


def declared_budget(node_config: dict) -> tuple[str, float] | None:
    """The budget a validated node config declares (``run.node_config`` checks it), or None."""
    for key, kind in NODE_BUDGET_KEYS.items():
        if key in node_config:
            return kind, float(node_config[key])
    return None


def client_tier(
    tiers: list[Tier],
    declared: tuple[str, float] | None,
    partition: int | None,
    num_partitions: int | None,
    shares: list[float],
    seed: int,
    run_budget: tuple[str, float] | None,
) -> tuple[Tier | None, str]:
    """A client's tier and why: its declared budget; else (simulation) its partition's share;
    else the run's budget (the smallest tier when the run has none). None: no tier fits."""
    if declared is not None:
        kind, limit = declared
        tier = tier_for_budget(tiers, kind, limit)
        if tier is None:
            return None, (
                f"declares budget-{kind}={limit:g}, and no tier fits it (tiers: {', '.join(t.budget for t in tiers)})"
            )
        return tier, f"declares budget-{kind}={limit:g}"
    if partition is not None and num_partitions:
        tier = tiers[assign_partitions(num_partitions, shares, seed)[partition]]
        return tier, f"partition {partition} of {num_partitions} (tier-shares)"
    if run_budget is not None:
        tier = tier_for_budget(tiers, *run_budget)
        if tier is None:
            return None, f"the run's budget {run_budget[0]}:{run_budget[1]:g} is below every tier"
        return tier, "the run's budget"
    return tiers[0], "no budget: the smallest tier"


SMALLER_TIER = re.compile(r"^sub\d+/")


def smaller_tier_prefix(index: int) -> str:
    """A smaller tier's round in a node's message (``train-smaller-tiers``): its config and arrays
    under this prefix, beside the node's own."""
    return f"sub{index}/"


def smaller_tier_index(prefix: str) -> int:
    """The tier a ``smaller_tier_prefix`` names."""
    return int(prefix[len("sub") : -1])


def split_smaller_tiers(config: dict, state: dict) -> tuple[dict, dict, list[tuple[str, dict, dict]]]:
    """The node's own config and arrays, and (prefix, config, arrays) of each smaller tier it trains."""
    prefixes = sorted({m.group(0) for k in [*config, *state] if (m := SMALLER_TIER.match(k))})
    own_config = {k: v for k, v in config.items() if not any(k.startswith(p) for p in prefixes)}
    own_state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in prefixes)}
    subs = [
        (
            p,
            {k[len(p) :]: v for k, v in config.items() if k.startswith(p)},
            {k[len(p) :]: v for k, v in state.items() if k.startswith(p)},
        )
        for p in prefixes
    ]
    return own_config, own_state, subs


def local_mean(clients: list[dict], key: str) -> float | None:
    """A tier's clients' local test accuracy (``key``: before or after personalization), weighted by
    their test examples; None without clients. The server's tier summary and the tiers benchmark's
    table (one network for everyone, scored on each tier's clients) both report it."""
    if not clients:
        return None
    weights = [float(c.get("num-examples", 1)) for c in clients]
    return float(np.average([c[key] for c in clients], weights=weights))

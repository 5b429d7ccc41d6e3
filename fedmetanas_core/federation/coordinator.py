"""The server's round protocol and schedules, Flower-free: what a round sends as plain values.

The phases that use them (what a run is made of, and what happens to each aggregate) are in
``phases.py``; the Flower ServerApp only translates between records and these values.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data import ImageData
from ..method.aggregation import State
from ..method.genotype import Genotype, SimpleCNN
from ..method.training import RoundPlan, space_from_config
from ..run.config import RunConfig
from ..space import SpaceConfig
from ..space.cost import CostModel
from ..util.seeding import derive_seed

MASK_PREFIX = "mask:"
COST_MODEL_KEY = "cost-model"  # the budget's cost tables: clients need no latency table of their own
BUDGET_KEY = "budget"  # the budget those tables are for: a tier's client must not take the run's


# ---------------------------------------------------------------------------------------------
# the round protocol: plain values that fit a Flower ConfigRecord


def plan_to_config(plan: RoundPlan) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tau": float(plan.tau),
        "alpha-frozen": bool(plan.alpha_frozen),
        "round": int(plan.server_round),
    }
    if plan.lr_w is not None:
        out["lr-w"] = float(plan.lr_w)
    if plan.local_epochs is not None:
        out["local-epochs"] = int(plan.local_epochs)
    for name, mask in plan.masks.items():
        out[MASK_PREFIX + name] = [bool(b) for b in mask.flatten().tolist()]
    if plan.cost is not None:
        out[COST_MODEL_KEY] = plan.cost.to_json()
    if plan.budget:
        out[BUDGET_KEY] = plan.budget
    return out


def plan_from_config(config: dict[str, Any], shapes: dict[str, torch.Size]) -> RoundPlan:
    masks = {}
    for key, value in config.items():
        if key.startswith(MASK_PREFIX):
            name = key[len(MASK_PREFIX) :]
            masks[name] = torch.tensor(list(value), dtype=torch.bool).reshape(shapes[name])
    return RoundPlan(
        server_round=int(config.get("round", 0)),
        tau=float(config.get("tau", 1.0)),
        alpha_frozen=bool(config.get("alpha-frozen", False)),
        masks=masks,
        lr_w=float(config["lr-w"]) if "lr-w" in config else None,
        local_epochs=int(config["local-epochs"]) if "local-epochs" in config else None,
        cost=CostModel.from_json(str(config[COST_MODEL_KEY])) if COST_MODEL_KEY in config else None,
        budget=str(config[BUDGET_KEY]) if BUDGET_KEY in config else None,
    )


@dataclass(frozen=True)
class LearningRateSchedule:
    """The weights' learning rate as a pure function of a stage's round, sent with each round.

    Clients re-create their optimiser every round, so a decay across rounds has to come from the
    server; each stage (a search, a retraining) anneals over its own rounds.
    """

    base: float
    minimum: float
    num_rounds: int
    kind: str = "constant"

    @classmethod
    def from_config(cls, cfg: RunConfig, num_rounds: int) -> LearningRateSchedule:
        return cls(cfg.outer_lr_w, cfg.lr_min, num_rounds, cfg.lr_schedule)

    def __call__(self, server_round: int) -> float:
        if self.kind == "constant":
            return self.base
        t = 1.0 if self.num_rounds <= 1 else min(max((server_round - 1) / (self.num_rounds - 1), 0.0), 1.0)
        if self.kind == "cosine":
            return self.minimum + 0.5 * (self.base - self.minimum) * (1 + math.cos(math.pi * t))
        raise ValueError(f"unknown learning-rate schedule {self.kind!r}")


def seeded_init(module_factory, seed: int, *stream):
    """Same seed, same initial model, whatever else used the global RNG before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init", *stream))
        return module_factory()


def space_for_run(cfg: RunConfig, test: ImageData) -> SpaceConfig:
    """The run's space at the test images' shape; with ``init-channels = 0`` sized to the budget."""
    from ..method.budget import sized_space
    from ..method.tiers import run_tiers

    if cfg.tiers:  # the run's own space is its largest tier's (device tiers: federation.tiered)
        cfg = cfg.replace(budget=run_tiers(cfg)[-1].budget)
    return sized_space(cfg, space_from_config(cfg, test.num_classes, test.in_channels), image_hw(test))


def image_hw(test: ImageData) -> tuple[int, int]:
    return int(test.x.shape[-2]), int(test.x.shape[-1])


def model_config(space: SpaceConfig) -> dict[str, Any]:
    """What a client needs to build the same networks as the server (sent every round; the width,
    since a budget may have sized it)."""
    return {"num-classes": space.num_classes, "in-channels": space.in_channels, "init-channels": space.init_channels}


def deployed_config(net: torch.nn.Module, genotype: Genotype | None) -> dict[str, Any]:
    """What a client needs to score the deployed network: the fixed phase, its genotype ('' for the
    small CNN) and the CNN's width (a budget may have sized it)."""
    width = {"cnn-channels": net.channels} if isinstance(net, SimpleCNN) else {}
    return {
        "phase": "fixed",
        "genotype": genotype.to_json() if genotype is not None else "",
        "personalize": True,
        **width,
    }


class ProgressClock:
    """Elapsed and estimated remaining time over all rounds of all phases."""

    def __init__(self, total_rounds: int):
        self.start = time.time()
        self.total = total_rounds
        self.done = 0

    def tick(self) -> tuple[float, float]:
        self.done += 1
        elapsed = time.time() - self.start
        remaining = elapsed / self.done * (self.total - self.done)
        return elapsed, remaining


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def finite_state(state: State) -> bool:
    return all(np.all(np.isfinite(v)) for v in state.values())

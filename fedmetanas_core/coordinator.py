"""Server-side state of a run, Flower-free: what each round sends, what happens to the aggregate.

A run is a list of phases: FedMetaNAS is one search phase (the searched model is final, no
retraining); FedNAS is a search phase followed by a fixed-network phase that retrains the derived
genotype from scratch; FedAvg is one fixed-network phase. The Flower ServerApp drives the phases
round by round and only translates between records and these objects.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .aggregation import State, arch_statistics, masks_are_discrete, update_masks
from .config import RunConfig
from .data import ImageData
from .genotype import DiscreteNetwork, Genotype, build_fixed_network, derive_genotype
from .relaxation import TemperatureSchedule, probabilities
from .names import ARCH_PREFIX, CELL_TYPES, arch_param_name, edge_key
from .space import SearchModel, SpaceConfig
from .seeding import derive_seed
from .training import RoundPlan, eval_settings, evaluate, load_arrays, space_from_config, state_arrays

MASK_PREFIX = "mask:"


# ---------------------------------------------------------------------------------------------
# the round protocol: plain values that fit a Flower ConfigRecord


def plan_to_config(plan: RoundPlan) -> dict[str, Any]:
    out: dict[str, Any] = {"tau": float(plan.tau), "alpha-frozen": bool(plan.alpha_frozen), "round": int(plan.server_round)}
    if plan.lr_w is not None:
        out["lr-w"] = float(plan.lr_w)
    for name, mask in plan.masks.items():
        out[MASK_PREFIX + name] = [bool(b) for b in mask.flatten().tolist()]
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
    def from_config(cls, cfg: RunConfig, num_rounds: int) -> "LearningRateSchedule":
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


# ---------------------------------------------------------------------------------------------


class SearchPhase:
    """Supernet search (FedMetaNAS: Gumbel, MAML, soft pruning; FedNAS: softmax, MiLeNAS)."""

    kind = "search"

    def __init__(self, cfg: RunConfig, space: SpaceConfig, test: ImageData, device: torch.device, rounds: int):
        self.cfg, self.space, self.test, self.device, self.rounds = cfg, space, test, device, rounds
        self.is_meta = cfg.method == "fedmetanas"
        self.model = seeded_init(lambda: SearchModel(space), cfg.seed, "search").to(device)
        self.masks: dict[str, torch.Tensor] = {}
        self.anneal_rounds = min(cfg.discrete_round, rounds) if cfg.discrete_round else rounds
        self.schedule = TemperatureSchedule(cfg.tau_max, cfg.tau_min, self.anneal_rounds, cfg.tau_schedule, cfg.warmup_rounds)
        self.learning_rate = LearningRateSchedule.from_config(cfg, rounds)
        self.genotype: Genotype = derive_genotype(space, self.arch_state())  # defined even if no round aggregates
        self.last: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return "search"

    def initial_state(self) -> State:
        return state_arrays(self.model)

    def plan(self, server_round: int) -> RoundPlan:
        lr_w = self.learning_rate(server_round)
        if not self.is_meta:  # FedNAS: plain softmax at temperature 1, nothing masked
            return RoundPlan(server_round, 1.0, False, {}, lr_w)
        frozen = server_round <= self.cfg.warmup_rounds
        return RoundPlan(server_round, self.schedule(server_round), frozen, dict(self.masks), lr_w)

    def discreteness(self, server_round: int) -> float:
        """0 until the warm-up ends, then linear to 1 at ``discrete-round`` (0 throughout when unset)."""
        if not self.cfg.discrete_round:
            return 0.0
        warm = self.cfg.warmup_rounds
        return min(max((server_round - warm) / max(self.anneal_rounds - warm, 1), 0.0), 1.0)

    def round_config(self, server_round: int) -> dict[str, Any]:
        return {"phase": "search", **plan_to_config(self.plan(server_round))}

    def arch_state(self) -> dict[str, torch.Tensor]:
        return {ARCH_PREFIX + k: v.detach().cpu() for k, v in self.model.arch.state_dict().items()}

    def accept(self, server_round: int, state: State) -> dict[str, Any]:
        """Install the aggregate, grow the masks, evaluate supernet and derived network on the test set."""
        load_arrays(self.model, state)
        plan = self.plan(server_round)
        arch = self.arch_state()
        if self.is_meta and server_round >= self.cfg.mask_start_round:
            self.masks = update_masks(
                self.space, arch, self.masks, self.cfg.mask_threshold, self.cfg.tau_min, self.discreteness(server_round)
            )
        self.genotype = derive_genotype(self.space, arch, self.masks)
        stats = arch_statistics(self.space, arch, self.masks, plan.tau)
        derived = self.derived_network()
        derived_eval = evaluate(derived, self.test, self.cfg.eval_batch_size, self.device)
        # a fully pruned supernet computes the derived network (tested), so one evaluation serves both
        supernet = derived_eval if self.is_discrete() else self.evaluate_supernet(plan.tau)
        self.last = {
            "tau": plan.tau,
            "supernet-accuracy": supernet["accuracy"],
            "supernet-loss": supernet["loss"],
            "accuracy": derived_eval["accuracy"],
            "loss": derived_eval["loss"],
            **stats,
            "skip-count": self.genotype.op_counts().get("skip_connect", 0),
            "genotype": self.genotype.to_dict(),
            **self.op_probabilities(arch),
        }
        return self.last

    def is_discrete(self) -> bool:
        return masks_are_discrete(self.space, self.arch_state().keys(), self.masks)

    def op_probabilities(self, arch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Per-edge softmax(alpha) with masks, for the heatmaps of how the architecture converged."""
        alphas = {t: arch_param_name("alpha", t) for t in CELL_TYPES}
        probs = {
            t: [[round(float(p), 5) for p in row] for row in probabilities(arch[name], self.masks.get(name))]
            for t, name in alphas.items()
        }
        logits = {t: [[round(float(v), 4) for v in row] for row in arch[name]] for t, name in alphas.items()}
        edges = [edge_key(j, i) for j, i in self.space.topology.edges]
        return {
            "op-probs": probs, "alpha-logits": logits, "primitives": list(self.space.primitives), "edges": edges,
            "cell-decided": self.is_discrete(),
        }  # fmt: skip

    def restore(self, state: State, masks: dict[str, torch.Tensor], last: dict[str, Any]) -> None:
        """Continue from a checkpoint: the global model, the permanent masks, the last metrics."""
        load_arrays(self.model, state)
        self.masks = {k: v.to(torch.bool) for k, v in masks.items()}
        self.genotype = derive_genotype(self.space, self.arch_state(), self.masks)
        self.last = dict(last)

    @torch.no_grad()
    def evaluate_supernet(self, tau: float) -> dict[str, float]:
        settings = eval_settings(self.cfg, tau)
        return evaluate(lambda x: self.model(x, settings, self.masks), self.test, self.cfg.eval_batch_size, self.device)

    def derived_network(self) -> DiscreteNetwork:
        assert self.genotype is not None
        return DiscreteNetwork.inherit(self.model, self.genotype).to(self.device)


class FixedPhase:
    """FedAvg on a fixed network: the FedAvg baseline, or FedNAS retraining the derived genotype."""

    kind = "fixed"

    def __init__(self, cfg: RunConfig, space: SpaceConfig, genotype: Genotype | None, test: ImageData, device: torch.device, rounds: int, name: str):
        self.cfg, self.space, self.genotype, self.test, self.device, self.rounds = cfg, space, genotype, test, device, rounds
        self.net = seeded_init(lambda: build_fixed_network(space, genotype, cfg.fedavg_channels), cfg.seed, name).to(device)
        self.name = name
        self.learning_rate = LearningRateSchedule.from_config(cfg, rounds)
        self.last: dict[str, Any] = {}

    def initial_state(self) -> State:
        return state_arrays(self.net)

    def plan(self, server_round: int) -> RoundPlan:
        return RoundPlan(server_round, 1.0, False, {}, self.learning_rate(server_round))

    def round_config(self, server_round: int) -> dict[str, Any]:
        genotype = self.genotype.to_json() if self.genotype is not None else ""
        epochs = self.cfg.retrain_local_epochs if self.name == "retrain" else self.cfg.local_epochs
        return {"phase": "fixed", "genotype": genotype, "local-epochs": epochs, **plan_to_config(self.plan(server_round))}

    def accept(self, server_round: int, state: State) -> dict[str, Any]:
        load_arrays(self.net, state)
        result = evaluate(self.net, self.test, self.cfg.eval_batch_size, self.device)
        self.last = {"tau": 1.0, "accuracy": result["accuracy"], "loss": result["loss"]}
        return self.last

    def restore(self, state: State, masks: dict[str, torch.Tensor], last: dict[str, Any]) -> None:
        load_arrays(self.net, state)
        self.last = dict(last)


def space_for_run(cfg: RunConfig, test: ImageData) -> SpaceConfig:
    return space_from_config(cfg, test.num_classes, test.in_channels)


def model_config(space: SpaceConfig) -> dict[str, Any]:
    """What a client needs to build the same networks as the server (sent every round)."""
    return {"num-classes": space.num_classes, "in-channels": space.in_channels}


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

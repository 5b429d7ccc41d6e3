"""A run is a list of phases, Flower-free: the ``Phase`` protocol, its implementations, the planner.

FedMetaNAS is one search phase (the searched model is final, no retraining); FedNAS is a search
phase followed by a phase that retrains the derived genotype from scratch; FedAvg is one
fixed-network phase. The ServerApp runs "for each phase, for each round" and only translates
between records and these objects, so a new method is a new ``Phase`` (where the existing ones
do not fit), an entry in ``PLANS`` and one in ``training.LOCAL_TRAINING``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..data import ImageData
from ..method.aggregation import State, arch_statistics, masks_are_discrete, update_masks
from ..method.budget import budget_of, check_feasible, choice_masks, derive_within, fixed_network_width
from ..method.genotype import DiscreteNetwork, Genotype, build_fixed_network, count_parameters
from ..method.training import RoundPlan, eval_settings, evaluate, load_arrays, state_arrays
from ..method.transfer import live_keys
from ..names import ARCH_PREFIX, CELL_TYPES, arch_param_name, edge_key
from ..run.config import RunConfig
from ..space import SearchModel, SpaceConfig
from ..space.relaxation import TemperatureSchedule, probabilities
from .coordinator import LearningRateSchedule, image_hw, plan_to_config, seeded_init


@dataclass
class Handoff:
    """What the finished phases leave: the genotype (for the next phase, the summary, the
    deployment), results for the summary, and each phase's wall time. Plain values through
    ``to_dict``, so a checkpoint holds it and a resumed run need not repeat a finished phase."""

    genotype: Genotype | None = None
    results: dict[str, Any] = field(default_factory=dict)  # e.g. supernet_test_accuracy, supernet_params
    phase_times: list[float] = field(default_factory=list)  # seconds, one per finished phase

    def then(self, later: Handoff, elapsed: float) -> Handoff:
        """These phases followed by one that left ``later`` and ended ``elapsed`` s into the run."""
        return Handoff(
            later.genotype if later.genotype is not None else self.genotype,
            {**self.results, **later.results},
            [*self.phase_times, elapsed - sum(self.phase_times)],
        )

    def to_dict(self) -> dict[str, Any]:
        genotype = self.genotype.to_dict() if self.genotype is not None else None
        return {"genotype": genotype, "results": dict(self.results), "phase_times": list(self.phase_times)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Handoff:
        genotype = Genotype.from_dict(d["genotype"]) if d.get("genotype") else None
        if "results" not in d:  # a checkpoint from before phases: results and times side by side
            times = [d[k] for k in ("search_time_s", "retrain_time_s") if k in d]
            d = {
                "results": {k: v for k, v in d.items() if k not in ("genotype", "search_time_s", "retrain_time_s")},
                "phase_times": times,
            }
        return cls(genotype, dict(d["results"]), [float(t) for t in d["phase_times"]])


class Phase(ABC):
    """One stage of a run: its rounds, the state it starts from, each round's config, what it does
    with an aggregate, what it leaves for the next phase, and its final network."""

    # "search" (clients get the supernet) or "fixed" (a discrete network): with the method, the LOCAL_TRAINING key
    kind: str

    def __init__(self, name: str, rounds: int):
        self.name = name  # rounds.jsonl's "phase", and a seed stream of its initial model
        self.rounds = rounds
        self.masks: dict[str, torch.Tensor] = {}  # permanent masks, sent every round and checkpointed; none when fixed
        self.last: dict[str, Any] = {}  # the last round's metrics: repeated for a round without an aggregate

    @abstractmethod
    def start(self, previous: Handoff) -> None:
        """Build the model the phase starts from, from what the phases before it left."""

    @abstractmethod
    def initial_state(self) -> State:
        """The global model sent in the first round."""

    @abstractmethod
    def plan(self, server_round: int) -> RoundPlan:
        """What the server decides for ``server_round`` (1-based within the phase)."""

    def round_config(self, server_round: int) -> dict[str, Any]:
        """The round's plain values for the clients: the phase kind and the plan."""
        return {"phase": self.kind, **plan_to_config(self.plan(server_round))}

    def live_keys(self, names: list[str]) -> list[str]:
        """The global model's names this round's clients need (``transfer.live_keys``): all of them
        unless masks have dropped ops."""
        return names

    @abstractmethod
    def accept(self, server_round: int, state: State) -> dict[str, Any]:
        """Install the round's aggregate and return the round's metrics (also kept as ``last``)."""

    @abstractmethod
    def restore(self, state: State, masks: dict[str, torch.Tensor], last: dict[str, Any]) -> None:
        """Continue from a checkpoint: the global model, the masks, the last metrics."""

    @abstractmethod
    def final_network(self) -> nn.Module:
        """The network this phase would deploy if it were the last."""

    @abstractmethod
    def handoff(self) -> Handoff:
        """What this phase leaves for the next phase and the summary (its time is added by the loop)."""


class SearchPhase(Phase):
    """Supernet search (FedMetaNAS: Gumbel, MAML, soft pruning; FedNAS: softmax, MiLeNAS)."""

    kind = "search"

    def __init__(
        self,
        cfg: RunConfig,
        space: SpaceConfig,
        test: ImageData,
        device: torch.device,
        rounds: int,
        name: str = "search",
    ):
        super().__init__(name, rounds)
        self.cfg, self.space, self.test, self.device = cfg, space, test, device
        self.is_meta = cfg.method == "fedmetanas"
        self.anneal_rounds = min(cfg.discrete_round, rounds) if cfg.discrete_round else rounds
        self.schedule = TemperatureSchedule(
            cfg.tau_max, cfg.tau_min, self.anneal_rounds, cfg.tau_schedule, cfg.warmup_rounds
        )
        self.learning_rate = LearningRateSchedule.from_config(cfg, rounds)
        self.budget = budget_of(cfg)
        self.cost = check_feasible(cfg, space, image_hw(test))  # None without a budget

    def start(self, previous: Handoff) -> None:
        """A freshly initialised supernet (seeded by the run's seed): a search starts from nothing."""
        self.model = seeded_init(lambda: SearchModel(self.space), self.cfg.seed, self.name).to(self.device)
        self.genotype: Genotype = self.derive(self.arch_state(), {})  # defined even if no round aggregates

    def derive(self, arch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> Genotype:
        """The derived cell: the most likely one, within the budget when the run has one."""
        return derive_within(self.space, arch, masks, self.cost, self.budget)

    def initial_state(self) -> State:
        return state_arrays(self.model)

    def plan(self, server_round: int) -> RoundPlan:
        lr_w = self.learning_rate(server_round)
        cost = dict(cost=self.cost, budget=self.cfg.budget or None)  # the tables, and the budget they are for
        if not self.is_meta:  # FedNAS: plain softmax at temperature 1, nothing masked
            return RoundPlan(server_round, 1.0, False, {}, lr_w, **cost)
        frozen = server_round <= self.cfg.warmup_rounds
        return RoundPlan(server_round, self.schedule(server_round), frozen, dict(self.masks), lr_w, **cost)

    def discreteness(self, server_round: int) -> float:
        """0 until the warm-up ends, then linear to 1 at ``discrete-round`` (0 throughout when unset)."""
        if not self.cfg.discrete_round:
            return 0.0
        warm = self.cfg.warmup_rounds
        return min(max((server_round - warm) / max(self.anneal_rounds - warm, 1), 0.0), 1.0)

    def arch_state(self) -> dict[str, torch.Tensor]:
        return {ARCH_PREFIX + k: v.detach().cpu() for k, v in self.model.arch.state_dict().items()}

    def accept(self, server_round: int, state: State) -> dict[str, Any]:
        """Install the aggregate, grow the masks, evaluate supernet and derived network on the test set."""
        load_arrays(self.model, state)
        plan = self.plan(server_round)
        arch = self.arch_state()
        if self.is_meta and server_round >= self.cfg.mask_start_round:
            # with a budget the masks always keep the most likely cell that fits, so it survives to the end
            keep = choice_masks(self.space, self.derive(arch, self.masks), arch) if self.budget else None
            self.masks = update_masks(
                self.space,
                arch,
                self.masks,
                self.cfg.mask_threshold,
                self.cfg.tau_min,
                self.discreteness(server_round),
                keep,
            )
        self.genotype = self.derive(arch, self.masks)
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

    def live_keys(self, names: list[str]) -> list[str]:
        return live_keys(self.space, names, self.masks) if self.cfg.transfer == "live" else names

    def is_discrete(self) -> bool:
        return masks_are_discrete(self.space, self.arch_state().keys(), self.masks)

    def op_probabilities(self, arch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Per-edge softmax(alpha) with masks, for the heatmaps of how the architecture converged."""
        probs = {
            t: [
                [round(float(p), 5) for p in row]
                for row in probabilities(arch[arch_param_name("alpha", t)], self.masks.get(arch_param_name("alpha", t)))
            ]
            for t in CELL_TYPES
        }
        logits = {
            t: [[round(float(v), 4) for v in row] for row in arch[arch_param_name("alpha", t)]] for t in CELL_TYPES
        }
        edges = [edge_key(j, i) for j, i in self.space.topology.edges]
        return {
            "op-probs": probs,
            "alpha-logits": logits,
            "primitives": list(self.space.primitives),
            "edges": edges,
            "cell-decided": self.is_discrete(),
        }

    def restore(self, state: State, masks: dict[str, torch.Tensor], last: dict[str, Any]) -> None:
        load_arrays(self.model, state)
        self.masks = {k: v.to(torch.bool) for k, v in masks.items()}
        self.genotype = self.derive(self.arch_state(), self.masks)
        self.last = dict(last)

    @torch.no_grad()
    def evaluate_supernet(self, tau: float) -> dict[str, float]:
        settings = eval_settings(self.cfg, tau)
        return evaluate(lambda x: self.model(x, settings, self.masks), self.test, self.cfg.eval_batch_size, self.device)

    def derived_network(self) -> DiscreteNetwork:
        return DiscreteNetwork.inherit(self.model, self.genotype).to(self.device)

    def final_network(self) -> nn.Module:
        """The derived network with the searched weights: FedMetaNAS deploys it without retraining."""
        return self.derived_network()

    def handoff(self) -> Handoff:
        """The genotype, and the supernet's test accuracy at the last round's temperature and size."""
        supernet = self.evaluate_supernet(self.plan(self.rounds).tau)
        results = {"supernet_test_accuracy": supernet["accuracy"], "supernet_params": count_parameters(self.model.net)}
        return Handoff(self.genotype, results)


class FixedPhase(Phase):
    """FedAvg on a fixed network: the FedAvg baseline (a genotype, or the small CNN when None)."""

    kind = "fixed"

    def __init__(
        self,
        cfg: RunConfig,
        space: SpaceConfig,
        test: ImageData,
        device: torch.device,
        rounds: int,
        name: str,
        genotype: Genotype | None = None,
        local_epochs: int | None = None,
    ):
        super().__init__(name, rounds)
        self.cfg, self.space, self.test, self.device, self.genotype = cfg, space, test, device, genotype
        self.local_epochs = cfg.local_epochs if local_epochs is None else local_epochs
        self.learning_rate = LearningRateSchedule.from_config(cfg, rounds)

    def start(self, previous: Handoff) -> None:
        self.channels = fixed_network_width(self.cfg, self.space, image_hw(self.test), self.genotype)
        build = lambda: build_fixed_network(self.space, self.genotype, self.channels)  # noqa: E731
        self.net = seeded_init(build, self.cfg.seed, self.name).to(self.device)

    def initial_state(self) -> State:
        return state_arrays(self.net)

    def plan(self, server_round: int) -> RoundPlan:
        return RoundPlan(server_round, 1.0, False, {}, self.learning_rate(server_round), self.local_epochs)

    def round_config(self, server_round: int) -> dict[str, Any]:
        """The plan and the genotype ('' for the small CNN) the clients build the network from, and
        the CNN's width (a budget may have sized it)."""
        genotype = self.genotype.to_json() if self.genotype is not None else ""
        return {**super().round_config(server_round), "genotype": genotype, "cnn-channels": self.channels}

    def accept(self, server_round: int, state: State) -> dict[str, Any]:
        load_arrays(self.net, state)
        result = evaluate(self.net, self.test, self.cfg.eval_batch_size, self.device)
        self.last = {"tau": 1.0, "accuracy": result["accuracy"], "loss": result["loss"]}
        return self.last

    def restore(self, state: State, masks: dict[str, torch.Tensor], last: dict[str, Any]) -> None:
        load_arrays(self.net, state)
        self.last = dict(last)

    def final_network(self) -> nn.Module:
        return self.net

    def handoff(self) -> Handoff:
        return Handoff(self.genotype)


class RetrainPhase(FixedPhase):
    """FedNAS's second phase: the genotype the search left, trained from scratch with FedAvg."""

    def __init__(self, cfg: RunConfig, space: SpaceConfig, test: ImageData, device: torch.device, rounds: int):
        super().__init__(cfg, space, test, device, rounds, "retrain", None, cfg.retrain_local_epochs)

    def start(self, previous: Handoff) -> None:
        if previous.genotype is None:
            raise ValueError("retraining needs the genotype of a search phase before it")
        self.genotype = previous.genotype
        super().start(previous)


# ---------------------------------------------------------------------------------------------
# the planner: a method's phases, in order

Planner = Callable[[RunConfig, SpaceConfig, ImageData, torch.device], list[Phase]]


def _fedmetanas(cfg: RunConfig, space: SpaceConfig, test: ImageData, device: torch.device) -> list[Phase]:
    return [SearchPhase(cfg, space, test, device, cfg.num_server_rounds)]


def _fednas(cfg: RunConfig, space: SpaceConfig, test: ImageData, device: torch.device) -> list[Phase]:
    retrain = [RetrainPhase(cfg, space, test, device, cfg.retrain_rounds)] if cfg.retrain_rounds > 0 else []
    return [SearchPhase(cfg, space, test, device, cfg.num_server_rounds), *retrain]


def _fedavg(cfg: RunConfig, space: SpaceConfig, test: ImageData, device: torch.device) -> list[Phase]:
    genotype = Genotype.load_yaml(cfg.fedavg_genotype) if cfg.fedavg_genotype else None
    return [FixedPhase(cfg, space, test, device, cfg.num_server_rounds, "fedavg", genotype)]


PLANS: dict[str, Planner] = {"fedmetanas": _fedmetanas, "fednas": _fednas, "fedavg": _fedavg}


def plan_phases(cfg: RunConfig, space: SpaceConfig, test: ImageData, device: torch.device) -> list[Phase]:
    """The run's phases, in order; each is started (its model built) only when the run reaches it."""
    if cfg.tiers:
        from .tiered import tiered_phases  # tiered phases are made of these ones

        return tiered_phases(cfg, test, device)
    try:
        planner = PLANS[cfg.method]
    except KeyError:
        raise ValueError(f"no phases planned for method {cfg.method!r}: add it to phases.PLANS") from None
    return planner(cfg, space, test, device)

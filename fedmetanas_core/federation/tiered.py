"""One search, one network per device tier, Flower-free: what is shared between tiers and what is not.

- **Shared: the weights.** Each tier's space is sized to its budget (``init-channels = 0``), so tiers
  differ in width; the run keeps one set of weights at the widest tier's width and every tier's
  network is a slice of it (``method.width_slices``). The server averages each element over every
  client that trained it, whatever its tier, so the small tiers' channels learn from every client
  and the large tiers' extra channels from the clients that can run them (HeteroFL's rule, here over
  a supernet: a pruned op's weights are averaged over the clients that still had it).
- **Per tier: the architecture.** Each tier has its own alphas and betas, masks, temperature, cost
  model and budget: its own ``SearchPhase`` (FedMetaNAS) or ``FixedPhase`` (FedAvg on the small CNN
  as wide as the tier's budget allows: the HeteroFL baseline). A tier's architecture is averaged
  over its own clients only: a phone and a microcontroller need different cells.
- **At the end** each tier derives its network within its budget and inherits the shared weights:
  no retraining stage.

Why not one width for all: at a shared width the cell choice spans only 2-6x in MACs (stem, 1x1
preprocessing and classifier are paid whatever the cell), short of the 8x and more between a
microcontroller and a phone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from ..data import ImageData
from ..method.aggregation import State, weighted_average
from ..method.budget import sized_space
from ..method.tiers import Tier, run_tiers, smaller_tier_index, smaller_tier_prefix, split_smaller_tiers
from ..method.training import space_from_config
from ..method.width_slices import aggregate_slices, narrow_state
from ..names import is_arch
from ..run.config import ConfigError, RunConfig
from ..space import SpaceConfig
from .coordinator import image_hw, model_config
from .phases import FixedPhase, Handoff, Phase, SearchPhase


def tier_prefix(index: int) -> str:
    """Where tier ``index``'s architecture and masks live in the run's state and checkpoint."""
    return f"tier{index}/"


TIER_KEY = re.compile(r"^tier\d+/")


def is_shared(name: str) -> bool:
    """A shared weight's name in the run's state (not a tier's architecture)."""
    return not is_arch(name) and not TIER_KEY.match(name)


def phase_width(phase: Phase) -> int:
    """The width the phase's network scales with: the space's channels, or the small CNN's."""
    if isinstance(phase, FixedPhase) and phase.genotype is None:
        return phase.channels
    return phase.space.init_channels


class TieredPhase(Phase):
    """The tiers' phases (smallest budget first) over one set of weights; the server sends each
    client its tier's ``tier_round`` and aggregates with ``aggregate``."""

    def __init__(self, cfg: RunConfig, tiers: list[Tier], phases: list[Phase]):
        # not Phase.__init__: the masks are the tiers' (a property)
        self.name, self.rounds, self.last = phases[-1].name, phases[-1].rounds, {}
        self.kind = phases[0].kind
        self.cfg, self.tiers, self.phases = cfg, tiers, phases
        self.train_smaller = cfg.train_smaller_tiers

    # -- the shared weights and each tier's view of them

    def start(self, previous: Handoff) -> None:
        """Every tier's model, then one initialisation for all: the widest tier's, each tier a slice."""
        for tier, phase in zip(self.tiers, self.phases, strict=True):
            with naming_tiers(self.cfg, tier):  # the small CNN's width: found here
                phase.start(previous)
        self.widths = [phase_width(p) for p in self.phases]
        self.wide_width = max(self.widths)
        states = [p.initial_state() for p in self.phases]
        self.shapes = [{k: tuple(v.shape) for k, v in own.items()} for own in states]
        shared = self.shared_weights()
        for i, (phase, own) in enumerate(zip(self.phases, states, strict=True)):
            phase.restore({**own, **self.narrow(i, shared)}, phase.masks, {})

    def shared_weights(self) -> State:
        """The weights as the widest tier holds them: the run's one set (``initial_state`` reads the live model)."""
        widest = self.phases[self.widths.index(self.wide_width)]
        return {k: v for k, v in widest.initial_state().items() if not is_arch(k)}

    def narrow(self, i: int, shared: State, keys: list[str] | None = None) -> State:
        weights = [k for k in self.shapes[i] if not is_arch(k)] if keys is None else keys
        return narrow_state(shared, self.shapes[i], self.widths[i], self.wide_width, weights)

    def tier_state(self, i: int, state: State) -> State:
        """Tier ``i``'s whole state (its slice of the weights, its architecture) from the run's."""
        prefix = tier_prefix(i)
        arch = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        return {**self.narrow(i, state), **arch}

    def initial_state(self) -> State:
        """The shared weights (the widest tier's) and every tier's architecture, prefixed by tier."""
        out = self.shared_weights()
        for i, phase in enumerate(self.phases):
            out.update({tier_prefix(i) + k: v for k, v in phase.initial_state().items() if is_arch(k)})
        return out

    # -- a round

    def tier_round(self, i: int, server_round: int, state: State) -> tuple[dict[str, Any], State]:
        """What tier ``i``'s clients get: its round config (its width, plan, masks, cost model) and
        its live arrays; with ``train-smaller-tiers`` also every smaller tier's, under its prefix,
        with that tier's architecture frozen (a tier's architecture is its own clients')."""
        config, arrays = self.own_round(i, server_round, state)
        if self.train_smaller:
            for j in range(i):
                sub_config, sub_arrays = self.own_round(j, server_round, state)
                prefix = smaller_tier_prefix(j)
                config.update({prefix + k: v for k, v in {**sub_config, "alpha-frozen": True}.items()})
                arrays.update({prefix + k: v for k, v in sub_arrays.items()})
        return config, arrays

    def own_round(self, i: int, server_round: int, state: State) -> tuple[dict[str, Any], State]:
        phase = self.phases[i]
        own = self.tier_state(i, state)
        config = {**model_config(phase.space), **phase.round_config(server_round)}  # a CNN's width: cnn-channels
        return config, {k: own[k] for k in phase.live_keys(list(own))}

    def plan(self, server_round: int):
        """The largest tier's plan (a skipped round's row reads its temperature)."""
        return self.phases[-1].plan(server_round)

    def round_config(self, server_round: int) -> dict[str, Any]:
        raise TypeError("a tiered phase sends each tier its own round (tier_round)")

    def aggregate(self, state: State, replies: list[tuple[int, State, float]]) -> State:
        """The run's next state from (tier, arrays, examples) replies: each weight element over every
        network that trained it (a node's own and the smaller tiers' it trained), each tier's
        architecture over its own clients."""
        weights, archs = [], []
        for i, reply, n in replies:
            _, own, smaller = split_smaller_tiers({}, reply)
            weights.append(({k: v for k, v in own.items() if not is_arch(k)}, self.widths[i], n))
            archs.append((i, {k: v for k, v in own.items() if is_arch(k)}, n))
            for prefix, _, sub in smaller:
                j = smaller_tier_index(prefix)
                weights.append(({k: v for k, v in sub.items() if not is_arch(k)}, self.widths[j], n))
        shared = {k: v for k, v in state.items() if is_shared(k)}
        out = {**state, **aggregate_slices(shared, weights, self.wide_width)}
        for i in range(len(self.phases)):
            mine = [(a, n) for t, a, n in archs if t == i]
            if mine:
                arch = weighted_average([a for a, _ in mine], [n for _, n in mine])
                out.update({tier_prefix(i) + k: v for k, v in arch.items()})
        return out

    def accept(self, server_round: int, state: State) -> dict[str, Any]:
        """Every tier installs its part (masks, derivation, test accuracy); the round's row is the
        largest tier's with each tier's accuracy beside it."""
        rows = [phase.accept(server_round, self.tier_state(i, state)) for i, phase in enumerate(self.phases)]
        self.last = {**rows[-1], "tiers": self.tier_rows(rows)}
        return self.last

    def tier_rows(self, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        keys = ("accuracy", "loss", "supernet-accuracy", "skip-count")
        return {t.name: {k: row[k] for k in keys if k in row} for t, row in zip(self.tiers, rows, strict=True)}

    # -- checkpoints and the end of the run

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        return {tier_prefix(i) + k: v for i, p in enumerate(self.phases) for k, v in p.masks.items()}

    def restore(self, state: State, masks: dict[str, torch.Tensor], last: dict[str, Any]) -> None:
        for i, phase in enumerate(self.phases):
            prefix = tier_prefix(i)
            mine = {k[len(prefix) :]: v for k, v in masks.items() if k.startswith(prefix)}
            phase.restore(self.tier_state(i, state), mine, {})
        self.last = dict(last)

    def final_network(self) -> nn.Module:
        return self.phases[-1].final_network()

    def tier_networks(self) -> list[nn.Module]:
        """Each tier's deployed network, inheriting the shared weights (no retraining)."""
        return [phase.final_network() for phase in self.phases]

    def handoff(self) -> Handoff:
        last = self.phases[-1].handoff()
        genotypes = {
            t.name: p.genotype.to_dict() if p.genotype is not None else None
            for t, p in zip(self.tiers, self.phases, strict=True)
        }
        return Handoff(last.genotype, {**last.results, "tier_genotypes": genotypes})


def tier_config(cfg: RunConfig, tier: Tier) -> RunConfig:
    """The run's config as one tier sees it: a run with the tier's budget."""
    return cfg.replace(
        budget=tier.budget, tiers="", tier_shares="", only_tier=-1, train_smaller_tiers=True, tier_distill=0.0
    )


@contextmanager
def naming_tiers(cfg: RunConfig, tier: Tier) -> Iterator[None]:
    """A tier's budget that nothing fits is a bad ``tiers`` value: say which tier and why."""
    try:
        yield
    except ConfigError as exc:
        if exc.key not in ("budget", "init-channels"):
            raise
        raise ConfigError("tiers", cfg.tiers, f"tier {tier.budget}: {exc.allowed}") from None


def tier_space(tcfg: RunConfig, test: ImageData) -> SpaceConfig:
    """A tier's space (``tcfg``: its ``tier_config``): sized to its budget with ``init-channels = 0``,
    else the run's width."""
    return sized_space(tcfg, space_from_config(tcfg, test.num_classes, test.in_channels), image_hw(test))


def tiered_phases(cfg: RunConfig, test: ImageData, device: torch.device) -> list[Phase]:
    """FedMetaNAS: one tiered search; FedAvg: the small CNN per tier (HeteroFL)."""
    tiers = run_tiers(cfg)
    phases: list[Phase] = []
    for tier in tiers:
        with naming_tiers(cfg, tier):
            tcfg = tier_config(cfg, tier)
            space = tier_space(tcfg, test)
            if cfg.method == "fedmetanas":
                phases.append(SearchPhase(tcfg, space, test, device, cfg.num_server_rounds))
            elif cfg.method == "fedavg":
                phases.append(FixedPhase(tcfg, space, test, device, cfg.num_server_rounds, "fedavg"))
            else:
                raise ValueError(f"tiers do not apply to {cfg.method!r}")
    return [TieredPhase(cfg, tiers, phases)]

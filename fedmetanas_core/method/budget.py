"""A run's cost budget: what it limits, the cost term of the architecture loss, the width of the
space it sizes, and the most likely cell within it.

``budget = "macs:200000"`` (or ``params:...``, ``latency-ms:...`` with ``latency-table``) limits the
derived network. Three things follow from it:

- **the cost term** (``Budget.penalty``): ``budget-weight`` x |E[cost] / limit - 1| (``target``, as
  TuNAS: the search spends the budget, neither over nor far under it) or x max(0, E[cost] / limit - 1)
  (``hinge``: only over it), with E[cost] the expected cost under the relaxed op and input-pair
  probabilities (``space.cost``). It enters every architecture loss: the MAML task learner's and
  the meta learner's (FedMetaNAS), and FedNAS's alpha step;
- **the width** (``init-channels = 0``): the widest space whose expected cost under uniform op and
  pair probabilities (the search's starting point) is within the limit. So a larger budget buys a
  wider space, with the cell search trading cheap and expensive ops inside it (README, "Searching
  for a device");
- **derivation** (``most_likely_within``): the most likely cell whose cost is within the limit, an
  exact search when the most likely cell overall is over it. The server's discrete masks keep this
  cell, so the network trained from the discrete round on is the one that fits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from ..names import CELL_TYPES, arch_param_name
from ..run.config import RunConfig
from ..run.config_keys import ConfigError, parse_budget
from ..space import CellTopology, SpaceConfig
from ..space.cost import CostModel, counted_cost_model
from ..space.relaxation import probabilities
from .genotype import Genotype, derive_genotype, random_genotype

MAX_AUTO_CHANNELS = 256
RANDOM_CELL_TRIES = 20_000


def within(cost: float, limit: float) -> bool:
    """``cost <= limit`` up to float rounding (a sum of table entries may land a hair over)."""
    return cost <= limit * (1 + 1e-9)


def widest(fits: Callable[[int], bool]) -> int | None:
    """The largest width in 1..MAX_AUTO_CHANNELS for which ``fits`` holds (cost grows with width,
    so the first that does not ends the search); None when not even 1 does."""
    best = None
    for c in range(1, MAX_AUTO_CHANNELS + 1):
        if not fits(c):
            break
        best = c
    return best


@dataclass(frozen=True)
class Budget:
    kind: str  # one of space.cost.COST_KINDS
    limit: float
    weight: float = 1.0
    penalty_kind: str = "target"

    def penalty(self, expected: torch.Tensor) -> torch.Tensor:
        ratio = expected / self.limit - 1.0
        term = ratio.abs() if self.penalty_kind == "target" else ratio.clamp_min(0.0)
        return self.weight * term

    def fits(self, cost: float) -> bool:
        return within(cost, self.limit)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "limit": self.limit, "weight": self.weight, "penalty": self.penalty_kind}


def budget_of(cfg: RunConfig, limit: str | None = None) -> Budget | None:
    """The run's budget, or ``limit`` (KIND:LIMIT: a tier's, as the server sends it) with the run's
    weight and penalty."""
    parsed = parse_budget(cfg.budget if limit is None else limit)
    if parsed is None:
        return None
    return Budget(parsed[0], parsed[1], cfg.budget_weight, cfg.budget_penalty)


# ---------------------------------------------------------------------------------------------
# the cost model of a run and the width it sizes


def cost_model(cfg: RunConfig, space: SpaceConfig, image_hw: tuple[int, int], kind: str | None = None) -> CostModel:
    """The run's cost model of ``kind`` (default: its budget's): counted, or its latency table."""
    kind = kind or budget_of(cfg).kind
    if kind != "latency-ms":
        return counted_cost_model(space, image_hw, kind)
    return latency_table(cfg, space, image_hw).cost_model(space, image_hw)


def latency_tables(cfg: RunConfig) -> list:
    """Every table ``latency-table`` names (one per width it was measured at)."""
    from ..deployment.latency import LatencyTable

    if not cfg.latency_table_paths:
        raise ConfigError(
            "latency-table", "", "a latency-ms budget needs a table measured on the device (fedmetanas profile)"
        )
    tables = []
    for path in cfg.latency_table_paths:
        try:
            tables.append(LatencyTable.load(path))
        except ValueError as exc:
            raise ConfigError("latency-table", cfg.latency_table, str(exc)) from None
    return tables


def latency_table(cfg: RunConfig, space: SpaceConfig, image_hw: tuple[int, int]):
    """The run's latency table for ``space`` at ``image_hw`` (of several, the one measured for it)."""
    tables = latency_tables(cfg)
    for table in tables:
        if table.mismatch(space, image_hw) is None:
            return table
    if len(tables) == 1:
        raise ConfigError("latency-table", cfg.latency_table, tables[0].mismatch(space, image_hw))
    widths = ", ".join(str(t.data["space"].get("init_channels")) for t in tables)
    raise ConfigError(
        "latency-table",
        cfg.latency_table,
        f"none of its tables was measured for this space (init-channels {space.init_channels}; the tables' widths "
        f"{widths}); run `fedmetanas profile` for it",
    )


def uniform_expected_cost(model: CostModel) -> float:
    """E[cost] with every op and input pair equally likely (where a search starts)."""
    topo = CellTopology(model.num_nodes)
    arch = {}
    for t in CELL_TYPES:
        arch[arch_param_name("alpha", t)] = torch.zeros(len(topo.edges), len(model.primitives))
        for j in topo.nodes:
            arch[arch_param_name("beta", t, j)] = torch.zeros(len(topo.pairs(j)))
    return float(model.expected_cost(arch))


def sized_space(cfg: RunConfig, space: SpaceConfig, image_hw: tuple[int, int]) -> SpaceConfig:
    """``space``, or with ``init-channels = 0`` the widest one whose uniform expected cost fits the
    budget (the narrowest, 1 channel, when none does: derivation then still finds the cells that fit)."""
    if space.init_channels > 0:
        return space
    budget = budget_of(cfg)
    if budget.kind == "latency-ms":
        return latency_sized_space(cfg, space, image_hw, budget)
    best = widest(
        lambda c: budget.fits(
            uniform_expected_cost(counted_cost_model(_with_channels(space, c), image_hw, budget.kind))
        )
    )
    return _with_channels(space, best or 1)


def latency_sized_space(cfg: RunConfig, space: SpaceConfig, image_hw: tuple[int, int], budget: Budget) -> SpaceConfig:
    """The widest of the latency tables' widths whose uniform expected latency fits the budget (the
    narrowest when none does). At small images a cell's latency is mostly per-op cost, so a wider
    space can cost little more time (docs/results-frontier.md, "Latency budgets")."""
    fitting, widths = [], []
    for table in latency_tables(cfg):
        candidate = _with_channels(space, int(table.data["space"].get("init_channels", 0)))
        if candidate.init_channels < 1 or table.mismatch(candidate, image_hw) is not None:
            continue
        widths.append(candidate.init_channels)
        if budget.fits(uniform_expected_cost(table.cost_model(candidate, image_hw))):
            fitting.append(candidate.init_channels)
    if not widths:
        raise ConfigError(
            "latency-table", cfg.latency_table, "no table was measured for this space at any width (fedmetanas profile)"
        )
    return _with_channels(space, max(fitting, default=min(widths)))


def _with_channels(space: SpaceConfig, channels: int) -> SpaceConfig:
    from dataclasses import replace

    return replace(space, init_channels=channels)


def check_feasible(cfg: RunConfig, space: SpaceConfig, image_hw: tuple[int, int]) -> CostModel | None:
    """The run's cost model, or a ConfigError naming ``budget`` when not even the cheapest cell fits."""
    budget = budget_of(cfg)
    if budget is None:
        return None
    model = cost_model(cfg, space, image_hw)
    cheapest, dearest = model.extremes()
    if not budget.fits(cheapest):
        raise ConfigError(
            "budget",
            cfg.budget,
            f"no network of this space fits: the cheapest cell costs {cheapest:.6g} {budget.kind} "
            f"(space from {cheapest:.6g} to {dearest:.6g}; init-channels {space.init_channels})",
        )
    return model


# ---------------------------------------------------------------------------------------------
# derivation within the budget


@dataclass(frozen=True)
class _Option:
    logp: float
    cost: float
    choice: tuple[tuple[str, int], ...]  # ((op, input), (op, input))


def random_genotype_within(space: SpaceConfig, model: CostModel, limit: float, seed: int) -> Genotype | None:
    """A cell drawn uniformly from ``space`` among those costing at most ``limit`` (rejection sampling
    over the draws ``seed * RANDOM_CELL_TRIES + k``): the NAS sanity baseline at equal cost. None
    when no draw fits."""
    for k in range(RANDOM_CELL_TRIES):
        genotype = random_genotype(space.primitives, space.num_nodes, seed * RANDOM_CELL_TRIES + k)
        if model.genotype_cost(genotype) <= limit:
            return genotype
    return None


def most_likely_within(
    space: SpaceConfig,
    arch: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    model: CostModel,
    limit: float,
) -> Genotype | None:
    """The genotype of highest probability (product of its op and input-pair probabilities, masks
    applied) whose cost is <= ``limit``; None when none is. When the unconstrained most likely cell
    fits, that is ``derive_genotype``'s cell, so a generous budget changes nothing.

    Exact: a node's options are its (input pair, op, op) choices, only the Pareto-optimal ones
    (no other option both more likely and cheaper) are kept, and a best-first branch and bound over
    the nodes of both cell types prunes with the remaining nodes' best probability and least cost.
    """
    masks = masks or {}
    standard = derive_genotype(space, arch, masks)
    if within(model.genotype_cost(standard), limit):
        return standard
    groups: list[tuple[str, int, list[_Option]]] = []
    for cell_type in CELL_TYPES:
        for j in space.topology.nodes:
            groups.append((cell_type, j, _pareto(_node_options(space, arch, masks, model, cell_type, j))))
    if any(not g[2] for g in groups):
        return None
    min_cost_after = [0.0] * (len(groups) + 1)
    max_logp_after = [0.0] * (len(groups) + 1)
    for k in range(len(groups) - 1, -1, -1):
        min_cost_after[k] = min_cost_after[k + 1] + min(o.cost for o in groups[k][2])
        max_logp_after[k] = max_logp_after[k + 1] + max(o.logp for o in groups[k][2])
    best: tuple[float, list[_Option]] | None = None
    # depth-first, most likely option first: the first complete assignment is a good incumbent
    stack: list[tuple[int, float, float, list[_Option]]] = [(0, 0.0, 0.0, [])]
    while stack:
        k, logp, cost, chosen = stack.pop()
        if best is not None and logp + max_logp_after[k] <= best[0]:
            continue
        if k == len(groups):
            best = (logp, chosen)
            continue
        for opt in sorted(groups[k][2], key=lambda o: o.logp):  # pushed least likely first: popped last
            if not within(model.fixed + cost + opt.cost + min_cost_after[k + 1], limit):
                continue
            stack.append((k + 1, logp + opt.logp, cost + opt.cost, [*chosen, opt]))
    if best is None:
        return None
    cells: dict[str, list] = {t: [] for t in CELL_TYPES}
    for (cell_type, _, _), opt in zip(groups, best[1], strict=False):
        cells[cell_type].append(opt.choice)
    return Genotype(**{t: tuple(cells[t]) for t in CELL_TYPES})


def _node_options(space, arch, masks, model: CostModel, cell_type: str, j: int) -> list[_Option]:
    name = arch_param_name("alpha", cell_type)
    op_p = probabilities(arch[name], masks.get(name))
    table = model.edge[cell_type]
    real = [o for o, p in enumerate(space.primitives) if p != "none"]
    first = model.edge_index(j, 0)
    if space.input_pruning:
        bname = arch_param_name("beta", cell_type, j)
        pair_p = probabilities(arch[bname], masks.get(bname)).tolist()
    else:  # DARTS's rule: any two inputs, equally likely a priori
        pair_p = [1.0] * (j * (j - 1) // 2)
    per_edge = []
    for i in range(j):
        row = [
            (math.log(float(op_p[first + i, o])), float(table[first + i, o]), o)
            for o in real
            if float(op_p[first + i, o]) > 0
        ]
        per_edge.append(_pareto_pairs(row))
    options = []
    for p, (a, b) in enumerate(combinations(range(j), 2)):
        if pair_p[p] <= 0:
            continue
        for la, ca, oa in per_edge[a]:
            for lb, cb, ob in per_edge[b]:
                choice = ((space.primitives[oa], a), (space.primitives[ob], b))
                options.append(_Option(math.log(pair_p[p]) + la + lb, ca + cb, choice))
    return options


def _pareto_pairs(rows: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """(logp, cost, op) rows no other row beats on both (ties keep the first)."""
    rows = sorted(rows, key=lambda r: (r[1], -r[0]))
    out, best_logp = [], -math.inf
    for r in rows:
        if r[0] > best_logp:
            out.append(r)
            best_logp = r[0]
    return out


def _pareto(options: list[_Option]) -> list[_Option]:
    kept = _pareto_pairs([(o.logp, o.cost, n) for n, o in enumerate(options)])
    return [options[n] for _, _, n in kept]


def choice_masks(space: SpaceConfig, genotype: Genotype, arch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per architecture tensor, the index each row must keep for ``genotype`` (-1: no preference):
    the chosen op of every edge a node reads, and each node's input pair."""
    keep: dict[str, torch.Tensor] = {}
    pairs_of = {j: list(combinations(range(j), 2)) for j in space.topology.nodes}
    for cell_type in CELL_TYPES:
        name = arch_param_name("alpha", cell_type)
        rows = torch.full((arch[name].shape[0],), -1, dtype=torch.long)
        e0 = 0
        for j, node in zip(space.topology.nodes, genotype.cell(cell_type), strict=False):
            for op, src in node:
                rows[e0 + src] = space.primitives.index(op)
            if space.input_pruning:
                inputs = tuple(sorted(src for _, src in node))
                keep[arch_param_name("beta", cell_type, j)] = torch.tensor([pairs_of[j].index(inputs)])
            e0 += j
        keep[name] = rows
    return keep


def derive_within(
    space: SpaceConfig,
    arch: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None,
    model: CostModel | None,
    budget: Budget | None,
) -> Genotype:
    """``derive_genotype``, or with a budget the most likely cell within it (the run checked up front
    that one exists; masks keep one, so a missing one is a bug and raises)."""
    if budget is None or model is None:
        return derive_genotype(space, arch, masks)
    genotype = most_likely_within(space, arch, masks, model, budget.limit)
    if genotype is None:
        raise RuntimeError(f"no cell within the budget {budget.kind}:{budget.limit:g} under the current masks")
    return genotype


def image_shape(cfg: RunConfig) -> tuple[int, tuple[int, int], int] | None:
    """(in_channels, (height, width), num_classes) known without loading data, or None (hf, or an
    imagefolder at native size): the ServerApp checks those once it has the test set."""
    static = {
        "digits": (1, 8, 10),
        "mnist": (1, 28, 10),
        "fashion-mnist": (1, 28, 10),
        "cifar10": (3, 32, 10),
        "cifar100": (3, 32, 100),
    }
    if cfg.dataset in static:
        channels, size, classes = static[cfg.dataset]
        size = cfg.image_size or size
        return channels, (size, size), classes
    if cfg.dataset == "imagefolder" and cfg.image_size and cfg.data_dir:
        train = Path(cfg.data_dir) / "train"
        if train.is_dir():
            classes = sum(1 for p in train.iterdir() if p.is_dir())
            return 3, (cfg.image_size, cfg.image_size), classes  # image files are decoded to RGB
    return None


# ---------------------------------------------------------------------------------------------
# fixed networks (FedAvg's baselines, FedNAS's retraining) under the budget


def network_cost(net: torch.nn.Module, kind: str, image_hw: tuple[int, int], in_channels: int) -> float:
    """A whole network's MACs (counted) or parameters."""
    from ..space.cost import count_macs
    from .genotype import count_parameters

    if kind == "params":
        return float(count_parameters(net))
    return float(count_macs(net, torch.zeros(1, in_channels, *image_hw)))


def cnn_width_within(space: SpaceConfig, kind: str, limit: float, image_hw: tuple[int, int]) -> int | None:
    """The widest small CNN (FedAvg's family, ``genotype.SimpleCNN``) within ``limit``; None if none."""
    from .genotype import SimpleCNN

    return widest(lambda c: within(network_cost(SimpleCNN(space, c), kind, image_hw, space.in_channels), limit))


def fixed_network_width(
    cfg: RunConfig, space: SpaceConfig, image_hw: tuple[int, int], genotype: Genotype | None
) -> int:
    """The small CNN's width (``fedavg-channels``; with a budget and 0, the widest within it), after
    checking that the fixed network is within the budget: a baseline over it would compare unequal costs."""
    budget = budget_of(cfg)
    if budget is None:
        return cfg.fedavg_channels
    if genotype is not None:
        cost = cost_model(cfg, space, image_hw).genotype_cost(genotype)
        if not budget.fits(cost):
            raise ConfigError(
                "fedavg-genotype",
                cfg.fedavg_genotype or "(searched)",
                f"costs {cost:.6g} {budget.kind}, over the budget {budget.limit:g}",
            )
        return cfg.fedavg_channels
    if budget.kind == "latency-ms":
        return cnn_width_within_latency(cfg, latency_table(cfg, space, image_hw), budget.limit)
    if cfg.fedavg_channels:
        from .genotype import SimpleCNN

        cost = network_cost(SimpleCNN(space, cfg.fedavg_channels), budget.kind, image_hw, space.in_channels)
        if not budget.fits(cost):
            raise ConfigError(
                "fedavg-channels",
                cfg.fedavg_channels,
                f"the CNN costs {cost:.6g} {budget.kind}, over the budget {budget.limit:g}",
            )
        return cfg.fedavg_channels
    width = cnn_width_within(space, budget.kind, budget.limit, image_hw)
    if width is None:
        raise ConfigError("budget", cfg.budget, f"not even a 1-channel CNN fits ({budget.kind})")
    return width


def cnn_width_within_latency(cfg: RunConfig, table, limit: float) -> int:
    """The small CNN's width under a latency budget, from the table's measured CNN entries."""
    timed = table.cnn_ms()
    if not timed:
        raise ConfigError(
            "latency-table",
            cfg.latency_table,
            "has no entries for the small CNN (profiled before they were added): "
            "fedmetanas profile --add-cnn --out TABLE adds them",
        )
    if cfg.fedavg_channels:
        if cfg.fedavg_channels not in timed:
            widths = ", ".join(map(str, sorted(timed)))
            raise ConfigError(
                "fedavg-channels", cfg.fedavg_channels, f"the latency table times the CNN at widths {widths}"
            )
        if not within(timed[cfg.fedavg_channels], limit):
            ms = timed[cfg.fedavg_channels]
            raise ConfigError(
                "fedavg-channels", cfg.fedavg_channels, f"the CNN takes {ms:.4g} ms, over the budget {limit:g}"
            )
        return cfg.fedavg_channels
    width = max((w for w, ms in timed.items() if within(ms, limit)), default=None)
    if width is None:
        raise ConfigError("budget", cfg.budget, "not even the narrowest CNN the latency table times fits")
    return width


def known_run_space(cfg: RunConfig) -> tuple[SpaceConfig, tuple[int, int]] | None:
    """The run's space (sized to its budget with ``init-channels = 0``) and image size when the
    dataset's shape is known without loading it (``image_shape``), else None."""
    from .training import space_from_config

    shape = image_shape(cfg)
    if shape is None:
        return None
    channels, image_hw, classes = shape
    return sized_space(cfg, space_from_config(cfg, classes, channels), image_hw), image_hw


def run_space(cfg: RunConfig) -> tuple[SpaceConfig, tuple[int, int]]:
    """``known_run_space``, or where that needs the data, from the run's test split."""
    known = known_run_space(cfg)
    if known is not None:
        return known
    from ..data import DataSpec, load_test_set
    from ..federation.coordinator import image_hw, space_for_run

    test = load_test_set(DataSpec.from_config(cfg))
    return space_for_run(cfg, test), image_hw(test)


def cost_report(cfg: RunConfig, space: SpaceConfig, image_hw: tuple[int, int], net: torch.nn.Module) -> dict[str, Any]:
    """What the deployed network costs, for summary.json and export.json: its budget, MACs (counted),
    parameters and measured latency (batch 1, one thread, ONNX Runtime where installed, this CPU),
    and whether it is within the budget (a latency budget is checked on the table's prediction, the
    number the search saw; the measurement is reported beside it, also rescaled to the machine's
    speed when the table was measured, ``latency_against_table``)."""
    from ..deployment.latency import (
        default_runtime,
        latency_against_table,
        model_latency_ms,
        runtime_version,
    )

    budget = budget_of(cfg)
    macs = network_cost(net, "macs", image_hw, space.in_channels)
    params = network_cost(net, "params", image_hw, space.in_channels)
    # a latency budget's table fixes the runtime, and its networks are timed beside this one
    table = latency_table(cfg, space, image_hw) if budget is not None and budget.kind == "latency-ms" else None
    runtime = table.runtime if table is not None else default_runtime()
    report: dict[str, Any] = {
        "budget": budget.describe() if budget else None,
        "init_channels": space.init_channels,
        "macs": macs,
        "params": params,
    }
    try:  # reported, never fatal: the numeric results matter more
        if table is not None:  # comparable with the budget on a drifting machine
            report.update(latency_against_table(net, table, space, image_hw, runtime))
        else:
            report["latency_ms"] = model_latency_ms(net, torch.zeros(1, space.in_channels, *image_hw), runtime)
        report["latency_measured_with"] = f"{runtime_version(runtime)}, batch 1, one thread, median, this machine"
    except Exception as exc:
        report["latency_ms"], report["latency_measured_with"] = None, f"not measured: {type(exc).__name__}: {exc}"
    if budget is not None:
        genotype = getattr(net, "genotype", None)
        if table is not None:
            if genotype is not None:
                predicted = table.cost_model(space, image_hw).genotype_cost(genotype)
            else:  # the small CNN: the table's measurement of it
                predicted = table.cnn_ms().get(getattr(net, "channels", 0))
            report["latency_predicted_ms"] = predicted
            spent = predicted
        else:
            spent = macs if budget.kind == "macs" else params
        report["budget_used"] = None if spent is None else spent / budget.limit
        report["within_budget"] = None if spent is None else budget.fits(spent)
    return report

"""The discrete architecture: derivation from architecture logits, serialisation, and the network.

Derivation works on per-edge softmax probabilities and never picks ``none`` (the DARTS rule; raw
logits or ``none`` pick the wrong edges). With input pruning each node keeps the input pair with the
largest beta probability; without it, the DARTS rule keeps the two strongest incoming edges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from ..names import CELL_TYPES, arch_param_name, edge_key
from ..space import CellBase, SearchModel, SpaceConfig, cat_channels, cell_plan, make_op, to_fast_layout
from ..space.ops import norm_layer
from ..space.relaxation import probabilities
from ..util.atomic import atomic_write_text

NodeChoice = tuple[tuple[str, int], ...]  # ((op, input node), (op, input node))


@dataclass(frozen=True)
class Genotype:
    normal: tuple[NodeChoice, ...]
    reduce: tuple[NodeChoice, ...]

    def cell(self, cell_type: str) -> tuple[NodeChoice, ...]:
        return self.normal if cell_type == "normal" else self.reduce

    def to_dict(self) -> dict:
        def rows(cell):
            return [[{"op": op, "input": src} for op, src in node] for node in cell]

        return {t: rows(self.cell(t)) for t in CELL_TYPES}

    @classmethod
    def from_dict(cls, d: dict) -> Genotype:
        def cell(rows):
            return tuple(tuple((str(e["op"]), int(e["input"])) for e in node) for node in rows)

        return cls(**{t: cell(d[t]) for t in CELL_TYPES})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        return cls.from_dict(json.loads(text))

    def save_yaml(self, path: str | Path) -> None:
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> Genotype:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for cell in (self.normal, self.reduce):
            for node in cell:
                for op, _ in node:
                    counts[op] = counts.get(op, 0) + 1
        return counts


def derive_genotype(
    space: SpaceConfig,
    arch_state: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor] | None = None,
) -> Genotype:
    """Genotype from architecture logits (keys as in ``SearchModel.state_dict()``: ``arch.*``)."""
    masks = masks or {}
    topo = space.topology
    real = [o for o, p in enumerate(space.primitives) if p != "none"]
    cells = {}
    for cell_type in CELL_TYPES:
        name = arch_param_name("alpha", cell_type)
        op_probs = probabilities(arch_state[name], masks.get(name))
        nodes = []
        e = 0
        for j in topo.nodes:
            block = op_probs[e : e + j][:, real]  # [inputs, real ops]
            best_p, best_o = block.max(dim=1)
            if space.input_pruning:
                bname = arch_param_name("beta", cell_type, j)
                pair_probs = probabilities(arch_state[bname], masks.get(bname))
                inputs = topo.pairs(j)[int(pair_probs.argmax())]
            else:
                inputs = tuple(sorted(best_p.topk(min(2, j)).indices.tolist()))
            nodes.append(tuple((space.primitives[real[int(best_o[i])]], int(i)) for i in inputs))
            e += j
        cells[cell_type] = tuple(nodes)
    return Genotype(**cells)


class _Edge(nn.Module):
    """Holds the one chosen op under the same key path as the supernet's edge (``ops.<name>``)."""

    def __init__(self, op_name: str, c: int, stride: int, norm: str):
        super().__init__()
        self.ops = nn.ModuleDict({op_name: make_op(op_name, c, stride, norm)})
        self.op_name = op_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops[self.op_name](x)


class DiscreteCell(CellBase):
    def __init__(self, nodes, c_pp: int, c_p: int, c: int, reduction: bool, reduction_prev: bool, norm: str):
        super().__init__(c_pp, c_p, c, reduction, reduction_prev, norm)
        self.plan = [[(src, edge_key(j, src)) for _, src in node] for j, node in enumerate(nodes, start=2)]
        self.edges = nn.ModuleDict(
            {
                edge_key(j, src): _Edge(op, c, 2 if reduction and src < 2 else 1, norm)
                for j, node in enumerate(nodes, start=2)
                for op, src in node
            }
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = self.input_states(s0, s1)
        for inputs in self.plan:
            out = None
            for src, key in inputs:
                y = self.edges[key](states[src])
                out = y if out is None else out + y
            states.append(out)
        return cat_channels(states[2:])


class DiscreteNetwork(nn.Module):
    """The derived network; its parameter names are a subset of the supernet's ``net.*`` names."""

    def __init__(self, space: SpaceConfig, genotype: Genotype):
        super().__init__()
        self.space, self.genotype = space, genotype
        self.stem, slots, c_out = cell_plan(space)
        self.cells = nn.ModuleList(
            DiscreteCell(genotype.cell(s.cell_type), s.c_pp, s.c_p, s.c, s.reduction, s.reduction_prev, space.norm)
            for s in slots
        )
        self.classifier = nn.Linear(c_out, space.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)  # in the supernet's memory format (space.fastpath)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(F.adaptive_avg_pool2d(s1, 1).flatten(1))

    @classmethod
    def inherit(cls, model: SearchModel, genotype: Genotype) -> DiscreteNetwork:
        """The derived network with the searched weights: a key lookup, no retraining."""
        net = cls(model.space, genotype)
        source = model.net.state_dict()
        net.load_state_dict({k: source[k].detach().clone() for k in net.state_dict()})
        return net


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SimpleCNN(nn.Module):
    """The FedAvg baseline's standard small CNN when no genotype is given (conv-norm-ReLU x 3, pool;
    the space's normalisation, as the cell networks')."""

    def __init__(self, space: SpaceConfig, channels: int = 0):
        super().__init__()
        c = channels or space.stem_multiplier * space.init_channels
        self.channels = c  # its first conv's width: what a saved model needs to be rebuilt
        layers, c_in = [], space.in_channels
        for c_out, stride in ((c, 1), (2 * c, 2), (4 * c, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), norm_layer(space.norm, c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in, space.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, *rest = self.features
        h = to_fast_layout(first(to_fast_layout(x)))  # the fast path's memory format, as space.Stem's
        for layer in rest:
            h = layer(h)
        return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))


def build_fixed_network(space: SpaceConfig, genotype: Genotype | None, cnn_channels: int = 0) -> nn.Module:
    return DiscreteNetwork(space, genotype) if genotype is not None else SimpleCNN(space, cnn_channels)


def simple_cnn_channels_for(space: SpaceConfig, target_params: int) -> int:
    """The small CNN's width whose parameter count is closest to ``target_params`` (the matched baseline)."""
    return min(range(1, 257), key=lambda c: abs(count_parameters(SimpleCNN(space, c)) - target_params))


def random_genotype(primitives: tuple[str, ...], num_nodes: int, seed: int) -> Genotype:
    """A cell drawn uniformly from the search space: one op (never 'none') per kept edge and one input
    pair per node, as the derived cells are; the standard NAS sanity baseline."""
    rng = np.random.default_rng(seed)
    ops = [p for p in primitives if p != "none"]
    cells = {}
    for cell_type in CELL_TYPES:
        nodes = []
        for j in range(2, num_nodes + 2):
            inputs = sorted(rng.choice(j, size=min(2, j), replace=False).tolist())
            nodes.append(tuple((str(ops[rng.integers(len(ops))]), int(i)) for i in inputs))
        cells[cell_type] = tuple(nodes)
    return Genotype(**cells)

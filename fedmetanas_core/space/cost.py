"""What a network of the space costs: MACs, parameters or latency per op on every edge, plus the
fixed parts (stem, each cell's input preprocessing, classifier).

A cost is linear in the choices: the fixed part plus, for every cell, the cost of the op chosen on
each edge that a node reads. Cells of one type share one architecture but sit at different widths
and resolutions, so ``CostModel.edge[cell_type]`` is the [edges, ops] cost summed over the cells of
that type, and

- a genotype's cost is ``fixed`` + the entries its nodes pick (``genotype_cost``);
- under relaxed op and input-pair probabilities, the *expected* cost is ``fixed`` + <W, edge> with W
  the probability that an edge is read times its op's probability (``expected_cost``), as in
  ProxylessNAS / FBNet: differentiable in the architecture logits.

MACs count multiply-accumulates of convolutions and linear layers (pooling, BatchNorm, ReLU and
additions count 0; ``torch.utils.flop_counter`` reports 2 x MACs for them); parameters are the op's
weights. Latency comes from a measured table (``latency_table``). ``none`` costs nothing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..names import CELL_TYPES, COST_KINDS, arch_param_name
from .fastpath import fast_path
from .ops import make_op
from .topology import CellTopology, SpaceConfig

__all__ = ["COST_KINDS", "CostModel", "OpShape", "build_cost_model", "count_macs", "counted_cost_model", "edge_shapes"]


@dataclass(frozen=True)
class OpShape:
    """One op instance's key: its name, channels, stride and input resolution (what its cost depends on)."""

    op: str
    channels: int
    stride: int
    height: int
    width: int

    def key(self) -> str:
        return f"{self.op}|c{self.channels}|s{self.stride}|{self.height}x{self.width}"


def downsampled(size: int) -> int:
    """Every stride-2 part of the space (3x3 pad 1, 1x1 factorized reduce) maps n to ceil(n / 2)."""
    return (size + 1) // 2


def slot_resolutions(space: SpaceConfig, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Each cell's input resolution (the stem keeps the image's; a reduction cell halves it after)."""
    h, w = image_hw
    sizes = []
    for cell_type in space.cell_types():
        sizes.append((h, w))
        if cell_type == "reduce":
            h, w = downsampled(h), downsampled(w)
    return sizes


def edge_shapes(space: SpaceConfig, image_hw: tuple[int, int]) -> list[tuple[str, list[list[OpShape]]]]:
    """Per cell: its type and, per edge (topology order), the OpShape of every primitive."""
    from .supernet import cell_plan  # the plan builds modules; only its channel counts are read

    _, slots, _ = cell_plan(space)
    out = []
    for slot, (h, w) in zip(slots, slot_resolutions(space, image_hw), strict=False):
        rows = []
        for _, i in space.topology.edges:
            stride = 2 if slot.reduction and i < 2 else 1
            # a reduction cell's intermediate nodes are already at half resolution
            hi, wi = (downsampled(h), downsampled(w)) if slot.reduction and i >= 2 else (h, w)
            rows.append([OpShape(p, slot.c, stride, hi, wi) for p in space.primitives])
        out.append((slot.cell_type, rows))
    return out


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example`` (per example): convolutions and linear
    layers, counted from their output shapes on the reference path (every op calls its modules)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += output[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output[0].numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad(), fast_path(False):
            module(example[:1].expand(2, *example.shape[1:]))  # 2: BatchNorm with batch statistics needs > 1
    finally:
        for h in handles:
            h.remove()
    return total


def op_macs(shape: OpShape) -> float:
    if shape.op == "none":
        return 0.0
    op = make_op(shape.op, shape.channels, shape.stride, "batch")  # a norm adds no MACs: it is not counted
    return float(count_macs(op, torch.zeros(1, shape.channels, shape.height, shape.width)))


def op_params(shape: OpShape) -> float:
    if shape.op == "none":
        return 0.0
    norm_free = make_op(shape.op, shape.channels, shape.stride, "batch")  # norms have no parameters
    return float(sum(p.numel() for p in norm_free.parameters()))


@dataclass
class CostModel:
    """``fixed`` + per cell type an [edges, ops] table (summed over the cells of that type)."""

    kind: str
    fixed: float
    edge: dict[str, torch.Tensor]
    input_pruning: bool
    num_nodes: int
    primitives: tuple[str, ...]

    def __post_init__(self) -> None:
        # [pairs, inputs] per node, made once: the expected cost runs in every architecture step
        self._incidence = {
            j: CellTopology(self.num_nodes).pair_incidence(j) for j in CellTopology(self.num_nodes).nodes
        }

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "fixed": self.fixed,
                "edge": {t: v.tolist() for t, v in self.edge.items()},
                "input_pruning": self.input_pruning,
                "num_nodes": self.num_nodes,
                "primitives": list(self.primitives),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        d = json.loads(text)
        edge = {t: torch.tensor(v, dtype=torch.float32) for t, v in d["edge"].items()}
        return cls(
            d["kind"], float(d["fixed"]), edge, bool(d["input_pruning"]), int(d["num_nodes"]), tuple(d["primitives"])
        )

    def edge_index(self, node: int, src: int) -> int:
        return sum(range(2, node)) + src  # nodes 2.. have 2, 3, ... incoming edges, in topology order

    def genotype_cost(self, genotype) -> float:
        total = self.fixed
        for cell_type in CELL_TYPES:
            for j, node in enumerate(genotype.cell(cell_type), start=2):
                for op, src in node:
                    total += float(self.edge[cell_type][self.edge_index(j, src), self.primitives.index(op)])
        return total

    def expected_cost(
        self, arch: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """E[cost] under softmax op and input-pair probabilities (masked entries excluded), keeping
        the graph to ``arch`` (``arch.alpha.<type>``, ``arch.beta.<type>-<node>``).

        With input pruning an edge is read with the probability of the pairs that contain it; without
        (FedNAS, DARTS's top-2 rule) a node of k inputs reads each with probability 2 / k.
        """
        masks = masks or {}
        total = torch.as_tensor(self.fixed, dtype=torch.float32)
        for cell_type in CELL_TYPES:
            read = self._edge_read_probability(arch, masks, cell_type)
            name = arch_param_name("alpha", cell_type)
            op_p = _masked_softmax(arch[name], masks.get(name))
            total = total + (read[:, None] * op_p * self.edge[cell_type].to(op_p.device)).sum()
        return total

    def _edge_read_probability(self, arch, masks, cell_type: str) -> torch.Tensor:
        parts = []
        for j in range(2, self.num_nodes + 2):
            if not self.input_pruning:
                parts.append(torch.full((j,), min(1.0, 2.0 / j)))
                continue
            name = arch_param_name("beta", cell_type, j)
            pair_p = _masked_softmax(arch[name], masks.get(name))
            parts.append(pair_p @ self._incidence[j].to(pair_p.device))
        device = next(iter(arch.values())).device
        return torch.cat([p.to(device) for p in parts])

    def extremes(self) -> tuple[float, float]:
        """The cheapest and the most expensive cell (one real op per read edge) over the whole space."""
        low = high = self.fixed
        real = [o for o, p in enumerate(self.primitives) if p != "none"]
        for cell_type in CELL_TYPES:
            table = self.edge[cell_type][:, real]
            for j in range(2, self.num_nodes + 2):
                rows = table[self.edge_index(j, 0) : self.edge_index(j, 0) + j]
                lo, hi = rows.min(dim=1).values, rows.max(dim=1).values
                low += float(lo.topk(2, largest=False).values.sum())  # a node reads two of its j >= 2 inputs
                high += float(hi.topk(2).values.sum())
        return low, high


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    z = logits.float()
    if mask is not None:
        z = z.masked_fill(~mask.to(z.device), float("-inf"))
    return torch.softmax(z, dim=-1)


def build_cost_model(
    space: SpaceConfig, image_hw: tuple[int, int], kind: str, measure: Callable[[OpShape], float], fixed: float
) -> CostModel:
    """The CostModel of ``space`` at ``image_hw`` with ``measure`` per op and ``fixed`` for the rest."""
    topo = space.topology
    edge = {t: torch.zeros(len(topo.edges), len(space.primitives)) for t in CELL_TYPES}
    cache: dict[OpShape, float] = {}
    for cell_type, rows in edge_shapes(space, image_hw):
        for e, shapes in enumerate(rows):
            for o, shape in enumerate(shapes):
                if shape not in cache:
                    cache[shape] = 0.0 if shape.op == "none" else measure(shape)
                edge[cell_type][e, o] += cache[shape]
    return CostModel(kind, fixed, edge, space.input_pruning, space.num_nodes, space.primitives)


def fixed_macs_and_params(space: SpaceConfig, image_hw: tuple[int, int]) -> tuple[float, float]:
    """MACs and parameters of what every network of the space runs whatever its cells pick: the
    stem, each cell's two input preprocessings, the classifier."""
    from .supernet import CellBase, cell_plan

    stem, slots, c_out = cell_plan(space)
    h, w = image_hw
    x = torch.zeros(1, space.in_channels, h, w)
    macs = count_macs(stem, x)
    params = sum(p.numel() for p in stem.parameters())
    sizes = slot_resolutions(space, image_hw)
    prev_sizes = [image_hw, image_hw]  # (s0, s1) resolutions entering each cell
    for slot, size in zip(slots, sizes, strict=False):
        base = CellBase(slot.c_pp, slot.c_p, slot.c, slot.reduction, slot.reduction_prev, space.norm)
        s0 = torch.zeros(1, slot.c_pp, *prev_sizes[0])
        s1 = torch.zeros(1, slot.c_p, *prev_sizes[1])
        macs += count_macs(base.preprocess0, s0) + count_macs(base.preprocess1, s1)
        params += sum(p.numel() for p in base.parameters())
        out = (downsampled(size[0]), downsampled(size[1])) if slot.reduction else size
        prev_sizes = [prev_sizes[1], out]
    classifier = nn.Linear(c_out, space.num_classes)
    macs += c_out * space.num_classes
    params += sum(p.numel() for p in classifier.parameters())
    return float(macs), float(params)


def counted_cost_model(space: SpaceConfig, image_hw: tuple[int, int], kind: str) -> CostModel:
    """MACs or parameters, counted on the ops at the space's shapes."""
    fixed_macs, fixed_params = fixed_macs_and_params(space, image_hw)
    if kind == "macs":
        return build_cost_model(space, image_hw, kind, op_macs, fixed_macs)
    if kind == "params":
        return build_cost_model(space, image_hw, kind, op_params, fixed_params)
    raise ValueError(f"{kind!r} is not counted: one of macs, params (latency comes from a measured table)")

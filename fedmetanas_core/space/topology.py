"""The search space's shape: ``SpaceConfig`` (sizes and op set) and ``CellTopology`` (nodes, edges,
input pairs), shared by the supernet, the architecture logits and the genotype.

Edges are named by key (``names.edge_key``: ``"3<-1"`` = node 3 takes node 1 as input; nodes 0 and
1 are the cell's two inputs) and ops by name, so a state-dict key says what it is and extracting the
discrete network is a key lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch

from ..names import PRIMITIVES


@dataclass(frozen=True)
class CellTopology:
    num_nodes: int

    @property
    def nodes(self) -> range:  # intermediate nodes; 0 and 1 are the cell inputs
        return range(2, self.num_nodes + 2)

    @property
    def edges(self) -> list[tuple[int, int]]:
        return [(j, i) for j in self.nodes for i in range(j)]

    def pairs(self, node: int) -> list[tuple[int, int]]:
        return list(combinations(range(node), 2))

    def pair_incidence(self, node: int) -> torch.Tensor:
        """[pairs, inputs] 0/1: pair (a, b) feeds inputs a and b."""
        pairs = self.pairs(node)
        inc = torch.zeros(len(pairs), node)
        for p, (a, b) in enumerate(pairs):
            inc[p, a] = inc[p, b] = 1.0
        return inc


@dataclass(frozen=True)
class SpaceConfig:
    num_classes: int
    in_channels: int = 3
    init_channels: int = 8
    num_cells: int = 3
    num_nodes: int = 3
    stem_multiplier: int = 3
    primitives: tuple[str, ...] = PRIMITIVES
    input_pruning: bool = True
    # which cells reduce (0-based); None = DARTS's rule. Small budgets gain from reducing early: the
    # cells then spend their MACs at low resolution, as a small CNN does (docs/cost-aware.md)
    reduction_positions: tuple[int, ...] | None = None
    # the ops' normalisation (``ops.norm_layer``): "batch" (DARTS's) or "group" (per image)
    norm: str = "batch"
    # the supernet's while the cell is undecided ("": ``norm``); the derived network always has ``norm``
    search_norm: str = ""

    def __post_init__(self) -> None:
        if self.reduction_positions is not None:  # a JSON round trip gives a list: keep the dataclass hashable
            object.__setattr__(self, "reduction_positions", tuple(sorted(self.reduction_positions)))

    @property
    def supernet_norm(self) -> str:
        """Batch statistics give the search its fast start; per-image statistics suit the derived
        network on skewed clients (docs/results-frontier.md): the two may differ."""
        return self.search_norm or self.norm

    @property
    def topology(self) -> CellTopology:
        return CellTopology(self.num_nodes)

    def reduction_cells(self) -> set[int]:
        if self.reduction_positions is not None:
            return set(self.reduction_positions)
        if self.num_cells < 3:
            return {self.num_cells - 1} if self.num_cells > 1 else set()
        return {self.num_cells // 3, 2 * self.num_cells // 3}

    def cell_types(self) -> list[str]:
        red = self.reduction_cells()
        return ["reduce" if i in red else "normal" for i in range(self.num_cells)]

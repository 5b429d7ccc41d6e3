"""The model that MAML adapts and the server averages: the supernet plus its architecture logits.

``SearchModel.net`` holds the network weights (``net.*``), ``SearchModel.arch`` the architecture
logits (``arch.*``: alphas per edge and op, betas per node and input pair, kept apart); the prefixes
are ``names.NET_PREFIX`` and ``names.ARCH_PREFIX``, and every split keys on them. A forward pass
relaxes the logits (``relaxation.relax``) into ``CellWeights`` and runs the supernet with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..names import CELL_TYPES, arch_param_name
from .fastpath import fast_path_enabled
from .relaxation import relax
from .supernet import CellWeights, Supernet
from .topology import SpaceConfig


class Architecture(nn.Module):
    """``alpha.<type>`` [edges, ops]; ``beta.<type>-<node>`` [pairs]. Init 1e-3 * N(0, 1)."""

    def __init__(self, space: SpaceConfig):
        super().__init__()
        topo = space.topology
        self.alpha = nn.ParameterDict(
            {t: nn.Parameter(1e-3 * torch.randn(len(topo.edges), len(space.primitives))) for t in CELL_TYPES}
        )
        self.beta = nn.ParameterDict()
        if space.input_pruning:
            for t in CELL_TYPES:
                for j in topo.nodes:
                    self.beta[f"{t}-{j}"] = nn.Parameter(1e-3 * torch.randn(len(topo.pairs(j))))


@dataclass
class RelaxSettings:
    tau: float = 1.0
    mode: str = "gumbel-soft"
    noise: bool = True
    threshold: float = 0.01
    argmax: bool = False  # evaluation: one-hot op and pair choice


class SearchModel(nn.Module):
    """``net.*`` are network weights, ``arch.*`` architecture logits; every split keys on the prefix."""

    def __init__(self, space: SpaceConfig):
        super().__init__()
        self.space = space
        self.net = Supernet(space)
        self.arch = Architecture(space)
        topo = space.topology
        self._incidence = {j: topo.pair_incidence(j) for j in topo.nodes}
        self._incidence_on: dict[tuple[int, torch.device], torch.Tensor] = {}  # per-device copies, made once
        self._none = space.primitives.index("none") if "none" in space.primitives else -1

    def _pair_incidence(self, j: int, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self._incidence[j]
        key = (j, device)
        if key not in self._incidence_on:
            self._incidence_on[key] = self._incidence[j].to(device)
        return self._incidence_on[key]

    def cell_weights(
        self,
        cell_type: str,
        settings: RelaxSettings,
        masks: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
    ) -> CellWeights:
        weights = self._effective_weights(cell_type, settings, masks, generator)
        return CellWeights(weights, self._active(weights.detach(), settings.threshold))

    def _effective_weights(self, cell_type: str, settings: RelaxSettings, masks, generator) -> torch.Tensor:
        masks = masks or {}
        name = arch_param_name("alpha", cell_type)
        alpha = self.arch.alpha[cell_type]
        op_w = relax_or_onehot(alpha, settings, masks.get(name), generator, exclude=self._none)
        if self.space.input_pruning:
            coeffs = []
            for j in self.space.topology.nodes:
                beta = self.arch.beta[f"{cell_type}-{j}"]
                pair_w = relax_or_onehot(beta, settings, masks.get(arch_param_name("beta", cell_type, j)), generator)
                coeffs.append(pair_w @ self._pair_incidence(j, pair_w.device))  # input i's share: sum of its pairs
            return torch.cat(coeffs)[:, None] * op_w
        return op_w

    def _active(self, weights: torch.Tensor, threshold: float) -> list[list[int]]:
        """Which (edge, op) entries run: one host transfer for the whole cell, never one per op."""
        return [row.nonzero().flatten().tolist() for row in self._keep(weights, threshold).cpu()]

    def _keep(self, weights: torch.Tensor, threshold: float) -> torch.Tensor:
        keep = weights > threshold
        if self._none >= 0:
            keep[:, self._none] = False
        # a node must compute something: keep its strongest real op even if all fall under the threshold
        best = weights.clone()
        if self._none >= 0:
            best[:, self._none] = -1.0
        e = 0
        for j in self.space.topology.nodes:  # on the device: no host sync per node
            block = best[e : e + j]
            keep[e : e + j] |= F.one_hot(block.flatten().argmax(), block.numel()).view(block.shape).bool()
            e += j
        return keep

    def all_weights(self, settings: RelaxSettings, masks=None, generator=None) -> dict[str, CellWeights]:
        if not fast_path_enabled():
            return {t: self.cell_weights(t, settings, masks, generator) for t in CELL_TYPES}
        # same draws in the same order; both cell types' active sets in one host transfer
        weights = {t: self._effective_weights(t, settings, masks, generator) for t in CELL_TYPES}
        keep = torch.stack([self._keep(w.detach(), settings.threshold) for w in weights.values()]).cpu()
        return {
            t: CellWeights(w, [row.nonzero().flatten().tolist() for row in k])
            for (t, w), k in zip(weights.items(), keep, strict=False)
        }

    def forward(self, x, settings: RelaxSettings, masks=None, generator=None) -> torch.Tensor:
        return self.net(x, self.all_weights(settings, masks, generator))


def relax_or_onehot(logits, settings: RelaxSettings, mask, generator, exclude: int = -1) -> torch.Tensor:
    """Relaxed weights, or at evaluation in argmax mode the one-hot choice (never ``none``)."""
    if settings.argmax:
        z = logits.detach().clone()
        if mask is not None:
            z = z.masked_fill(~mask.to(z.device), float("-inf"))
        if exclude >= 0:
            z[..., exclude] = float("-inf")
        return F.one_hot(z.argmax(-1), logits.shape[-1]).float()
    return relax(logits, settings.tau, settings.mode, mask, generator, noise=settings.noise)

"""Plain helpers shared by test modules (fixtures live in conftest.py): tiny search spaces, random
architectures and masks, small inputs, op-call hooks, and a grid stub that only names its nodes."""

from __future__ import annotations

import torch

from fedmetanas_core.space import CELL_TYPES, SearchModel, SpaceConfig, arch_param_name, is_arch

SMALL_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")


def tiny_space(**kw) -> SpaceConfig:
    base = dict(num_classes=5, in_channels=3, init_channels=4, num_cells=3, num_nodes=2)
    base.update(kw)
    return SpaceConfig(**base)


def randomize_arch(model: SearchModel, scale: float = 2.0, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.arch.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))


def arch_state(model: SearchModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_arch(k)}


def random_masks(space: SpaceConfig, model: SearchModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random alpha masks that keep at least one real op per edge (the server's invariant)."""
    g = torch.Generator().manual_seed(seed)
    none = space.primitives.index("none")
    masks = {}
    for t in CELL_TYPES:
        name = arch_param_name("alpha", t)
        shape = model.arch.alpha[t].shape
        m = torch.rand(shape, generator=g) > 0.4
        for e in range(shape[0]):
            real = [o for o in range(shape[1]) if o != none]
            m[e, real[int(torch.randint(len(real), (1,), generator=g))]] = True
        masks[name] = m
    return masks


def x_batch(n=6, c=3, size=8, seed=1):
    return torch.randn(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def op_hooks(model: SearchModel):
    """Record which (cell, edge, op) modules run; returns (calls list, remove function)."""
    calls = []
    handles = []
    for ci, cell in enumerate(model.net.cells):
        for key, edge in cell.edges.items():
            for name, op in edge.ops.items():
                handles.append(
                    op.register_forward_hook(lambda m, i, o, ci=ci, key=key, name=name: calls.append((ci, key, name)))
                )

    def remove():
        for h in handles:
            h.remove()

    return calls, remove


def mask_space():
    return tiny_space(
        primitives=("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"), num_nodes=2, input_pruning=True
    )


class NodeIds:
    """Only what a strategy's configure step asks of the grid: the connected node ids."""

    def __init__(self, ids):
        self.ids = list(ids)

    def get_node_ids(self):
        return list(self.ids)

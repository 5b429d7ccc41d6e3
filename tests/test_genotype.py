"""Genotype derivation: edges ranked by probability, never 'none', masks and betas respected, and
the genotype's JSON / YAML round trip."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_OPS, arch_state, randomize_arch, tiny_space

from fedmetanas_core.method.genotype import Genotype, derive_genotype
from fedmetanas_core.space import CELL_TYPES, SearchModel

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


def alpha_state(space, normal: torch.Tensor, reduce: torch.Tensor | None = None, betas=None):
    state = {"arch.alpha.normal": normal, "arch.alpha.reduce": normal.clone() if reduce is None else reduce}
    state.update(betas or {})
    return state


def test_derive_genotype_ranks_edges_by_probability_not_raw_logits():
    ops = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
    space = tiny_space(primitives=ops, num_nodes=2, input_pruning=False)
    edges = space.topology.edges  # (2,0) (2,1) (3,0) (3,1) (3,2)
    a = torch.zeros(len(edges), len(ops))
    # edge 3<-0: huge 'none' and a moderately high real op: raw logit 5, probability ~ e^-5
    a[2] = torch.tensor([10.0, 5.0, 0.0, 0.0])
    # edges 3<-1, 3<-2: lower raw logits but real ops dominate their distribution
    a[3] = torch.tensor([0.0, 0.0, 2.0, 0.0])
    a[4] = torch.tensor([0.0, 0.0, 0.0, 1.5])
    g = derive_genotype(space, alpha_state(space, a))
    assert sorted(src for _, src in g.normal[1]) == [1, 2], "must rank edges by softmax probability"
    assert dict((s, op) for op, s in g.normal[1]) == {1: "skip_connect", 2: "sep_conv_3x3"}


@pytest.mark.parametrize(
    "ops",
    [
        ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"),
        ("max_pool_3x3", "skip_connect", "none", "sep_conv_3x3"),
    ],
)
def test_derive_genotype_never_picks_none(ops):
    space = tiny_space(primitives=ops, input_pruning=False)
    none = ops.index("none")
    real = [o for o in range(len(ops)) if o != none]
    a = torch.randn(len(space.topology.edges), len(ops))
    a[:, none] = 50.0
    g = derive_genotype(space, alpha_state(space, a))
    for cell in (g.normal, g.reduce):
        for node in cell:
            assert all(op != "none" for op, _ in node)
    # best real op of each chosen edge
    edges = space.topology.edges
    for j, node in zip(space.topology.nodes, g.normal, strict=False):
        for op, src in node:
            e = edges.index((j, src))
            assert ops.index(op) == real[int(a[e, real].argmax())]


def test_derive_genotype_respects_masks():
    ops = ("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3")
    space = tiny_space(primitives=ops, input_pruning=False)
    a = torch.zeros(len(space.topology.edges), len(ops))
    a[:, 3] = 5.0  # sep_conv would win everywhere ...
    a[:, 2] = 1.0
    mask = torch.ones_like(a, dtype=torch.bool)
    mask[:, 3] = False  # ... but is masked
    g = derive_genotype(space, alpha_state(space, a), {"arch.alpha.normal": mask})
    assert all(op == "skip_connect" for node in g.normal for op, _ in node)
    assert all(op == "sep_conv_3x3" for node in g.reduce for op, _ in node)


def test_derive_genotype_with_betas_takes_the_argmax_pair():
    space = tiny_space(primitives=SMALL_OPS, num_nodes=3, input_pruning=True)
    model = SearchModel(space)
    randomize_arch(model, scale=1.0, seed=9)
    state = arch_state(model)
    # node 4 has inputs 0..3, pairs (0,1),(0,2),(0,3),(1,2),(1,3),(2,3): make (1,3) win
    pairs = space.topology.pairs(4)
    b = torch.zeros(len(pairs))
    b[pairs.index((1, 3))] = 3.0
    state["arch.beta.normal-4"] = b
    g = derive_genotype(space, state)
    assert tuple(src for _, src in g.normal[2]) == (1, 3)
    for t in CELL_TYPES:
        for j, node in zip(space.topology.nodes, g.cell(t), strict=False):
            assert len(node) == 2
            srcs = [s for _, s in node]
            assert len(set(srcs)) == 2 and all(0 <= s < j for s in srcs)
            want = pairs_for = space.topology.pairs(j)[int(state[f"arch.beta.{t}-{j}"].argmax())]
            assert tuple(srcs) == want == pairs_for


@pytest.mark.parametrize("input_pruning", [False, True])
def test_derived_nodes_have_two_distinct_earlier_inputs(input_pruning):
    space = tiny_space(num_nodes=4, input_pruning=input_pruning)
    model = SearchModel(space)
    randomize_arch(model, seed=11)
    g = derive_genotype(space, arch_state(model))
    for t in CELL_TYPES:
        assert len(g.cell(t)) == space.num_nodes
        for j, node in zip(space.topology.nodes, g.cell(t), strict=False):
            srcs = [s for _, s in node]
            assert len(srcs) == 2 and len(set(srcs)) == 2 and all(0 <= s < j for s in srcs)
            assert all(op in space.primitives and op != "none" for op, _ in node)


def test_genotype_json_and_yaml_round_trip(tmp_path):
    space = tiny_space(num_nodes=3)
    model = SearchModel(space)
    randomize_arch(model, seed=3)
    g = derive_genotype(space, arch_state(model))
    assert Genotype.from_json(g.to_json()) == g
    g.save_yaml(tmp_path / "g.yaml")
    assert Genotype.load_yaml(tmp_path / "g.yaml") == g
    assert sum(g.op_counts().values()) == 2 * 2 * space.num_nodes

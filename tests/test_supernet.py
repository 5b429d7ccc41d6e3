"""The supernet of the search space: a cell is the weighted sum of its ops, the argmax supernet
is the derived network, and ops under the threshold, masked ops and 'none' never run.
Tiny spaces and 8x8 inputs keep it fast."""

from __future__ import annotations

import pytest
import torch
from helpers import SMALL_OPS, arch_state, op_hooks, random_masks, randomize_arch, tiny_space, x_batch

from fedmetanas_core.method.genotype import DiscreteNetwork, derive_genotype
from fedmetanas_core.space import CELL_TYPES, CellWeights, RelaxSettings, SearchModel, Zero, arch_param_name, edge_key

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


# --- mixed op / cell semantics ----------------------------------------------------------------


def manual_cell(cell, s0, s1, weights: torch.Tensor, primitives) -> torch.Tensor:
    """Reference: node j = sum over its edges and ops with non-zero weight of w * op(state)."""
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    e = 0
    for j in cell.nodes:
        total = 0
        for i in range(j):
            for o, p in enumerate(primitives):
                if p != "none" and weights[e, o] != 0:
                    total = total + weights[e, o] * cell.edges[edge_key(j, i)].ops[p](states[i])
            e += 1
        states.append(total)
    return torch.cat(states[2:], dim=1)


@pytest.mark.parametrize("kind", ["one-hot", "mixture"])
def test_cell_forward_equals_manual_weighted_sum_of_ops(kind):
    space = tiny_space(primitives=SMALL_OPS)
    model = SearchModel(space)
    cell = model.net.cells[0]  # a normal cell
    c = model.net.stem[0].out_channels
    g = torch.Generator().manual_seed(3)
    s0, s1 = torch.randn(4, c, 8, 8, generator=g), torch.randn(4, c, 8, 8, generator=g)
    edges, ops = len(space.topology.edges), len(space.primitives)
    w = torch.zeros(edges, ops)
    if kind == "one-hot":
        # node 2 takes edges 2<-0 (op 1) and 2<-1 (op 4); node 3 takes 3<-0 (op 3) and 3<-2 (op 5)
        for e, o in ((0, 1), (1, 4), (2, 3), (4, 5)):
            w[e, o] = 1.0
    else:
        w = torch.rand(edges, ops, generator=g)
        w[:, 0] = 0.7  # 'none' carries mass but contributes nothing
    active = [[o for o in range(ops) if o != 0 and w[e, o] != 0] for e in range(edges)]
    with torch.no_grad():
        out = cell(s0, s1, CellWeights(w, active))
        ref = manual_cell(cell, s0, s1, w, space.primitives)
    assert out.shape == (4, space.num_nodes * space.init_channels, 8, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_masks", [False, True])
def test_argmax_search_model_equals_inherited_discrete_network(use_masks):
    space = tiny_space(input_pruning=True)  # full DARTS op set, 3 cells (normal, reduce, reduce)
    model = SearchModel(space)
    randomize_arch(model, scale=2.0, seed=5)
    masks = random_masks(space, model, seed=2) if use_masks else None
    genotype = derive_genotype(space, arch_state(model), masks)
    for t in CELL_TYPES:
        for node in genotype.cell(t):
            assert all(op != "none" for op, _ in node)
    net = DiscreteNetwork.inherit(model, genotype)
    x = x_batch()
    with torch.no_grad():
        a = model(x, RelaxSettings(argmax=True, threshold=0.01), masks)
        b = net(x)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the inherited weights are copies, not shared storage
    name = next(iter(net.state_dict()))
    assert net.state_dict()[name].data_ptr() != model.net.state_dict()[name].data_ptr()


def test_argmax_weights_are_one_hot_and_never_none():
    space = tiny_space(input_pruning=False)
    model = SearchModel(space)
    with torch.no_grad():
        model.arch.alpha["normal"][:, 0] = 100.0  # 'none' has by far the largest logit
    cw = model.cell_weights("normal", RelaxSettings(argmax=True))
    assert torch.all(cw.weights.sum(-1) == 1)
    assert torch.all(cw.weights[:, 0] == 0)
    assert all(len(a) == 1 and a[0] != 0 for a in cw.active)


# --- skipping: ops under the threshold, masked ops and 'none' never run -----------------------


def expected_active(space, weights, threshold):
    weights = weights.detach()
    none = space.primitives.index("none")
    keep = set()
    e = 0
    for j in space.topology.nodes:
        best, best_w = None, -1.0
        for r in range(j):
            for o in range(weights.shape[1]):
                if o == none:
                    continue
                if weights[e + r, o] > threshold:
                    keep.add((e + r, o))
                if weights[e + r, o] > best_w:
                    best, best_w = (e + r, o), float(weights[e + r, o])
        keep.add(best)
        e += j
    return keep


@pytest.mark.parametrize("input_pruning", [False, True])
def test_ops_under_threshold_and_none_are_never_executed(monkeypatch, input_pruning):
    monkeypatch.setattr(Zero, "forward", lambda self, x: (_ for _ in ()).throw(AssertionError("'none' ran")))
    space = tiny_space(primitives=SMALL_OPS, input_pruning=input_pruning)
    model = SearchModel(space)
    randomize_arch(model, scale=1.0, seed=1)
    settings = RelaxSettings(tau=0.3, mode="softmax", noise=False, threshold=0.05)
    calls, remove = op_hooks(model)
    try:
        with torch.no_grad():
            out = model(x_batch(), settings)
    finally:
        remove()
    assert torch.isfinite(out).all()
    skipped_any = False
    for ci, cell in enumerate(model.net.cells):
        t = "reduce" if cell.reduction else "normal"
        cw = model.cell_weights(t, settings)
        want = expected_active(space, cw.weights, settings.threshold)
        ran = {
            (
                next(e for e, (j, i) in enumerate(space.topology.edges) if edge_key(j, i) == key),
                space.primitives.index(op),
            )
            for c, key, op in calls
            if c == ci
        }
        assert ran == want
        total_real = len(space.topology.edges) * (len(space.primitives) - 1)
        skipped_any |= len(ran) < total_real
        for e, o in ran:  # only the guaranteed per-node op may be under the threshold
            assert cw.weights[e, o] > settings.threshold or (e, o) in want
    assert skipped_any, "test must actually skip something"
    # each op runs at most once per forward (no duplicate executions)
    assert len(calls) == len(set(calls))


def test_every_node_computes_even_if_all_weights_fall_under_threshold():
    space = tiny_space(primitives=SMALL_OPS, input_pruning=True)
    model = SearchModel(space)
    settings = RelaxSettings(tau=1.0, mode="softmax", noise=False, threshold=0.99)
    calls, remove = op_hooks(model)
    with torch.no_grad():
        out = model(x_batch(), settings)
    remove()
    assert torch.isfinite(out).all()
    # exactly one op per node per cell
    assert len(calls) == space.num_cells * space.num_nodes


def test_masked_ops_have_zero_weight_and_never_run():
    space = tiny_space(primitives=SMALL_OPS, input_pruning=True)
    model = SearchModel(space)
    masks = random_masks(space, model, seed=4)
    settings = RelaxSettings(tau=1.0, mode="gumbel-soft", noise=True, threshold=0.0)
    gen = torch.Generator().manual_seed(0)
    for t in CELL_TYPES:
        w = model.cell_weights(t, settings, masks, gen).weights
        assert torch.all(w[~masks[arch_param_name("alpha", t)]] == 0)
    calls, remove = op_hooks(model)
    with torch.no_grad():
        model(x_batch(), settings, masks, gen)
    remove()
    assert calls
    for ci, key, op in calls:
        t = "reduce" if model.net.cells[ci].reduction else "normal"
        e = [edge_key(j, i) for j, i in space.topology.edges].index(key)
        assert masks[arch_param_name("alpha", t)][e, space.primitives.index(op)], f"masked op {op} on {key} ran"


def test_gumbel_hard_runs_only_the_sampled_op_on_the_sampled_pair():
    space = tiny_space(primitives=SMALL_OPS, input_pruning=True)
    model = SearchModel(space)
    calls, remove = op_hooks(model)
    settings = RelaxSettings(tau=1.0, mode="gumbel-hard", noise=True, threshold=0.01)
    with torch.no_grad():
        model(x_batch(), settings, None, torch.Generator().manual_seed(2))
    remove()
    # per cell: each node runs one op on each of its two chosen inputs
    assert len(calls) == space.num_cells * space.num_nodes * 2

"""Behaviour of the core method: search space, relaxation, genotype, MAML, aggregation, masks,
config, seeding, outputs and the local training loops. Tiny spaces and 8x8 inputs keep it fast."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fedmetanas_core import atomic as A
from fedmetanas_core import config as C
from fedmetanas_core import outputs as O
from fedmetanas_core.aggregation import arch_statistics, keep_budget, reply_problem, transform_logits, update_masks, weighted_average
from fedmetanas_core.config import ConfigError, RunConfig
from fedmetanas_core.coordinator import plan_from_config, plan_to_config
from fedmetanas_core.data import ClientData, DataSpec, load_client_data
from fedmetanas_core.genotype import DiscreteNetwork, Genotype, SimpleCNN, derive_genotype
from fedmetanas_core.maml import (
    InnerLoop,
    fomaml_task_gradient,
    inner_adapt,
    loss_on,
    second_order_task_gradient,
)
from fedmetanas_core.relaxation import TemperatureSchedule, probabilities, relax
from fedmetanas_core.space import (
    CELL_TYPES,
    NET_PREFIX,
    PRIMITIVES,
    CellWeights,
    RelaxSettings,
    SearchModel,
    SpaceConfig,
    Zero,
    arch_param_name,
    edge_key,
    is_arch,
)
from fedmetanas_core.seeding import derive_seed, make_generator
from fedmetanas_core.training import (
    RoundPlan,
    fednas_local_search,
    fedmetanas_local_search,
    space_from_config,
    train_fixed,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL_OPS = ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_3x3")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


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
                handles.append(op.register_forward_hook(lambda m, i, o, ci=ci, key=key, name=name: calls.append((ci, key, name))))

    def remove():
        for h in handles:
            h.remove()

    return calls, remove


# =============================================================================================
# 1. Mixed op / cell semantics


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


# =============================================================================================
# 2. Skipping: ops under the threshold, masked ops and 'none' never run


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
        ran = {(next(e for e, (j, i) in enumerate(space.topology.edges) if edge_key(j, i) == key), space.primitives.index(op))
               for c, key, op in calls if c == ci}
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


# =============================================================================================
# 3. Relaxation


def test_relax_rows_sum_to_one_and_masked_entries_are_exactly_zero():
    logits = torch.randn(5, 7)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 2] = True
    for mode in ("gumbel-soft", "softmax", "gumbel-hard"):
        w = relax(logits, 0.5, mode, mask, torch.Generator().manual_seed(0))
        torch.testing.assert_close(w.sum(-1), torch.ones(5))
        assert torch.all(w[~mask] == 0)
        assert torch.all(w >= 0)


def test_relax_noise_depends_only_on_generator_seed():
    logits = torch.randn(4, 6)
    a = relax(logits, 1.0, "gumbel-soft", generator=torch.Generator().manual_seed(7))
    b = relax(logits, 1.0, "gumbel-soft", generator=torch.Generator().manual_seed(7))
    c = relax(logits, 1.0, "gumbel-soft", generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # the global RNG is not consumed when a generator is given
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    relax(logits, 1.0, "gumbel-soft", generator=torch.Generator().manual_seed(7))
    assert torch.equal(before, torch.random.get_rng_state())


def test_relax_without_noise_is_plain_softmax_over_tau():
    logits = torch.randn(3, 5)
    for mode in ("gumbel-soft", "softmax"):
        torch.testing.assert_close(relax(logits, 0.4, mode, noise=False), torch.softmax(logits / 0.4, -1))
    torch.testing.assert_close(probabilities(logits, tau=0.4), torch.softmax(logits / 0.4, -1))


def test_gumbel_hard_is_one_hot_forward_with_gradient_to_all_logits():
    logits = torch.randn(4, 6, requires_grad=True)
    w = relax(logits, 1.0, "gumbel-hard", generator=torch.Generator().manual_seed(0))
    assert torch.all((w == 0) | (w == 1)) or torch.allclose(w, w.round(), atol=1e-6)
    torch.testing.assert_close(w.detach().sum(-1), torch.ones(4))
    assert torch.all((w.detach() > 0.5).sum(-1) == 1)
    coeff = torch.randn(4, 6)
    (w * coeff).sum().backward()
    unselected = w.detach() < 0.5
    assert torch.all(logits.grad[unselected] != 0), "straight-through must reach non-selected logits"


def test_low_temperature_gives_near_one_hot():
    logits = torch.tensor([[0.3, 0.1, -0.2, 0.25]])
    w = relax(logits, 0.005, "softmax", noise=False)
    assert float(w.max()) > 0.999
    assert int(w.argmax()) == 0
    hot = relax(logits, 100.0, "softmax", noise=False)
    assert float(hot.max() - hot.min()) < 0.01  # high tau: near uniform


def test_gumbel_max_sampling_frequencies_match_softmax():
    """argmax(logits + Gumbel) ~ softmax(logits): catches a wrong sign or wrong noise law."""
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0])
    n = 40000
    w = relax(logits.expand(n, 4), 1.0, "gumbel-hard", generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(w.argmax(-1), minlength=4).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits, -1), atol=0.012, rtol=0)


# =============================================================================================
# 4. Temperature schedule


@pytest.mark.parametrize("kind", ["linear", "exponential", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_temperature_schedule(kind, warmup):
    s = TemperatureSchedule(2.0, 0.1, 12, kind, warmup)
    taus = [s(r) for r in range(1, 13)]
    assert taus[0] == pytest.approx(2.0)
    assert taus[-1] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(taus, taus[1:]))
    for r in range(1, warmup + 2):  # warm-up rounds and the first annealing round
        assert s(r) == pytest.approx(2.0)
    assert taus[warmup + 1] < 2.0
    assert s(100) == pytest.approx(0.1)  # past the end it stays at tau_min
    if kind == "linear":
        s5 = TemperatureSchedule(1.0, 0.2, 5, kind)
        assert s5(3) == pytest.approx(0.6)
    if kind == "exponential":
        s5 = TemperatureSchedule(1.0, 0.01, 5, kind)
        assert s5(3) == pytest.approx(0.1)


# =============================================================================================
# 5. Genotype derivation


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


@pytest.mark.parametrize("ops", [("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"),
                                 ("max_pool_3x3", "skip_connect", "none", "sep_conv_3x3")])
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
    for j, node in zip(space.topology.nodes, g.normal):
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
        for j, node in zip(space.topology.nodes, g.cell(t)):
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
        for j, node in zip(space.topology.nodes, g.cell(t)):
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


# =============================================================================================
# 6. MAML


class Toy(nn.Module):
    """Logistic regression: weight ``w`` and an architecture-named bias ``arch.b``."""

    def __init__(self, d=3, c=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, d))
        self.arch = nn.Module()
        self.arch.b = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return x @ self.w.T + self.arch.b


def toy_problem(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Toy().to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    support = (torch.randn(8, 3, generator=g, dtype=dtype), torch.randint(3, (8,), generator=g))
    query = (torch.randn(8, 3, generator=g, dtype=dtype), torch.randint(3, (8,), generator=g))
    return model, support, query


def manual_adapt(model, params, support, steps, lr_w, lr_a, adapt_arch=True):
    cur = {k: v.detach().clone() for k, v in params.items()}
    for _ in range(steps):
        leaves = {k: v.clone().requires_grad_(True) for k, v in cur.items()}
        loss = F.cross_entropy(functional_call(model, leaves, (support[0],)), support[1])
        grads = torch.autograd.grad(loss, list(leaves.values()))
        new = {}
        for (k, v), gr in zip(leaves.items(), grads):
            if is_arch(k):
                new[k] = v.detach() - lr_a * gr if adapt_arch else v.detach()
            else:
                new[k] = v.detach() - lr_w * gr
        cur = new
    return cur


def test_fomaml_gradient_is_query_gradient_at_adapted_params():
    model, support, query = toy_problem()
    params = dict(model.named_parameters())
    inner = InnerLoop(steps=3, lr_w=0.3, lr_alpha=0.7)
    grads, loss = fomaml_task_gradient(model, params, support, query, inner)
    adapted = manual_adapt(model, params, support, 3, 0.3, 0.7)
    leaves = {k: v.requires_grad_(True) for k, v in adapted.items()}
    q = F.cross_entropy(functional_call(model, leaves, (query[0],)), query[1])
    ref = dict(zip(leaves, torch.autograd.grad(q, list(leaves.values()))))
    assert set(grads) == {"w", "arch.b"}
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k])
    assert loss == pytest.approx(float(q.detach()))


def test_inner_adapt_does_not_modify_module_in_place():
    model, support, _ = toy_problem()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    for create_graph in (False, True):
        adapted = inner_adapt(model, dict(model.named_parameters()), support, InnerLoop(2, 0.5, 0.5), create_graph=create_graph)
        for k, v in model.named_parameters():
            assert torch.equal(v, before[k])
            assert v.grad is None
        assert not torch.allclose(adapted["w"], before["w"])


def test_inner_lrs_apply_to_weights_and_arch_separately():
    model, support, _ = toy_problem()
    params = dict(model.named_parameters())
    only_arch = inner_adapt(model, params, support, InnerLoop(2, 0.0, 0.5))
    assert torch.equal(only_arch["w"], params["w"].detach())
    assert not torch.allclose(only_arch["arch.b"], params["arch.b"])
    only_w = inner_adapt(model, params, support, InnerLoop(2, 0.5, 0.0))
    assert torch.equal(only_w["arch.b"], params["arch.b"].detach())
    assert not torch.allclose(only_w["w"], params["w"])
    frozen = inner_adapt(model, params, support, InnerLoop(2, 0.5, 0.5, adapt_arch=False))
    assert torch.equal(frozen["arch.b"], params["arch.b"].detach())
    ref = manual_adapt(model, params, support, 2, 0.5, 0.5, adapt_arch=False)
    torch.testing.assert_close(frozen["w"], ref["w"])


def test_inner_adapt_step_values_match_manual():
    model, support, _ = toy_problem()
    params = dict(model.named_parameters())
    got = inner_adapt(model, params, support, InnerLoop(2, 0.2, 0.9))
    ref = manual_adapt(model, params, support, 2, 0.2, 0.9)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_second_order_matches_finite_differences_and_differs_from_first_order():
    model, support, query = toy_problem(torch.float64)
    inner = InnerLoop(steps=2, lr_w=0.5, lr_alpha=0.8)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def meta_loss(p):
        adapted = inner_adapt(model, p, support, inner)
        with torch.no_grad():
            return float(loss_on(model, adapted, query))

    so, loss = second_order_task_gradient(model, params, support, query, inner)
    fo, _ = fomaml_task_gradient(model, params, support, query, inner)
    assert loss == pytest.approx(meta_loss(params), rel=1e-12)
    eps = 1e-6
    for k, v in params.items():
        fd = torch.zeros_like(v)
        for idx in np.ndindex(*v.shape):
            plus = {kk: vv.clone() for kk, vv in params.items()}
            minus = {kk: vv.clone() for kk, vv in params.items()}
            plus[k][idx] += eps
            minus[k][idx] -= eps
            fd[idx] = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
        torch.testing.assert_close(so[k], fd, rtol=1e-5, atol=1e-7)
    diff = sum(float((so[k] - fo[k]).abs().sum()) for k in so)
    assert diff > 1e-3, "second-order and first-order gradients must differ"


def test_second_order_without_inner_steps_equals_first_order():
    model, support, query = toy_problem(torch.float64)
    inner = InnerLoop(steps=0, lr_w=0.5, lr_alpha=0.5)
    params = dict(model.named_parameters())
    so, _ = second_order_task_gradient(model, params, support, query, inner)
    fo, _ = fomaml_task_gradient(model, params, support, query, inner)
    for k in so:
        torch.testing.assert_close(so[k], fo[k])


def test_fomaml_on_search_model_matches_manual_one_step():
    space = tiny_space(num_classes=3, in_channels=1, num_cells=2, primitives=("none", "avg_pool_3x3", "skip_connect", "sep_conv_3x3"))
    model = SearchModel(space)
    randomize_arch(model, scale=0.5)
    fw = dict(settings=RelaxSettings(tau=1.0, mode="softmax", noise=False, threshold=0.0), masks=None, generator=None)
    g = torch.Generator().manual_seed(0)
    support = (torch.randn(6, 1, 8, 8, generator=g), torch.randint(3, (6,), generator=g))
    query = (torch.randn(6, 1, 8, 8, generator=g), torch.randint(3, (6,), generator=g))
    params = dict(model.named_parameters())
    grads, _ = fomaml_task_gradient(model, params, support, query, InnerLoop(1, 0.1, 0.3), **fw)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    ls = F.cross_entropy(functional_call(model, leaves, (support[0],), fw), support[1])
    gs = torch.autograd.grad(ls, list(leaves.values()))
    adapted = {k: (v.detach() - (0.3 if is_arch(k) else 0.1) * gr).requires_grad_(True)
               for (k, v), gr in zip(leaves.items(), gs)}
    lq = F.cross_entropy(functional_call(model, adapted, (query[0],), fw), query[1])
    ref = dict(zip(adapted, torch.autograd.grad(lq, list(adapted.values()))))
    assert any(k.startswith("arch.alpha") for k in grads) and any(k.startswith("arch.beta") for k in grads)
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_masked_alpha_entries_get_exactly_zero_meta_gradient():
    space = tiny_space(num_classes=3, in_channels=1, num_cells=2, primitives=SMALL_OPS)
    model = SearchModel(space)
    masks = random_masks(space, model, seed=1)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 1, 8, 8, generator=g), torch.randint(3, (4,), generator=g))
    fw = dict(settings=RelaxSettings(tau=0.7, mode="gumbel-soft", threshold=0.0), masks=masks, generator=g)
    grads, _ = fomaml_task_gradient(model, dict(model.named_parameters()), batch, batch, InnerLoop(1, 0.1, 0.1), **fw)
    for name, m in masks.items():
        assert torch.all(grads[name][~m] == 0)
        assert torch.any(grads[name][m] != 0)


# =============================================================================================
# 7. Aggregation


def three_states():
    rng = np.random.default_rng(0)
    shapes = {"net.w": (3, 2), "net.b": (4,), "arch.alpha.normal": (5, 4), "arch.beta.normal-3": (3,)}
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]


def test_weighted_average_is_sample_weighted_mean_of_weights_and_logits():
    states = three_states()
    copies = [{k: v.copy() for k, v in s.items()} for s in states]
    n = [10, 30, 60]
    avg = weighted_average(states, n)
    for k in states[0]:
        want = sum(ni * s[k].astype(np.float64) for ni, s in zip(n, states)) / sum(n)
        np.testing.assert_allclose(avg[k], want, rtol=1e-6, atol=1e-6)
        assert avg[k].dtype == states[0][k].dtype
    for s, c in zip(states, copies):
        for k in s:
            np.testing.assert_array_equal(s[k], c[k])
    # not the plain mean
    assert not np.allclose(avg["net.w"], np.mean([s["net.w"] for s in states], axis=0))
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average(states, [0, 0, 0])


def test_transform_logits():
    s = three_states()[0]
    copy = {k: v.copy() for k, v in s.items()}
    assert transform_logits(s, "logits") is s or all(np.array_equal(transform_logits(s, "logits")[k], s[k]) for k in s)
    c = transform_logits(s, "centered")
    ls = transform_logits(s, "log-softmax")
    for k in s:
        np.testing.assert_array_equal(s[k], copy[k])  # input not mutated
        if is_arch(k):
            np.testing.assert_allclose(c[k].mean(-1), 0, atol=1e-6)
            np.testing.assert_allclose(np.log(np.exp(ls[k].astype(np.float64)).sum(-1)), 0, atol=1e-6)
            # same distribution as the raw logits
            np.testing.assert_allclose(torch.softmax(torch.from_numpy(c[k]), -1).numpy(),
                                       torch.softmax(torch.from_numpy(s[k]), -1).numpy(), rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(c[k], s[k])
            np.testing.assert_array_equal(ls[k], s[k])
    with pytest.raises(ValueError):
        transform_logits(s, "bogus")


def test_reply_problem_screens_bad_replies():
    ref = three_states()[0]
    good = {k: v + 0.1 for k, v in ref.items()}
    assert reply_problem(good, ref) is None
    nan = dict(good, **{"net.w": np.full((3, 2), np.nan, np.float32)})
    assert "non-finite" in reply_problem(nan, ref)
    inf = dict(good, **{"arch.alpha.normal": np.full((5, 4), np.inf, np.float32)})
    assert "non-finite" in reply_problem(inf, ref)
    shape = dict(good, **{"net.b": np.zeros(5, np.float32)})
    assert "shape" in reply_problem(shape, ref)
    names = {("net.x" if k == "net.b" else k): v for k, v in good.items()}
    assert "names" in reply_problem(names, ref)
    missing = {k: v for k, v in good.items() if k != "net.b"}
    assert reply_problem(missing, ref) is not None
    huge = dict(good, **{"net.w": np.full((3, 2), 1e6, np.float32)})
    assert "norm" in reply_problem(huge, ref)


# =============================================================================================
# 8. Masks


def mask_space():
    return tiny_space(primitives=("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3"), num_nodes=2, input_pruning=True)


def test_update_masks_prunes_low_probability_entries_and_keeps_the_best():
    space = mask_space()
    E = len(space.topology.edges)
    a = torch.zeros(E, 4)
    a[0] = torch.tensor([0.0, 0.1, 0.0, -1.0])  # at tau 0.1: op 3 prob ~ e^-11 -> pruned
    a[1] = torch.tensor([5.0, 0.0, -0.1, -0.3])  # none dominates: best real op (1) is kept
    b = torch.tensor([2.0, 0.0, -0.5])
    arch = {"arch.alpha.normal": a, "arch.alpha.reduce": a.clone(), "arch.beta.normal-3": b}
    m = update_masks(space, arch, {}, threshold=0.01, tau_min=0.1)
    probs = probabilities(a, tau=0.1)
    want = probs >= 0.01
    want[torch.arange(E), 1 + probs[:, 1:].argmax(-1)] = True
    assert torch.equal(m["arch.alpha.normal"], want)
    assert not m["arch.alpha.normal"][0, 3]
    assert m["arch.alpha.normal"][1, 1]
    assert torch.equal(m["arch.beta.normal-3"], torch.tensor([True, False, False]))
    assert m["arch.alpha.normal"].dtype == torch.bool
    # threshold 0: nothing ever masked
    m0 = update_masks(space, arch, {}, threshold=0.0, tau_min=0.1)
    assert all(bool(v.all()) for v in m0.values())


def test_update_masks_is_monotone():
    space = mask_space()
    E = len(space.topology.edges)
    a = torch.zeros(E, 4)
    a[:, 3] = -2.0
    m1 = update_masks(space, {"arch.alpha.normal": a}, {}, 0.01, 0.1)
    assert not m1["arch.alpha.normal"][:, 3].any()
    a2 = a.clone()
    a2[:, 3] = 3.0  # the pruned op's logit rises above all others
    m2 = update_masks(space, {"arch.alpha.normal": a2}, m1, 0.01, 0.1)
    assert not m2["arch.alpha.normal"][:, 3].any(), "a pruned entry must stay pruned"
    assert torch.all(m2["arch.alpha.normal"] <= m1["arch.alpha.normal"])
    assert m1["arch.alpha.normal"] is not m2["arch.alpha.normal"]


def test_update_masks_random_rounds_monotone_and_well_formed():
    space = mask_space()
    model = SearchModel(space)
    masks = {}
    g = torch.Generator().manual_seed(0)
    none = 0
    for _ in range(6):
        arch = {k: 3 * torch.randn(v.shape, generator=g) for k, v in arch_state(model).items()}
        new = update_masks(space, arch, masks, 0.05, 0.3)
        for k, m in new.items():
            if k in masks:
                assert torch.all(m <= masks[k])
            if ".alpha." in k:
                real = m.clone()
                real[:, none] = False
                assert torch.all(real.any(-1))
            else:
                assert m.any()
        masks = new
    stats = arch_statistics(space, {k: torch.randn(v.shape) for k, v in arch_state(model).items()}, masks, 1.0)
    assert 0 <= stats["pruned-fraction"] <= 1


def test_update_masks_guard_survives_probability_underflow():
    space = mask_space()
    E = len(space.topology.edges)
    a = torch.zeros(E, 4)
    a[0] = torch.tensor([20.0, 0.0, 1.0, -1.0])  # at tau 0.1 every real op's prob underflows to 0
    old = torch.ones(E, 4, dtype=torch.bool)
    old[0, 1] = False  # op 1 was pruned in an earlier round
    m = update_masks(space, {"arch.alpha.normal": a}, {"arch.alpha.normal": old}, 0.01, 0.1)["arch.alpha.normal"]
    assert not m[0, 1], "monotone: a pruned op must not come back"
    assert m[0, 2], "the best real op (largest real logit) must never be masked"


def test_keep_budget_goes_linearly_from_all_entries_to_one():
    assert [keep_budget(8, d) for d in (0.0, 0.25, 0.5, 0.75, 1.0)] == [8, 7, 5, 3, 1]
    assert keep_budget(1, 0.5) == 1 and keep_budget(3, 1.0) == 1 and keep_budget(3, -1.0) == 3


def test_discreteness_caps_each_row_to_the_best_real_op_plus_next_logits():
    space = tiny_space(input_pruning=True)
    model = SearchModel(space)
    randomize_arch(model, scale=2.0, seed=4)
    arch = arch_state(model)
    none = space.primitives.index("none")
    half = update_masks(space, arch, {}, threshold=0.0, tau_min=0.1, discreteness=0.5)
    for name, m in half.items():
        n = m.shape[-1]
        assert torch.all(m.sum(-1) == keep_budget(n, 0.5)), name
        if ".alpha." in name:  # the kept entries are the best real op and the largest other logits
            real = arch[name].clone()
            real[..., none] = float("-inf")
            assert torch.all(m.gather(-1, real.argmax(-1, keepdim=True)))
    one = update_masks(space, arch, half, threshold=0.01, tau_min=0.1, discreteness=1.0)
    for name, m in one.items():
        assert torch.all(m.sum(-1) == 1), name
        assert torch.all(m <= half[name]), "monotone"
        if ".alpha." in name:
            assert not m[..., none].any(), "the last op of an edge is a real op, never 'none'"


def test_discrete_supernet_is_the_derived_network():
    """Once soft pruning is complete the relaxed supernet (Gumbel noise and all) computes the derived cell."""
    space = tiny_space(input_pruning=True)
    model = SearchModel(space)
    randomize_arch(model, scale=1.0, seed=8)
    masks = update_masks(space, arch_state(model), {}, threshold=0.0, tau_min=0.1, discreteness=1.0)
    net = DiscreteNetwork.inherit(model, derive_genotype(space, arch_state(model), masks))
    x = x_batch()
    with torch.no_grad():
        noisy = model(x, RelaxSettings(tau=0.7, mode="gumbel-soft", noise=True, threshold=0.01), masks, torch.Generator().manual_seed(0))
        torch.testing.assert_close(noisy, net(x), rtol=1e-5, atol=1e-5)


def test_later_plain_keys_override_earlier_method_tables(tmp_path):
    from fedmetanas_core.cli import parse_run_config

    preset = tmp_path / "p.toml"
    preset.write_text("num-server-rounds = 10\n[fedmetanas]\ndiscrete-round = 8\nlocal-meta-iters = 4\n")
    flat = parse_run_config([str(preset), "num-server-rounds=3 discrete-round=0"])
    cfg = RunConfig.from_flat(flat, check_paths=False)
    assert (cfg.num_server_rounds, cfg.discrete_round, cfg.local_meta_iters) == (3, 0, 4)


def test_method_tables_apply_to_their_own_method_only():
    preset = {"num-server-rounds": 10, "fednas.num-server-rounds": 4, "fednas.retrain-rounds": 7, "fedavg.local-epochs": 3}
    fednas = RunConfig.from_flat({**preset, "method": "fednas"}, check_paths=False)
    assert (fednas.num_server_rounds, fednas.retrain_rounds, fednas.local_epochs) == (4, 7, 1)
    meta = RunConfig.from_flat(preset, check_paths=False)  # the default method
    assert (meta.method, meta.num_server_rounds, meta.retrain_rounds) == ("fedmetanas", 10, C.BY_NAME["retrain-rounds"].default)
    assert RunConfig.from_flat({**preset, "method": "fedavg"}, check_paths=False).local_epochs == 3


def test_discrete_round_anneals_and_prunes_by_that_round():
    from fedmetanas_core.data import ImageData
    from fedmetanas_core.phases import Handoff, SearchPhase

    cfg = RunConfig.from_flat({"num-server-rounds": 10, "warmup-rounds": 2, "discrete-round": 6, "num-cells": 3,
                               "num-nodes": 2, "init-channels": 4}, check_paths=False)  # fmt: skip
    test = ImageData(torch.randn(4, 3, 8, 8), torch.arange(4) % 2, ("a", "b"))
    phase = SearchPhase(cfg, space_from_config(cfg, 2, 3), test, torch.device("cpu"), cfg.num_server_rounds)
    phase.start(Handoff())
    assert [phase.discreteness(r) for r in (1, 2, 4, 6, 9)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert phase.plan(6).tau == pytest.approx(cfg.tau_min) and phase.plan(9).tau == pytest.approx(cfg.tau_min)
    assert phase.plan(3).tau == pytest.approx(cfg.tau_max)
    assert not phase.is_discrete()
    phase.masks = update_masks(phase.space, phase.arch_state(), {}, 0.01, cfg.tau_min, discreteness=0.5)
    assert not phase.is_discrete()
    phase.masks = update_masks(phase.space, phase.arch_state(), phase.masks, 0.01, cfg.tau_min, discreteness=1.0)
    assert phase.is_discrete()  # the server then evaluates the derived network once for both
    with pytest.raises(ConfigError, match="discrete-round"):
        RunConfig.from_flat({"num-server-rounds": 10, "warmup-rounds": 3, "discrete-round": 3}, check_paths=False)


# =============================================================================================
# 9. Config


def test_config_defaults_and_attribute_access():
    cfg = RunConfig.from_flat({})
    assert dict(cfg) == C.defaults()
    assert cfg.num_server_rounds == C.BY_NAME["num-server-rounds"].default and cfg.tau_min == 0.1 and cfg.input_pruning is True
    assert cfg.primitive_list == PRIMITIVES
    cfg2 = RunConfig.from_flat({"tau-max": 2, "batch-size": 16.0})
    assert cfg2.tau_max == 2.0 and isinstance(cfg2.tau_max, float)
    assert cfg2.batch_size == 16 and isinstance(cfg2.batch_size, int)
    assert cfg.replace(inner_steps=4).inner_steps == 4


def test_pyproject_run_config_matches_config_keys():
    toml = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert list(toml) == [k.name for k in C.KEYS] or set(toml) == {k.name for k in C.KEYS}
    assert set(toml) == {k.name for k in C.KEYS}
    for k in C.KEYS:
        assert toml[k.name] == k.default, k.name
        assert type(toml[k.name]) is type(k.default), k.name
    assert dict(RunConfig.from_flat(toml)) == C.defaults()


@pytest.mark.parametrize(
    "flat, key",
    [
        ({"no-such-key": 1}, "no-such-key"),
        ({"tau-max": 0.05, "tau-min": 0.1}, "tau-max"),
        ({"inner-steps": 0}, "inner-steps"),
        ({"dirichlet-alpha": 0}, "dirichlet-alpha"),
        ({"method": "darts"}, "method"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"partitioner": "random"}, "partitioner"),
        ({"strategy": "FedFoo"}, "strategy"),
        ({"primitives": "none,conv_7x7"}, "primitives"),
        ({"primitives": "none"}, "primitives"),
        ({"primitives": "skip_connect,skip_connect"}, "primitives"),
        ({"seed": "zero"}, "seed"),
        ({"batch-size": 2.5}, "batch-size"),
        ({"input-pruning": 1}, "input-pruning"),
        ({"tau-max": True}, "tau-max"),
        ({"tau-min": float("nan")}, "tau-min"),
        ({"query-fraction": 0.5, "local-test-fraction": 0.5}, "query-fraction"),
        ({"maml-order": 2, "meta-learner": "reptile"}, "maml-order"),
        ({"dataset": "hf"}, "hf-dataset"),
        ({"min-train-nodes": 3}, "min-train-nodes"),
        ({"relax-mode": "hard"}, "relax-mode"),
        ({"fedavg-genotype": "/no/such/genotype.yaml"}, "fedavg-genotype"),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_key(flat, key):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat(flat)
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_bad_int_choice_raises_config_error():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({"maml-order": 3})
    assert info.value.key == "maml-order"


# =============================================================================================
# 10. Seeding


def test_derive_seed_deterministic_and_stream_sensitive():
    a = derive_seed(0, "gumbel", 3, 7)
    assert a == derive_seed(0, "gumbel", 3, 7)
    others = {derive_seed(1, "gumbel", 3, 7), derive_seed(0, "task", 3, 7), derive_seed(0, "gumbel", 4, 7),
              derive_seed(0, "gumbel", 3, 8), derive_seed(0, "gumbel", 7, 3), derive_seed(0, "gumbel", 3)}
    assert a not in others and len(others) == 6
    assert 0 <= a < 2**63
    x = torch.rand(5, generator=make_generator(0, "x"))
    assert torch.equal(x, torch.rand(5, generator=make_generator(0, "x")))
    assert not torch.equal(x, torch.rand(5, generator=make_generator(0, "y")))


# =============================================================================================
# 11. Outputs


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_recorder_and_derived_model_round_trip(tmp_path):
    space = tiny_space(num_classes=4, in_channels=1)
    model = SearchModel(space)
    randomize_arch(model, seed=1)
    genotype = derive_genotype(space, arch_state(model))
    net = DiscreteNetwork.inherit(model, genotype).eval()
    rec = O.RunRecorder(tmp_path / "run")
    rec.write_config(dict(RunConfig.from_flat({})))
    rec.write_genotype(genotype)
    rec.log_round({"round": 1, "accuracy": 0.5})
    rec.log_round({"round": 2, "accuracy": 0.6})
    rec.write_summary({"best": 0.6})
    path = rec.save_model(net, space, genotype)
    assert path == tmp_path / "run" / O.MODEL_FILE
    loaded = O.load_derived_model(tmp_path / "run")
    assert isinstance(loaded, DiscreteNetwork) and loaded.genotype == genotype
    x = x_batch(c=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert Genotype.load_yaml(tmp_path / "run" / "genotype.yaml") == genotype
    assert len((tmp_path / "run" / "rounds.jsonl").read_text().splitlines()) == 2
    assert no_temp_files(tmp_path / "run")
    fresh = O.RunRecorder(tmp_path / "run")  # a new run into the same directory logs only its own rounds
    fresh.start_log()
    fresh.log_round({"round": 1, "accuracy": 0.7})
    assert [json.loads(ln)["accuracy"] for ln in (tmp_path / "run" / "rounds.jsonl").read_text().splitlines()] == [0.7]

    cnn = SimpleCNN(space).eval()
    rec2 = O.RunRecorder(tmp_path / "cnn")
    rec2.save_model(cnn, space, None)
    loaded2 = O.load_derived_model(tmp_path / "cnn" / O.MODEL_FILE)
    assert isinstance(loaded2, SimpleCNN)
    with torch.no_grad():
        torch.testing.assert_close(loaded2(x), cnn(x), rtol=0, atol=0)
    assert no_temp_files(tmp_path / "cnn")

    narrow = SimpleCNN(space, channels=3).eval()  # the parameter-matched baseline's width survives a save
    O.RunRecorder(tmp_path / "narrow").save_model(narrow, space, None)
    loaded3 = O.load_derived_model(tmp_path / "narrow")
    assert loaded3.channels == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded3(x), narrow(x), rtol=0, atol=0)


def test_atomic_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    A.atomic_write_text(target, "old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(A.os, "replace", boom)
    with pytest.raises(OSError):
        A.atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


# =============================================================================================
# 12. Local training on tiny real data, and the round protocol


@pytest.fixture(scope="module")
def client_data() -> ClientData:
    cd = load_client_data(DataSpec(dataset="digits", seed=0, partition_id=0, num_partitions=5))
    return ClientData(cd.train.subset(list(range(24))), cd.query.subset(list(range(16))), cd.test.subset(list(range(16))), 0)


TINY = {
    "num-cells": 2, "num-nodes": 2, "init-channels": 4, "stem-multiplier": 1, "batch-size": 8,
    "primitives": "none,max_pool_3x3,skip_connect,sep_conv_3x3", "local-meta-iters": 2,
    "tasks-per-meta-batch": 2, "inner-steps": 1, "local-epochs": 1, "alpha-weight-decay": 0.0,
    "outer-lr-alpha": 0.05,
}


def run_search(cfg, data, masks=None, frozen=False, seed=0):
    space = space_from_config(cfg, data.train.num_classes, data.train.in_channels)
    torch.manual_seed(seed)
    model = SearchModel(space)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = RoundPlan(1, 0.8, frozen, masks if masks is not None else {})
    res = fedmetanas_local_search(model, data, cfg, plan, torch.Generator().manual_seed(seed), torch.device("cpu"))
    return model, before, res


@pytest.mark.parametrize("query_source", ["query-split", "train"])
def test_discrete_local_search_trains_the_derived_network_like_the_supernet(client_data, query_source):
    """Once masks leave one op per edge and one pair per node, local search runs on the derived
    network; the reply's live weights equal what meta-training the masked supernet gives."""
    from fedmetanas_core.training import _meta_train, arch_optimizer, train_settings

    cfg = RunConfig.from_flat({**TINY, "local-meta-iters": 1, "tasks-per-meta-batch": 1, "query-source": query_source})
    space = space_from_config(cfg, client_data.train.num_classes, client_data.train.in_channels)
    model = SearchModel(space)
    randomize_arch(model, scale=1.0, seed=8)
    masks = update_masks(space, arch_state(model), {}, threshold=0.0, tau_min=0.1, discreteness=1.0)
    reference = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = RoundPlan(5, 0.1, False, masks, lr_w=0.05)
    fedmetanas_local_search(model, client_data, cfg, plan, torch.Generator().manual_seed(3), torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    fw = dict(settings=train_settings(cfg, plan.tau), masks=masks, generator=generator)
    reference.train()
    _meta_train(reference, reference.net, arch_optimizer(reference, cfg), client_data, cfg, plan, generator, torch.device("cpu"), 0.0, fw)
    live = ["net." + k for k in DiscreteNetwork(space, derive_genotype(space, arch_state(model), masks)).state_dict()]
    got, want = model.state_dict(), reference.state_dict()
    assert any(not torch.equal(got[k], before[k]) for k in live if k.endswith("weight")), "the live weights trained"
    for k in live:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def _discrete_round(data: ClientData, monkeypatch, rename: dict[str, str] | None = None):
    """A supernet whose masks are discrete, its round plan, and the derived networks local search
    trains (captured from ``DiscreteNetwork.inherit``); ``rename`` renames keys of their state dict."""
    cfg = RunConfig.from_flat({**TINY, "local-meta-iters": 1, "tasks-per-meta-batch": 1})
    space = space_from_config(cfg, data.train.num_classes, data.train.in_channels)
    model = SearchModel(space)
    randomize_arch(model, scale=1.0, seed=8)
    masks = update_masks(space, arch_state(model), {}, threshold=0.0, tau_min=0.1, discreteness=1.0)
    derived, inherit = [], DiscreteNetwork.inherit.__func__

    def spy(cls, supernet, genotype):
        net = inherit(cls, supernet, genotype)
        if rename:
            state_dict = net.state_dict
            net.state_dict = lambda *a, **k: {rename.get(n, n): v for n, v in state_dict(*a, **k).items()}
        derived.append(net)
        return net

    monkeypatch.setattr(DiscreteNetwork, "inherit", classmethod(spy))
    return cfg, model, RoundPlan(5, 0.1, False, masks, lr_w=0.05), derived


def test_discrete_local_search_writes_every_derived_weight_back(client_data, monkeypatch):
    cfg, model, plan, derived = _discrete_round(client_data, monkeypatch)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    fedmetanas_local_search(model, client_data, cfg, plan, torch.Generator().manual_seed(3), torch.device("cpu"))
    (net,) = derived
    trained, after = net.state_dict(), model.net.state_dict()
    assert set(trained) < set(after)
    for k, v in trained.items():  # every tensor of the derived network's state
        assert torch.equal(after[k], v), f"{k} not written back"
    assert any(not torch.equal(after[k], before[k]) for k in trained if k.endswith("weight")), "nothing trained"
    for k in set(after) - set(trained):  # the pruned ops stay as they were
        assert torch.equal(after[k], before[k]), f"pruned {k} changed"


def test_discrete_local_search_refuses_a_derived_weight_the_supernet_lacks(client_data, monkeypatch):
    """A renamed key would load nothing under strict=False: this round's training silently lost."""
    cfg, model, plan, _ = _discrete_round(client_data, monkeypatch, rename={"classifier.weight": "head.weight"})
    with pytest.raises(KeyError, match="head.weight"):
        fedmetanas_local_search(model, client_data, cfg, plan, torch.Generator().manual_seed(3), torch.device("cpu"))


@pytest.mark.parametrize("variant", [{}, {"relax-mode": "gumbel-hard"}, {"maml-order": 2}, {"meta-learner": "reptile"}])
def test_fedmetanas_local_search_updates_everything_but_masked_logits(client_data, variant):
    cfg = RunConfig.from_flat({**TINY, **variant})
    space = space_from_config(cfg, 10, 1)
    assert space.input_pruning
    masks = random_masks(space, SearchModel(space), seed=3)
    model, before, res = run_search(cfg, client_data, masks)
    after = model.state_dict()
    assert math.isfinite(res.train_loss) and res.steps == cfg.local_meta_iters
    # query-source = train (the default) draws support and query batches from all training data
    assert res.num_examples == len(client_data.pool if cfg.query_source == "train" else client_data.train)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(NET_PREFIX))
    for name, m in masks.items():
        assert not torch.equal(before[name][m], after[name][m]), f"{name} not searched"
        # zero gradient on masked entries: with no alpha weight decay Adam / Reptile leave them exactly as they were
        assert torch.equal(before[name][~m], after[name][~m]), f"masked entries of {name} moved"
        w = model.cell_weights(name.split(".")[-1], RelaxSettings(tau=0.8), masks, torch.Generator().manual_seed(0)).weights
        assert torch.all(w[~m] == 0)


def test_query_source_decides_which_examples_the_meta_step_sees(client_data):
    """query-split: the held-out query split is the meta step's data; train: all training data is."""
    poisoned = ClientData(client_data.train, client_data.query.subset(list(range(16))), client_data.test, 0)
    poisoned.query.x[:] = float("nan")  # a query split that must never reach a forward pass when 'train'
    held_out = RunConfig.from_flat({**TINY, "query-source": "query-split"})
    model, _, res = run_search(held_out, poisoned)
    assert res.num_examples == len(client_data.train)
    assert not all(torch.isfinite(v).all() for v in model.state_dict().values()), "query split unused"
    pooled = RunConfig.from_flat({**TINY, "query-source": "train"})
    model, _, res = run_search(pooled, client_data)
    assert res.num_examples == len(client_data.train) + len(client_data.query) == len(client_data.pool)
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert torch.equal(client_data.pool.x[: len(client_data.train)], client_data.train.x)
    assert torch.equal(client_data.pool.y[len(client_data.train) :], client_data.query.y)


def test_fedmetanas_local_search_frozen_alphas_stay(client_data):
    cfg = RunConfig.from_flat(TINY)
    model, before, _ = run_search(cfg, client_data, frozen=True)
    after = model.state_dict()
    for k in after:
        if is_arch(k):
            assert torch.equal(before[k], after[k])
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(NET_PREFIX))


def test_fedmetanas_local_search_is_reproducible(client_data):
    cfg = RunConfig.from_flat(TINY)
    m1, _, r1 = run_search(cfg, client_data, seed=4)
    m2, _, r2 = run_search(cfg, client_data, seed=4)
    m3, _, _ = run_search(cfg, client_data, seed=5)
    assert r1.train_loss == r2.train_loss
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_fednas_local_search_updates_weights_and_alphas(client_data):
    cfg = RunConfig.from_flat({**TINY, "method": "fednas"})
    space = space_from_config(cfg, 10, 1)
    assert not space.input_pruning
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SearchModel(space)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        res = fednas_local_search(model, client_data, cfg, RoundPlan(1, 1.0), torch.Generator().manual_seed(0), torch.device("cpu"))
        after = model.state_dict()
        assert res.steps == math.ceil(len(client_data.train) / cfg.batch_size)
        assert math.isfinite(res.train_loss)
        assert all(torch.isfinite(v).all() for v in after.values())
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(NET_PREFIX))
        assert all(not torch.equal(before[k], after[k]) for k in after if is_arch(k))
        results.append(after)
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@pytest.mark.parametrize("kind", ["cnn", "genotype"])
def test_train_fixed_changes_weights_and_is_reproducible(client_data, kind):
    cfg = RunConfig.from_flat(TINY)
    space = space_from_config(cfg, 10, 1)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        if kind == "cnn":
            net = SimpleCNN(space)
        else:
            net = DiscreteNetwork(space, derive_genotype(space, arch_state(SearchModel(space))))
        before = {k: v.detach().clone() for k, v in net.state_dict().items()}
        res = train_fixed(net, client_data, cfg, RoundPlan(1, 1.0, local_epochs=1), torch.Generator().manual_seed(0), torch.device("cpu"))
        after = net.state_dict()
        assert math.isfinite(res.train_loss)
        assert any(not torch.equal(before[k], after[k]) for k in after)
        outs.append(after)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_round_plan_config_round_trip():
    space = mask_space()
    model = SearchModel(space)
    masks = random_masks(space, model, seed=0)
    plan = RoundPlan(3, 0.42, True, masks, lr_w=0.05, local_epochs=4)
    cfg = plan_to_config(plan)
    assert all(isinstance(v, (int, float, bool, str, list)) for v in cfg.values())
    back = plan_from_config(cfg, {k: v.shape for k, v in masks.items()})
    assert back.server_round == 3 and back.tau == pytest.approx(0.42) and back.alpha_frozen is True
    assert back.lr_w == pytest.approx(0.05) and back.local_epochs == 4
    assert plan_from_config(plan_to_config(RoundPlan(1, 1.0)), {}).local_epochs is None  # unset: local-epochs
    assert set(back.masks) == set(masks)
    for k in masks:
        assert torch.equal(back.masks[k], masks[k])


@pytest.mark.parametrize("preset", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "conf").glob("*.toml")))
def test_every_preset_is_valid_for_every_method(preset):
    from fedmetanas_core.cli import parse_run_config

    flat = parse_run_config([str(Path(__file__).resolve().parents[1] / "conf" / preset)])
    for method in C.METHODS:
        cfg = RunConfig.from_flat({**flat, "method": method}, check_paths=False)
        assert cfg.method == method


def test_learning_rate_schedule_cosine_per_stage_and_sent_each_round():
    from fedmetanas_core.coordinator import LearningRateSchedule, plan_from_config, plan_to_config
    from fedmetanas_core.data import ImageData
    from fedmetanas_core.phases import RetrainPhase, SearchPhase

    cosine = LearningRateSchedule(0.1, 0.001, 5, "cosine")
    assert cosine(1) == pytest.approx(0.1) and cosine(5) == pytest.approx(0.001) and cosine(3) == pytest.approx(0.0505)
    assert all(cosine(r) > cosine(r + 1) for r in range(1, 5))
    assert LearningRateSchedule(0.1, 0.0, 5)(4) == 0.1  # constant
    cfg = RunConfig.from_flat({"method": "fednas", "num-server-rounds": 4, "retrain-rounds": 3, "lr-schedule": "cosine",
                               "outer-lr-w": 0.1, "lr-min": 0.01, "num-cells": 3, "num-nodes": 2, "init-channels": 4}, check_paths=False)  # fmt: skip
    test = ImageData(torch.randn(4, 3, 8, 8), torch.arange(4) % 2, ("a", "b"))
    space = space_from_config(cfg, 2, 3)
    search = SearchPhase(cfg, space, test, torch.device("cpu"), cfg.num_server_rounds)
    retrain = RetrainPhase(cfg, space, test, torch.device("cpu"), cfg.retrain_rounds)
    assert [round(search.plan(r).lr_w, 4) for r in (1, 4)] == [0.1, 0.01]
    assert [round(retrain.plan(r).lr_w, 4) for r in (1, 3)] == [0.1, 0.01], "each stage anneals over its own rounds"
    sent = plan_from_config(plan_to_config(retrain.plan(2)), {})
    assert sent.lr_w == pytest.approx(retrain.plan(2).lr_w)
    assert sent.local_epochs == cfg.retrain_local_epochs and search.plan(1).local_epochs is None  # each phase's own epochs
    with pytest.raises(ConfigError, match="lr-min"):
        RunConfig.from_flat({"lr-min": 0.5}, check_paths=False)


def test_train_fixed_uses_the_rounds_learning_rate(client_data):
    cfg = RunConfig.from_flat(TINY)
    space = space_from_config(cfg, 10, 1)
    net = SimpleCNN(space)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    train_fixed(net, client_data, cfg, RoundPlan(1, 1.0, lr_w=0.0), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in net.named_parameters())
    train_fixed(net, client_data, cfg, RoundPlan(1, 1.0, lr_w=0.05), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert any(not torch.equal(before[k], v) for k, v in net.named_parameters())


def test_evaluation_never_normalises_an_example_on_its_own():
    """Issue 27 (3): the networks' BatchNorm uses batch statistics, so no evaluation batch may hold
    a single example: a 1-example tail joins the previous batch, a 1-example split is refused."""
    from fedmetanas_core.data import DataError, ImageData
    from fedmetanas_core.training import evaluate

    torch.manual_seed(0)
    norm = nn.BatchNorm2d(1, affine=False, track_running_stats=False)
    head = nn.Linear(4, 3)
    sizes: list[int] = []

    def forward(x):
        sizes.append(len(x))
        return head(norm(x).flatten(1))

    for n in range(2, 14):
        data = ImageData(torch.randn(n, 1, 2, 2), torch.randint(0, 3, (n,)), ("a", "b", "c"))
        for batch_size in (2, 3, 4, 5, 512):
            sizes.clear()
            result = evaluate(forward, data, batch_size, torch.device("cpu"))
            assert min(sizes) >= 2 and sum(sizes) == n, (n, batch_size, sizes)
            assert max(sizes) <= batch_size + 1
            # scores are over every example, each normalised with the batch it was evaluated in
            start, correct, loss = 0, 0, 0.0
            for size in sizes:
                with torch.no_grad():
                    logits = head(norm(data.x[start : start + size]).flatten(1))
                correct += int((logits.argmax(1) == data.y[start : start + size]).sum())
                loss += float(F.cross_entropy(logits, data.y[start : start + size], reduction="sum"))
                start += size
            assert result["accuracy"] == correct / n and result["loss"] == pytest.approx(loss / n)
    one = ImageData(torch.randn(1, 1, 2, 2), torch.tensor([0]), ("a", "b", "c"))
    with pytest.raises(DataError, match="split of 1 example"):
        evaluate(forward, one, 512, torch.device("cpu"))

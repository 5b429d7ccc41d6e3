"""Local training on tiny real data (digits) and the round protocol: FedMetaNAS and FedNAS local
search, fixed-network training, the round plan sent to clients, learning-rate schedules and
evaluation batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import arch_state, mask_space, random_masks, randomize_arch

from fedmetanas_core.data import ClientData, DataSpec, load_client_data
from fedmetanas_core.federation.coordinator import plan_from_config, plan_to_config
from fedmetanas_core.method.aggregation import update_masks
from fedmetanas_core.method.genotype import DiscreteNetwork, SimpleCNN, derive_genotype
from fedmetanas_core.method.training import (
    RoundPlan,
    fedmetanas_local_search,
    fednas_local_search,
    space_from_config,
    train_fixed,
)
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.space import NET_PREFIX, RelaxSettings, SearchModel, is_arch

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


@pytest.fixture(scope="module")
def client_data() -> ClientData:
    cd = load_client_data(DataSpec(dataset="digits", seed=0, partition_id=0, num_partitions=5))
    return ClientData(
        cd.train.subset(list(range(24))), cd.query.subset(list(range(16))), cd.test.subset(list(range(16))), 0
    )


TINY = {
    "num-cells": 2,
    "num-nodes": 2,
    "init-channels": 4,
    "stem-multiplier": 1,
    "batch-size": 8,
    "primitives": "none,max_pool_3x3,skip_connect,sep_conv_3x3",
    "local-meta-iters": 2,
    "tasks-per-meta-batch": 2,
    "inner-steps": 1,
    "local-epochs": 1,
    "alpha-weight-decay": 0.0,
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
    from fedmetanas_core.method.training import arch_optimizer, meta_train, train_settings

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
    meta_train(
        reference,
        reference.net,
        arch_optimizer(reference, cfg),
        client_data,
        cfg,
        plan,
        generator,
        torch.device("cpu"),
        0.0,
        fw,
    )
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
        w = model.cell_weights(
            name.split(".")[-1], RelaxSettings(tau=0.8), masks, torch.Generator().manual_seed(0)
        ).weights
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
        res = fednas_local_search(
            model, client_data, cfg, RoundPlan(1, 1.0), torch.Generator().manual_seed(0), torch.device("cpu")
        )
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
        res = train_fixed(
            net,
            client_data,
            cfg,
            RoundPlan(1, 1.0, local_epochs=1),
            torch.Generator().manual_seed(0),
            torch.device("cpu"),
        )
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


def test_learning_rate_schedule_cosine_per_stage_and_sent_each_round():
    from fedmetanas_core.data import ImageData
    from fedmetanas_core.federation.coordinator import LearningRateSchedule, plan_from_config, plan_to_config
    from fedmetanas_core.federation.phases import RetrainPhase, SearchPhase

    cosine = LearningRateSchedule(0.1, 0.001, 5, "cosine")
    assert cosine(1) == pytest.approx(0.1) and cosine(5) == pytest.approx(0.001) and cosine(3) == pytest.approx(0.0505)
    assert all(cosine(r) > cosine(r + 1) for r in range(1, 5))
    assert LearningRateSchedule(0.1, 0.0, 5)(4) == 0.1  # constant
    cfg = RunConfig.from_flat(
        {
            "method": "fednas",
            "num-server-rounds": 4,
            "retrain-rounds": 3,
            "lr-schedule": "cosine",
            "outer-lr-w": 0.1,
            "lr-min": 0.01,
            "num-cells": 3,
            "num-nodes": 2,
            "init-channels": 4,
        },
        check_paths=False,
    )
    test = ImageData(torch.randn(4, 3, 8, 8), torch.arange(4) % 2, ("a", "b"))
    space = space_from_config(cfg, 2, 3)
    search = SearchPhase(cfg, space, test, torch.device("cpu"), cfg.num_server_rounds)
    retrain = RetrainPhase(cfg, space, test, torch.device("cpu"), cfg.retrain_rounds)
    assert [round(search.plan(r).lr_w, 4) for r in (1, 4)] == [0.1, 0.01]
    assert [round(retrain.plan(r).lr_w, 4) for r in (1, 3)] == [0.1, 0.01], "each stage anneals over its own rounds"
    sent = plan_from_config(plan_to_config(retrain.plan(2)), {})
    assert sent.lr_w == pytest.approx(retrain.plan(2).lr_w)
    assert (
        sent.local_epochs == cfg.retrain_local_epochs and search.plan(1).local_epochs is None
    )  # each phase's own epochs
    with pytest.raises(ConfigError, match="lr-min"):
        RunConfig.from_flat({"lr-min": 0.5}, check_paths=False)


def test_train_fixed_uses_the_rounds_learning_rate(client_data):
    cfg = RunConfig.from_flat(TINY)
    space = space_from_config(cfg, 10, 1)
    net = SimpleCNN(space)
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    train_fixed(
        net, client_data, cfg, RoundPlan(1, 1.0, lr_w=0.0), torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert all(torch.equal(before[k], v) for k, v in net.named_parameters())
    train_fixed(
        net, client_data, cfg, RoundPlan(1, 1.0, lr_w=0.05), torch.Generator().manual_seed(0), torch.device("cpu")
    )
    assert any(not torch.equal(before[k], v) for k, v in net.named_parameters())


def test_evaluation_never_normalises_an_example_on_its_own():
    """Issue 27 (3): the networks' BatchNorm uses batch statistics, so no evaluation batch may hold
    a single example: a 1-example tail joins the previous batch, a 1-example split is refused."""
    from fedmetanas_core.data import DataError, ImageData
    from fedmetanas_core.method.training import evaluate

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

"""The cost model, the budget and budgeted search (fedmetanas_core.space.cost, .budget, .latency).

Counted MACs are checked against torch's own counter on whole networks; derivation within a budget
against brute force; the cost term by what a search step does to the expected cost.
"""

import itertools
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedmetanas_core.data import ClientData, ImageData
from fedmetanas_core.deployment.latency import CNN_PROFILE_WIDTHS, LatencyTable, add_cnn_entries, profile_space
from fedmetanas_core.federation.coordinator import plan_from_config, plan_to_config
from fedmetanas_core.method.aggregation import masks_are_discrete, update_masks
from fedmetanas_core.method.budget import (
    Budget,
    choice_masks,
    cnn_width_within,
    cost_model,
    cost_report,
    fixed_network_width,
    latency_table,
    most_likely_within,
    network_cost,
    sized_space,
    uniform_expected_cost,
)
from fedmetanas_core.method.genotype import (
    DiscreteNetwork,
    Genotype,
    SimpleCNN,
    count_parameters,
    derive_genotype,
    random_genotype,
)
from fedmetanas_core.method.training import RoundPlan, fedmetanas_local_search, fednas_local_search, run_settings
from fedmetanas_core.names import ARCH_PREFIX, CELL_TYPES, arch_param_name
from fedmetanas_core.run.config import ConfigError, RunConfig, defaults
from fedmetanas_core.space import SearchModel, SpaceConfig, fast_path
from fedmetanas_core.space.cost import CostModel, counted_cost_model
from fedmetanas_core.space.relaxation import probabilities
from harness.cli import main as cli_main

SPACES = [
    (SpaceConfig(10, 1, 8, 2, 2), (8, 8)),  # the default run's
    (
        SpaceConfig(
            10, 3, 8, 3, 2, primitives=("skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5")
        ),
        (16, 16),
    ),
    (SpaceConfig(10, 1, 6, 5, 3), (7, 7)),  # odd sizes, two reduction cells
    (SpaceConfig(10, 1, 3, 2, 2, reduction_positions=(0, 1)), (8, 8)),  # every cell reduces (reduction-cells)
    (SpaceConfig(10, 3, 4, 3, 2, primitives=("skip_connect", "sep_conv_3x3", "conv_3x3")), (9, 9)),  # full convs
]


def _arch(model: SearchModel) -> dict[str, torch.Tensor]:
    return {ARCH_PREFIX + k: v.detach() for k, v in model.arch.state_dict().items()}


def _random_arch(space: SpaceConfig, seed: int, scale: float = 2.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = SearchModel(space)
    with torch.no_grad():
        for p in model.arch.parameters():
            p.copy_(scale * torch.randn_like(p))
    return _arch(model)


@pytest.mark.parametrize("space,image_hw", SPACES)
def test_counted_macs_and_params_match_torch_on_whole_networks(space, image_hw):
    macs, params = counted_cost_model(space, image_hw, "macs"), counted_cost_model(space, image_hw, "params")
    for seed in range(4):
        g = random_genotype(space.primitives, space.num_nodes, seed)
        net = DiscreteNetwork(space, g)
        with (
            fast_path(False),
            FlopCounterMode(display=False) as counter,
        ):  # the network's definition, not the fast kernels
            net(torch.randn(2, space.in_channels, *image_hw))
        assert macs.genotype_cost(g) == counter.get_total_flops() / 2 / 2  # FLOPs = 2 x MACs, batch of 2
        assert params.genotype_cost(g) == count_parameters(net)


def test_expected_cost_is_the_genotype_cost_when_the_logits_are_one_hot_and_is_differentiable():
    space, image_hw = SPACES[0]
    model = counted_cost_model(space, image_hw, "macs")
    arch = _random_arch(space, 0, scale=5000.0)  # probabilities one-hot at the argmax
    # derivation never picks 'none'; make 'none' the least likely so the relaxed cell is the genotype
    for t in CELL_TYPES:
        arch[arch_param_name("alpha", t)][:, space.primitives.index("none")] = -1e6
    g = derive_genotype(space, arch)
    assert float(model.expected_cost(arch)) == pytest.approx(model.genotype_cost(g), rel=1e-5)
    leaves = {k: v.clone().requires_grad_(True) for k, v in _random_arch(space, 1).items()}
    model.expected_cost(leaves).backward()
    # every logit with a choice gets a gradient (a node with one input pair has none to make)
    assert all(float(v.grad.abs().sum()) > 0 for v in leaves.values() if v.numel() > 1)


def test_the_cheapest_and_dearest_cells_bound_every_genotype():
    space, image_hw = SPACES[2]
    model = counted_cost_model(space, image_hw, "macs")
    low, high = model.extremes()
    costs = [model.genotype_cost(random_genotype(space.primitives, space.num_nodes, s)) for s in range(30)]
    assert low <= min(costs) and max(costs) <= high and low < high


def _brute_force(space, arch, model: CostModel, limit: float) -> float:
    """The highest log probability of any genotype within ``limit``, over every genotype."""
    real = [p for p in space.primitives if p != "none"]

    def node_choices(j):
        for a, b in itertools.combinations(range(j), 2):
            for oa, ob in itertools.product(real, real):
                yield ((oa, a), (ob, b))

    def logp(cell_type, cell):
        op_p = probabilities(arch[arch_param_name("alpha", cell_type)])
        total = 0.0
        for j, node in enumerate(cell, start=2):
            pairs = list(itertools.combinations(range(j), 2))
            pair_p = probabilities(arch[arch_param_name("beta", cell_type, j)])
            total += math.log(pair_p[pairs.index(tuple(sorted(s for _, s in node)))])
            total += sum(math.log(op_p[model.edge_index(j, s), space.primitives.index(o)]) for o, s in node)
        return total

    cells = list(itertools.product(*[list(node_choices(j)) for j in space.topology.nodes]))
    scored = {}
    for t in CELL_TYPES:
        scored[t] = []
        for cell in cells:
            g = Genotype(normal=cell, reduce=cell)
            cost = sum(
                float(model.edge[t][model.edge_index(j, s), space.primitives.index(o)])
                for j, node in enumerate(cell, 2)
                for o, s in node
            )
            scored[t].append((cost, logp(t, cell)))
            del g
    best = -math.inf
    reduce_sorted = sorted(scored["reduce"])
    for cost_n, lp_n in scored["normal"]:
        for cost_r, lp_r in reduce_sorted:
            if model.fixed + cost_n + cost_r > limit:
                break
            best = max(best, lp_n + lp_r)
    return best


def _log_probability(space, arch, model: CostModel, g: Genotype) -> float:
    total = 0.0
    for t in CELL_TYPES:
        op_p = probabilities(arch[arch_param_name("alpha", t)])
        for j, node in enumerate(g.cell(t), start=2):
            pairs = list(itertools.combinations(range(j), 2))
            total += math.log(
                probabilities(arch[arch_param_name("beta", t, j)])[pairs.index(tuple(sorted(s for _, s in node)))]
            )
            total += sum(math.log(op_p[model.edge_index(j, s), space.primitives.index(o)]) for o, s in node)
    return total


def test_derivation_within_a_budget_is_the_most_likely_cell_that_fits():
    space = SpaceConfig(
        10, 1, 4, 2, 2, primitives=("none", "max_pool_3x3", "skip_connect", "sep_conv_3x3", "dil_conv_5x5")
    )
    model = counted_cost_model(space, (8, 8), "macs")
    low, high = model.extremes()
    for seed in range(3):
        arch = _random_arch(space, seed)
        standard = derive_genotype(space, arch)
        assert most_likely_within(space, arch, {}, model, high) == standard  # generous: nothing changes
        assert most_likely_within(space, arch, {}, model, low * 0.999) is None
        for limit in np.linspace(low, model.genotype_cost(standard), 4)[:-1]:
            g = most_likely_within(space, arch, {}, model, float(limit))
            assert model.genotype_cost(g) <= limit
            assert _log_probability(space, arch, model, g) == pytest.approx(
                _brute_force(space, arch, model, float(limit)), abs=1e-6
            )


def test_masks_keep_the_budget_cell_until_it_is_the_only_one_left():
    space, image_hw = SPACES[0]
    model = counted_cost_model(space, image_hw, "macs")
    arch = _random_arch(space, 3)
    limit = 0.5 * (model.extremes()[0] + model.genotype_cost(derive_genotype(space, arch)))
    masks: dict[str, torch.Tensor] = {}
    for discreteness in (0.3, 0.7, 1.0):
        g = most_likely_within(space, arch, masks, model, limit)
        masks = update_masks(space, arch, masks, 0.01, 0.1, discreteness, choice_masks(space, g, arch))
        assert most_likely_within(space, arch, masks, model, limit) is not None
    assert masks_are_discrete(space, arch.keys(), masks)
    final = derive_genotype(space, arch, masks)
    assert model.genotype_cost(final) <= limit
    assert final == most_likely_within(space, arch, {}, model, limit)


def test_the_cost_model_travels_in_the_round_config():
    space, image_hw = SPACES[1]
    model = counted_cost_model(space, image_hw, "params")
    plan = plan_from_config(plan_to_config(RoundPlan(3, 0.5, cost=model)), {})
    assert plan.cost.kind == "params" and plan.cost.fixed == model.fixed
    for t in CELL_TYPES:
        assert torch.equal(plan.cost.edge[t], model.edge[t])
    json.dumps(plan_to_config(RoundPlan(3, 0.5, cost=model)))  # plain values only


def _client_data(space: SpaceConfig, n: int = 96) -> ClientData:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, space.in_channels, 8, 8, generator=g)
    y = torch.randint(0, space.num_classes, (n,), generator=g)
    images = ImageData(x, y, tuple(str(c) for c in range(space.num_classes)))
    return ClientData(images, images, images, 0)


@pytest.mark.parametrize("method", ["fedmetanas", "fednas"])
def test_the_cost_term_pulls_the_expected_cost_to_the_budget(method, single_thread):
    """One local search with and without a (heavily weighted) budget far under the starting cost:
    only with it does the expected cost fall, in both methods' architecture steps."""
    space = SpaceConfig(10, 1, 4, 2, 2)
    model = counted_cost_model(space, (8, 8), "macs")
    start = uniform_expected_cost(model)
    low = model.extremes()[0]
    base = {
        **defaults(),
        "method": method,
        "local-meta-iters": 4,
        "batch-size": 16,
        "warmup-rounds": 0,
        "discrete-round": 0,
        "outer-lr-alpha": 0.1,
        "init-channels": 4,
        "input-pruning": True,
    }
    after = {}
    for budget in ("", f"macs:{low:.0f}"):
        cfg = RunConfig.from_flat({**base, "budget": budget, "budget-weight": 50.0})
        torch.manual_seed(0)
        search = SearchModel(space)
        plan = RoundPlan(2, 1.0, cost=model if budget else None)
        local = fedmetanas_local_search if method == "fedmetanas" else fednas_local_search
        local(search, _client_data(space), cfg, plan, torch.Generator().manual_seed(1), torch.device("cpu"))
        after[budget] = float(model.expected_cost(_arch(search)))
    assert after[f"macs:{low:.0f}"] < start - 0.05 * (start - low)
    assert after[f"macs:{low:.0f}"] < after[""]


def test_a_budget_sizes_the_space_and_the_cnn():
    space, image_hw = SpaceConfig(10, 1, 0, 2, 2), (8, 8)
    widths = []
    for limit in (3e5, 1e6, 4e6):
        cfg = RunConfig.from_flat({**defaults(), "budget": f"macs:{limit}", "init-channels": 0})
        sized = sized_space(cfg, space, image_hw)
        assert uniform_expected_cost(counted_cost_model(sized, image_hw, "macs")) <= limit
        wider = SpaceConfig(10, 1, sized.init_channels + 1, 2, 2)
        assert uniform_expected_cost(counted_cost_model(wider, image_hw, "macs")) > limit
        widths.append(sized.init_channels)
        c = cnn_width_within(sized, "macs", limit, image_hw)
        assert (
            network_cost(SimpleCNN(sized, c), "macs", image_hw, 1)
            <= limit
            < network_cost(SimpleCNN(sized, c + 1), "macs", image_hw, 1)
        )
        assert fixed_network_width(cfg, sized, image_hw, None) == c
    assert widths == sorted(widths) and widths[0] < widths[-1]


@pytest.mark.parametrize(
    "flat,key",
    [
        ({"budget": "macs:-5"}, "budget"),
        ({"budget": "macs:0"}, "budget"),
        ({"budget": "flops:100"}, "budget"),
        ({"budget": "100"}, "budget"),
        ({"budget": "macs:lots"}, "budget"),
        ({"budget": "latency-ms:0.1"}, "latency-table"),
        ({"budget": "macs:1e5", "latency-table": "/nonexistent/table.json"}, "latency-table"),
        ({"init-channels": 0}, "init-channels"),
        ({"budget-weight": 0.0}, "budget-weight"),
        ({"budget-penalty": "soft"}, "budget-penalty"),
    ],
)
def test_bad_budget_input_names_its_key(flat, key):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat({**defaults(), **flat})
    assert err.value.key == key


def test_the_cli_refuses_a_budget_nothing_fits_and_a_table_of_another_space(tmp_path, capsys):
    assert cli_main(["check", "-c", 'budget="macs:1000"']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'budget'" in err[0] and "cheapest cell" in err[0]
    assert cli_main(["check", "-c", 'budget="macs:1e5"']) == 0
    other = SpaceConfig(10, 3, 8, 2, 2)
    table = LatencyTable(profile_space(other, (8, 8), runs=10, calibration_cells=1))
    path = tmp_path / "table.json"
    table.save(path)
    assert cli_main(["check", "-c", f'budget="latency-ms:1" latency-table="{path}"']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'latency-table'" in err[0] and "another space" in err[0]


def test_a_latency_table_covers_every_op_and_predicts_from_its_fit(tmp_path):
    space, image_hw = SpaceConfig(10, 1, 4, 2, 2), (8, 8)
    data = profile_space(
        space, image_hw, runs=10, calibration_cells=2, held_out=[random_genotype(space.primitives, 2, 7)]
    )
    assert len(data.pop("held_out_ms")) == 1
    table = LatencyTable(json.loads(json.dumps(data)))
    assert table.mismatch(space, image_hw) is None
    assert "init_channels" in table.mismatch(SpaceConfig(10, 1, 5, 2, 2), image_hw)
    # input pruning is the search's (FedMetaNAS's betas): a fixed cell of the space uses the same table
    assert table.mismatch(replace(space, input_pruning=not space.input_pruning), image_hw) is None
    # naming DARTS's own layout keeps the table; another layout does not
    assert table.mismatch(SpaceConfig(10, 1, 4, 2, 2, reduction_positions=[1]), image_hw) is None
    assert "reduction_positions" in table.mismatch(SpaceConfig(10, 1, 4, 2, 2, reduction_positions=(0, 1)), image_hw)
    model = table.cost_model(space, image_hw)
    assert data["threads"] == 1 and data["batch"] == 1 and data["op_scale"] > 0
    assert all(v >= 0 for v in data["ops"].values())
    g = random_genotype(space.primitives, 2, 0)
    assert model.genotype_cost(g) > 0
    path = tmp_path / "table.json"
    table.save(path)
    cfg = RunConfig.from_flat({**defaults(), "budget": "latency-ms:1", "latency-table": str(path)})
    assert cost_model(cfg, space, image_hw).genotype_cost(g) == pytest.approx(model.genotype_cost(g))
    with pytest.raises(ConfigError) as err:
        cost_model(cfg, SpaceConfig(10, 1, 5, 2, 2), image_hw)
    assert err.value.key == "latency-table" and "another space" in str(err.value)


def test_a_latency_budget_sizes_the_cnn_by_the_tables_measurements(tmp_path, capsys):
    space, image_hw = SpaceConfig(10, 1, 8, 2, 2), (8, 8)
    data = profile_space(space, image_hw, runs=10, calibration_cells=2)
    assert sorted(int(w) for w in data["cnn_ms"]) == list(CNN_PROFILE_WIDTHS)
    old = {k: v for k, v in data.items() if k != "cnn_ms"}  # a table profiled before the CNN had entries
    path = tmp_path / "table.json"
    LatencyTable(old).save(path)
    flat = {**defaults(), "method": "fedavg", "latency-table": str(path)}
    cfg = RunConfig.from_flat({**flat, "budget": "latency-ms:1"})
    with pytest.raises(ConfigError) as err:
        fixed_network_width(cfg, space, image_hw, None)
    assert err.value.key == "latency-table" and "--add-cnn" in str(err.value)
    assert (
        cli_main(
            ["check", "-c", 'dataset="digits"', "-c", f'method="fedavg" budget="latency-ms:1" latency-table="{path}"']
        )
        == 2
    )
    assert "--add-cnn" in capsys.readouterr().err
    assert cli_main(["profile", "-c", 'dataset="digits"', "--add-cnn", "--out", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read latency table" in err[0]
    # added beside the table's calibration networks, at the table's speed
    table = LatencyTable.load(path)
    assert add_cnn_entries(table, space, image_hw, runs=10)["machine_speed_vs_table"] > 0
    table.save(path)
    timed = LatencyTable.load(path).cnn_ms()
    assert sorted(timed) == list(CNN_PROFILE_WIDTHS) and all(ms > 0 for ms in timed.values())
    # the widest width whose measurement fits, for any limit between two entries
    for width in (1, 8, 64):
        limit = timed[width]
        cfg = RunConfig.from_flat({**flat, "budget": f"latency-ms:{limit}"})
        chosen = fixed_network_width(cfg, space, image_hw, None)
        assert timed[chosen] <= limit and all(timed[w] > limit for w in timed if w > chosen)
        report = cost_report(cfg, space, image_hw, SimpleCNN(space, chosen))
        assert report["latency_predicted_ms"] == timed[chosen] and report["within_budget"] is True
    cfg = RunConfig.from_flat({**flat, "budget": f"latency-ms:{min(timed.values()) / 2}"})
    with pytest.raises(ConfigError) as err:
        fixed_network_width(cfg, space, image_hw, None)
    assert err.value.key == "budget"
    narrow = min(timed, key=timed.get)
    for width, key in ((5, "fedavg-channels"), (max(timed, key=timed.get), "fedavg-channels")):
        cfg = RunConfig.from_flat({**flat, "budget": f"latency-ms:{timed[narrow]}", "fedavg-channels": width})
        with pytest.raises(ConfigError) as err:
            fixed_network_width(cfg, space, image_hw, None)
        assert err.value.key == key


def test_several_latency_tables_size_the_space_among_their_widths(tmp_path, capsys):
    image_hw = (8, 8)
    paths, uniform = [], {}
    for width in (4, 8):
        space = SpaceConfig(10, 1, width, 2, 2)
        table = LatencyTable(profile_space(space, image_hw, runs=10, calibration_cells=1))
        table.save(tmp_path / f"w{width}.json")
        paths.append(str(tmp_path / f"w{width}.json"))
        uniform[width] = uniform_expected_cost(table.cost_model(space, image_hw))
    unsized = SpaceConfig(10, 1, 0, 2, 2)
    for limit in (min(uniform.values()) / 2, min(uniform.values()), max(uniform.values())):
        cfg = RunConfig.from_flat(
            {**defaults(), "budget": f"latency-ms:{limit}", "init-channels": 0, "latency-table": ",".join(paths)}
        )
        fits = [w for w, u in uniform.items() if u <= limit * (1 + 1e-9)]
        sized = sized_space(cfg, unsized, image_hw)
        assert sized.init_channels == max(fits, default=4)
        # the run's table is the one measured for the sized space
        assert latency_table(cfg, sized, image_hw).data["space"]["init_channels"] == sized.init_channels
    with pytest.raises(ConfigError) as err:
        latency_table(cfg, SpaceConfig(10, 1, 5, 2, 2), image_hw)
    assert err.value.key == "latency-table" and "none of its tables" in str(err.value)
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(
            {**defaults(), "budget": "latency-ms:1", "latency-table": f"{paths[0]},{tmp_path}/none.json"}
        )
    assert err.value.key == "latency-table" and "none.json" in str(err.value)
    # the CLI makes every path absolute and sizes the space before anything starts
    assert cli_main(["check", "-c", f'budget="latency-ms:1" init-channels=0 latency-table="{",".join(paths)}"']) == 0


def test_budget_penalties():
    b = Budget("macs", 100.0, 2.0, "target")
    assert float(b.penalty(torch.tensor(50.0))) == pytest.approx(1.0)
    assert float(b.penalty(torch.tensor(150.0))) == pytest.approx(1.0)
    h = Budget("macs", 100.0, 2.0, "hinge")
    assert float(h.penalty(torch.tensor(50.0))) == 0.0
    assert float(h.penalty(torch.tensor(150.0))) == pytest.approx(1.0)


# --- a whole run under a budget: the real ServerApp loop and ClientApp, in process -------------------

RUN = {
    "local-meta-iters": 2,
    "local-epochs": 1,
    "retrain-local-epochs": 1,
    "min-available-nodes": 3,
    "min-train-nodes": 2,
    "batch-size": 16,
    "num-partitions": 3,
    "train-subset": 300,
    "test-subset": 120,
    "personalize-steps": 1,
    "num-server-rounds": 4,
    "warmup-rounds": 1,
    "discrete-round": 3,
    "retrain-rounds": 1,
    "checkpoint": False,
}


BUDGETED_RUNS = [
    {"method": "fedmetanas", "budget": "macs:120000"},
    {"method": "fedmetanas", "budget": "params:3000", "init-channels": 0},
    {"method": "fednas", "budget": "macs:110000", "num-server-rounds": 2},
    {"method": "fedavg", "budget": "macs:200000", "num-server-rounds": 1},
]
RUN_IDS = {str(f) for f in BUDGETED_RUNS}


@pytest.mark.parametrize("flat", BUDGETED_RUNS)
def test_a_run_with_a_budget_derives_a_network_within_it(
    tmp_path, flat, flower_task_identity, single_thread, monkeypatch
):
    import server_app.app as server
    from harness.local_grid import LocalGrid
    from server_app.app import run_experiment

    monkeypatch.setattr(server, "_figures", lambda *args: None)  # the export (export.json's cost) stays
    cfg = RunConfig.from_flat({**defaults(), **RUN, **flat, "results-dir": str(tmp_path)})
    with run_settings(cfg, 1):
        run_experiment(
            LocalGrid(9100 + sorted(RUN_IDS).index(str(flat)), dict(cfg), 3), cfg
        )  # the ClientApp caches configs per run id
    summary = json.loads((tmp_path / "summary.json").read_text())
    cost = summary["cost"]
    kind, limit = cfg.budget.split(":")
    assert cost["budget"]["kind"] == kind and cost["budget"]["limit"] == float(limit)
    assert cost["within_budget"] is True and cost["budget_used"] <= 1.0
    assert cost[kind] <= float(limit) and cost["params"] == summary["params"]
    assert cost["latency_ms"] > 0
    export = json.loads((tmp_path / "export.json").read_text())
    assert export["cost"] == cost
    if cfg.method != "fedavg":
        rows = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
        space, image_hw = (
            SpaceConfig(10, 1, cost["init_channels"], 2, 2, input_pruning=cfg.method == "fedmetanas"),
            (8, 8),
        )
        model = counted_cost_model(space, image_hw, kind)
        assert all(
            model.genotype_cost(Genotype.from_dict(r["genotype"])) <= float(limit) for r in rows if "genotype" in r
        )


def test_a_run_with_a_latency_budget_uses_the_table(tmp_path, flower_task_identity, single_thread, skip_run_extras):
    from harness.local_grid import LocalGrid
    from server_app.app import run_experiment

    space, image_hw = SpaceConfig(10, 1, 8, 2, 2), (8, 8)
    table = LatencyTable(profile_space(space, image_hw, runs=10, calibration_cells=2))
    table.save(tmp_path / "table.json")
    low, high = table.cost_model(space, image_hw).extremes()
    limit = low + 0.3 * (high - low)
    out = tmp_path / "run"
    cfg = RunConfig.from_flat(
        {
            **defaults(),
            **RUN,
            "budget": f"latency-ms:{limit}",
            "latency-table": str(tmp_path / "table.json"),
            "results-dir": str(out),
        }
    )
    with run_settings(cfg, 1):
        run_experiment(LocalGrid(9200, dict(cfg), 3), cfg)
    cost = json.loads((out / "summary.json").read_text())["cost"]
    assert cost["budget"]["kind"] == "latency-ms" and cost["within_budget"] is True
    assert cost["latency_predicted_ms"] <= limit and cost["latency_ms"] > 0
    # the measurement beside the table's own networks: the machine's speed change, and the latency at the table's speed
    assert cost["machine_speed_vs_table"] > 0
    assert cost["latency_ms_at_table_speed"] == pytest.approx(cost["latency_ms"] / cost["machine_speed_vs_table"])


def test_the_cnn_familys_counted_macs_match_torch():
    space = SpaceConfig(10, 3, 8, 3, 2)
    for width in (3, 8, 17):
        net = SimpleCNN(space, width)
        with FlopCounterMode(display=False) as counter:
            net(torch.randn(2, 3, 16, 16))
        assert network_cost(net, "macs", (16, 16), 3) == counter.get_total_flops() / 2 / 2

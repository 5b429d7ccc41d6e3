"""The comparison's arithmetic on constructed run summaries: time-to-target, budgets, table."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.compare import budget, comparison_rows
from fedmetanas_core.report.load import RunData, images_to_reach, time_to_reach


def summary(method: str, accs: list[float], step_s: float, config: dict, retrain_s: float = 0.0) -> dict:
    rounds = [{"accuracy": a, "elapsed-s": step_s * (i + 1)} for i, a in enumerate(accs)]
    total = step_s * len(accs)
    return {
        "final_test_accuracy": accs[-1],
        "supernet_test_accuracy": None,
        "search_time_s": total - retrain_s,
        "retrain_time_s": retrain_s,
        "total_time_s": total,
        "personalized_accuracy": 0.5,
        "personalized_accuracy_before": 0.4,
        "params": 10,
        "rounds": len(accs),
        "retrain_rounds": 0,
        "results_dir": f"/tmp/{method}",
        "rounds_log": rounds,
        "config": {"method": method, **config},
    }


def as_run(s: dict) -> RunData:
    """The run ``summary`` describes, as the report package reads it from disk."""
    summary = {k: v for k, v in s.items() if k not in ("config", "rounds_log")}
    return RunData(Path(s["results_dir"]), summary=summary, config=s["config"], rounds=s["rounds_log"])


META = {"num-server-rounds": 4, "local-meta-iters": 10, "inner-steps": 1, "discrete-round": 2}
FEDNAS = {"num-server-rounds": 3, "local-epochs": 1, "retrain-rounds": 2, "retrain-local-epochs": 2}


def test_time_to_reach_is_the_first_round_at_or_above_the_target():
    rounds = [
        {"accuracy": 0.2, "elapsed-s": 10.0},
        {"accuracy": 0.31, "elapsed-s": 20.0},
        {"accuracy": 0.29, "elapsed-s": 30.0},
    ]
    assert time_to_reach(rounds, 0.3) == 20.0
    assert time_to_reach(rounds, 0.31) == 20.0
    assert time_to_reach(rounds, 0.4) is None


def test_images_to_reach_count_every_round_up_to_the_target():
    rounds = [
        {"accuracy": 0.2, "client-images-mean": 100.0},
        {"accuracy": 0.31, "client-images-mean": 50.0},
        {"accuracy": 0.29, "client-images-mean": 70.0},
    ]
    assert images_to_reach(rounds, 0.3) == 150.0
    assert images_to_reach(rounds, 0.4) is None
    assert images_to_reach(rounds) == 220.0  # the whole run
    assert images_to_reach([{"accuracy": 0.5}], 0.3) is None  # rounds from before images were counted


def test_comparison_gives_the_image_budget_to_reach_fednas_as_a_share_of_fednas_total(tmp_path):
    from benchmarks.compare import aggregate_rows

    def run(method, accs, images):
        rows = [{"accuracy": a, "elapsed-s": 10.0 * (i + 1), "client-images-mean": images} for i, a in enumerate(accs)]
        s = summary(method, accs, 10.0, META if method == "fedmetanas" else FEDNAS)
        return as_run({**s, "rounds_log": rows, "seed": 0})

    rows = comparison_rows(
        {"fedmetanas": run("fedmetanas", [0.2, 0.4, 0.4], 100.0), "fednas": run("fednas", [0.1, 0.2, 0.3, 0.35], 300.0)}
    )
    by = {r["method"]: r for r in rows}
    assert by["fedmetanas"]["images_to_reach_fednas_accuracy"] == 200.0 and by["fednas"]["images_total"] == 1200.0
    agg = {r["method"]: r for r in aggregate_rows({0: rows})}
    assert agg["fedmetanas"]["images_to_reach_over_fednas_total_mean"] == pytest.approx(200.0 / 1200.0)


def test_rows_measure_every_method_against_fednas_final_accuracy():
    summaries = {
        "fedmetanas": summary("fedmetanas", [0.1, 0.2, 0.3, 0.35], 10.0, META),
        "fednas": summary("fednas", [0.1, 0.15, 0.2, 0.25, 0.3], 30.0, FEDNAS, retrain_s=60.0),
        "fedavg": summary("fedavg", [0.1, 0.2], 1.0, {"num-server-rounds": 2, "local-epochs": 1}),
    }
    rows = {r["method"]: r for r in comparison_rows({m: as_run(s) for m, s in summaries.items()})}
    assert rows["fedmetanas"]["time_to_reach_fednas_accuracy_s"] == 30.0  # 0.3 reached in round 3
    assert rows["fednas"]["time_to_reach_fednas_accuracy_s"] == 150.0
    assert rows["fedavg"]["time_to_reach_fednas_accuracy_s"] is None
    assert rows["fedmetanas"]["budget"] == "4 rounds x 10 meta-steps (1 inner), discrete from round 2"
    assert rows["fednas"]["budget"] == "search 3 rounds x 1 epoch(s), retrain 2 rounds x 2 epoch(s)"
    assert rows["fedavg"]["final_test_accuracy"] == 0.2


def test_budget_without_discretization_says_nothing_about_it():
    assert budget({"method": "fedmetanas", **META, "discrete-round": 0}) == "4 rounds x 10 meta-steps (1 inner)"


def test_budget_names_a_cosine_learning_rate_schedule():
    assert (
        budget({"method": "fedavg", "num-server-rounds": 4, "local-epochs": 1, "lr-schedule": "cosine"})
        == "4 rounds x 1 epoch(s), cosine lr"
    )


def _write_run(run, s: dict) -> None:
    import json

    import yaml

    s = dict(s)
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(s.pop("config")))
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in s.pop("rounds_log")))
    (run / "summary.json").write_text(json.dumps(s))


def test_tables_only_rebuilds_the_comparison_over_seeds_from_finished_runs(tmp_path):
    import json

    from benchmarks.compare import compare

    seeds = {
        0: {
            "fedmetanas": summary("fedmetanas", [0.2, 0.4], 10.0, META),
            "fednas": summary("fednas", [0.1, 0.3], 30.0, FEDNAS),
        },
        1: {
            "fedmetanas": summary("fedmetanas", [0.1, 0.2], 10.0, META),
            "fednas": summary("fednas", [0.1, 0.2], 30.0, FEDNAS),
        },
    }
    for seed, runs in seeds.items():
        for method, s in runs.items():
            _write_run(tmp_path / f"seed-{seed}" / method, {**s, "seed": seed})
    result = compare("cifar10-cpu", tmp_path, [], 2, ("fedmetanas", "fednas"), rerun=False, seeds=(0, 1))
    rows = {r["method"]: r for r in result["rows"]}
    meta = rows["fedmetanas"]
    assert meta["seeds"] == [0, 1]
    assert meta["final_test_accuracy_mean"] == pytest.approx(0.3) and meta["final_test_accuracy_std"] == pytest.approx(
        0.1
    )
    # seed 0: FedNAS's 0.3 first reached at 20 s; seed 1: its 0.2 at 20 s; FedNAS's total is 60 s both times
    assert meta["time_to_reach_fednas_accuracy_s_mean"] == pytest.approx(20.0)
    assert meta["time_to_reach_over_fednas_total_mean"] == pytest.approx(20.0 / 60.0)
    assert meta["reached_fednas_accuracy"] == 2
    assert rows["fednas"]["budget"] == "search 3 rounds x 1 epoch(s), retrain 2 rounds x 2 epoch(s)"
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["rows"] == result["rows"] and set(saved["per_seed"]) == {"0", "1"}
    assert (tmp_path / "comparison_accuracy_vs_time.png").is_file()
    table = (tmp_path / "comparison.md").read_text()
    assert "| fedmetanas | 4 rounds x 10 meta-steps (1 inner), discrete from round 2 | 0.3000 ± 0.1000 |" in table


def test_tables_only_leaves_out_unfinished_runs_and_names_them(tmp_path):
    import json

    from benchmarks.compare import compare

    for seed in (0, 1):
        for method in ("fedmetanas", "fednas"):
            _write_run(
                tmp_path / f"seed-{seed}" / method,
                {
                    **summary(method, [0.2, 0.3 + seed / 10], 10.0, META if method == "fedmetanas" else FEDNAS),
                    "seed": seed,
                },
            )
    (tmp_path / "seed-1" / "fednas" / "summary.json").unlink()  # seed 1's FedNAS still running
    result = compare("cifar10-cpu", tmp_path, [], 2, ("fedmetanas", "fednas"), rerun=False, seeds=(0, 1))
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["fedmetanas"]["seeds"] == [0, 1] and rows["fednas"]["seeds"] == [0]
    assert result["left_out"] == ["fednas seed 1"]
    assert rows["fedmetanas"]["reached_fednas_accuracy"] == 1  # no FedNAS target on seed 1
    table = (tmp_path / "comparison.md").read_text()
    assert "Not finished, left out: fednas seed 1." in table and "| fednas (seeds 0) |" in table
    assert "| fedmetanas | " in table
    assert json.loads((tmp_path / "comparison.json").read_text())["left_out"] == ["fednas seed 1"]


def test_random_cells_are_valid_cells_of_the_space_and_differ_by_seed():
    from fedmetanas_core.method.genotype import random_genotype

    ops = ("none", "skip_connect", "sep_conv_3x3", "max_pool_3x3")
    cells = [random_genotype(ops, 3, seed) for seed in range(6)]
    for g in cells:
        for cell in (g.normal, g.reduce):
            assert len(cell) == 3
            for j, node in enumerate(cell, start=2):
                inputs = [i for _, i in node]
                assert len(node) == 2 and len(set(inputs)) == 2 and all(0 <= i < j for i in inputs)
                assert all(op in ops and op != "none" for op, _ in node)
    assert len({g.to_json() for g in cells}) > 1
    assert random_genotype(ops, 3, 4) == random_genotype(ops, 3, 4)


def test_matched_cnn_has_about_the_searched_networks_parameters():
    from fedmetanas_core.method.genotype import SimpleCNN, count_parameters, simple_cnn_channels_for
    from fedmetanas_core.space import SpaceConfig

    space = SpaceConfig(num_classes=10, in_channels=1, init_channels=8, num_cells=2, num_nodes=2)
    for target in (2_626, 10_000, 40_000):
        c = simple_cnn_channels_for(space, target)
        got = count_parameters(SimpleCNN(space, c))
        neighbours = [count_parameters(SimpleCNN(space, c + d)) for d in (-1, 1) if c + d >= 1]
        assert all(abs(got - target) <= abs(n - target) for n in neighbours)
        assert abs(got - target) / target < 0.1


def test_last_rounds_mean_is_over_the_deployed_models_last_rounds():
    summaries = {
        "fednas": summary("fednas", [0.1, 0.2, 0.3, 0.5, 0.4, 0.3, 0.2, 0.6], 1.0, FEDNAS),
        "fedavg": summary("fedavg", [0.1, 0.3], 1.0, {"num-server-rounds": 2, "local-epochs": 1}),
    }
    rows = {r["method"]: r for r in comparison_rows({m: as_run(s) for m, s in summaries.items()})}
    assert rows["fednas"]["last_rounds_mean_accuracy"] == pytest.approx(0.4)  # 0.5 0.4 0.3 0.2 0.6
    assert rows["fedavg"]["last_rounds_mean_accuracy"] == pytest.approx(0.2)  # fewer rounds than 5: all


def test_sweep_json_rows_carry_method_partition_seeds_and_means(tmp_path):
    import json

    from benchmarks.compare import SWEEP, partition_name, sweep

    for i, (partitioner, alpha) in enumerate(SWEEP):
        for seed in (0, 1):
            for method, accs in (("fedmetanas", [0.5, 0.6 + i / 10]), ("fedavg", [0.4, 0.5])):
                s = summary(
                    method, accs, 1.0, META if method == "fedmetanas" else {"num-server-rounds": 2, "local-epochs": 1}
                )
                _write_run(tmp_path / partition_name(partitioner, alpha) / f"seed-{seed}" / method, {**s, "seed": seed})
    sweep("digits", tmp_path, [], 2, ("fedmetanas", "fedavg"), rerun=False, seeds=(0, 1))
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert len(rows) == 8
    row = next(r for r in rows if r["partition"] == "iid" and r["method"] == "fedmetanas")
    assert (
        row["seeds"] == [0, 1]
        and row["final_test_accuracy_mean"] == pytest.approx(0.9)
        and row["final_test_accuracy_std"] == 0.0
    )
    assert row["personalized_accuracy_mean"] == 0.5
    assert "| dirichlet-0.1 | 0.6000 ± 0.0000 | 0.5000 ± 0.0000 |" in (tmp_path / "sweep.md").read_text()


def test_matched_baseline_alone_needs_each_seeds_finished_fedmetanas_run(tmp_path, capsys):
    from benchmarks.compare import main

    with pytest.raises(SystemExit) as stop:
        main(["--methods", "fedavg-matched", "--seeds", "0,1", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "seed(s) 0, 1" in capsys.readouterr().err
    _write_run(tmp_path / "seed-0" / "fedmetanas", {**summary("fedmetanas", [0.2], 1.0, META), "seed": 0})
    with pytest.raises(SystemExit) as stop:
        main(["--methods", "fedavg-matched", "--seeds", "0,1", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "seed(s) 1 " in capsys.readouterr().err


def test_runs_scored_on_the_validation_split_are_labelled_and_never_mixed_with_test_runs(tmp_path):
    import json

    from benchmarks.compare import compare

    for seed in (0, 1):
        s = summary("fedmetanas", [0.2, 0.5 + seed / 10], 10.0, META)
        _write_run(tmp_path / f"seed-{seed}" / "fedmetanas", {**s, "seed": seed, "eval_split": "validation"})
    result = compare("digits", tmp_path, [], 2, ("fedmetanas",), rerun=False, seeds=(0, 1))
    assert result["eval_split"] == "validation"
    table = (tmp_path / "comparison.md").read_text()
    assert "validation split" in table and "| final validation acc |" in table and "final test acc" not in table
    assert json.loads((tmp_path / "comparison.json").read_text())["eval_split"] == "validation"

    s = summary("fednas", [0.1, 0.3], 30.0, FEDNAS)  # a run scored on the test set joins the same table
    _write_run(tmp_path / "seed-0" / "fednas", {**s, "seed": 0})
    with pytest.raises(SystemExit, match="different splits"):
        compare("digits", tmp_path, [], 2, ("fedmetanas", "fednas"), rerun=False, seeds=(0, 1))

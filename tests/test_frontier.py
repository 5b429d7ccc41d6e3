"""benchmarks/frontier.py's rows and table from run directories (no runs: summaries written here)."""

import json

import pytest

from benchmarks.frontier import budget_dir, frontier_rows, markdown, method_overrides


def _run(path, acc, macs, params, latency, within=True):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("method: fedmetanas\n")
    (path / "rounds.jsonl").write_text(json.dumps({"phase": "search", "round": 1, "accuracy": acc}) + "\n")
    cost = {"macs": macs, "params": params, "latency_ms": latency, "within_budget": within, "init_channels": 3}
    (path / "summary.json").write_text(
        json.dumps({"final_test_accuracy": acc, "cost": cost, "images_per_client_round": 10.0})
    )


def test_rows_average_each_method_over_its_finished_seeds(tmp_path):
    budget = "macs:50000"
    for seed, acc in ((0, 0.9), (1, 0.8)):
        _run(tmp_path / budget_dir(budget) / f"seed-{seed}" / "fedmetanas", acc, 40000 + seed * 2000, 1000, 0.05)
    _run(tmp_path / budget_dir(budget) / "seed-0" / "fedavg-cnn", 0.95, 41000, 6000, 0.01, within=False)
    (tmp_path / budget_dir(budget) / "seed-1" / "fedavg-cnn").mkdir(parents=True)  # an unfinished run: left out
    rows = frontier_rows(tmp_path, "dirichlet:0.5", [budget], [0, 1], ["fedmetanas", "fedavg-cnn"])
    by = {r["method"]: r for r in rows}
    assert by["fedmetanas"]["seeds"] == [0, 1] and by["fedavg-cnn"]["seeds"] == [0]
    assert by["fedmetanas"]["final_test_accuracy_mean"] == pytest.approx(0.85)
    assert by["fedmetanas"]["final_test_accuracy_std"] == pytest.approx(0.05)
    assert by["fedmetanas"]["macs_mean"] == 41000 and by["fedmetanas"]["within_budget"] is True
    assert by["fedavg-cnn"]["within_budget"] is False
    for key in (
        "method",
        "partition",
        "budget",
        "seeds",
        "macs_mean",
        "params_mean",
        "latency_ms_mean",
        "final_test_accuracy_mean",
        "final_test_accuracy_std",
    ):
        assert key in by["fedmetanas"]
    table = markdown(rows)
    assert "0.8500 ± 0.0500" in table and "| NO |" in table


def _rounds(path, accuracies, images):
    rows = [{"round": i + 1, "accuracy": a, "client-images-mean": images} for i, a in enumerate(accuracies)]
    (path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_images_to_fednas_final_accuracy_are_a_fraction_of_fednas_images(tmp_path):
    budget = "macs:20000"
    seeds = {0: [0.5, 0.8, 0.9], 1: [0.5, 0.6, 0.7]}  # seed 0 reaches FedNAS's 0.8 at round 2; seed 1 never
    for seed, accs in seeds.items():
        mine = tmp_path / budget_dir(budget) / f"seed-{seed}" / "fedmetanas"
        _run(mine, accs[-1], 19000, 600, 0.05)
        _rounds(mine, accs, 100.0)
        fednas = tmp_path / budget_dir(budget) / f"seed-{seed}" / "fednas"
        _run(fednas, 0.8, 19000, 600, 0.05)
        _rounds(fednas, [0.3, 0.6, 0.7, 0.8], 200.0)  # 800 images in all
    (row,) = frontier_rows(tmp_path, "dirichlet:0.5", [budget], [0, 1], ["fedmetanas"])
    assert row["images_vs_fednas"] == [
        {"seed": 0, "fraction": 200.0 / 800.0, "ends_at_or_above": True},
        {"seed": 1, "fraction": None, "ends_at_or_above": False},
    ]
    table = markdown([row])
    assert "| macs:20000 | 0 | 0.25 | yes |" in table and "| macs:20000 | 1 | never reached | no |" in table


def test_random_cells_are_drawn_within_the_budget(tmp_path):
    from benchmarks.compare import ROOT
    from fedmetanas_core.method.budget import cost_model, run_space
    from fedmetanas_core.method.genotype import Genotype
    from harness.cli import resolve_run_config

    preset = ROOT / "conf" / "digits.toml"
    extra = method_overrides("fedavg-random-cell", "macs:30000", tmp_path, 1, preset, [])
    assert 'budget="macs:30000"' in extra and "init-channels=0" in extra
    _, cfg = resolve_run_config([str(preset), 'budget="macs:30000" init-channels=0'])
    space, image_hw = run_space(cfg)
    genotype = Genotype.load_yaml(tmp_path / "random-cell-genotype.yaml")
    assert cost_model(cfg, space, image_hw).genotype_cost(genotype) <= 30000
    assert method_overrides("fedmetanas", "macs:30000", tmp_path, 1, preset, []) == [
        'budget="macs:30000"',
        "init-channels=0",
    ]
    # a latency table is measured for one width: the preset's width stays, the table comes with -c
    assert method_overrides("fedmetanas", "latency-ms:0.05", tmp_path, 1, preset, []) == ['budget="latency-ms:0.05"']

"""Figures and Markdown reports rebuilt from a stored sample run (tests/data/sample_run: a real tiny run)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fedmetanas_core import report as R

SAMPLE = Path(__file__).parent / "data" / "sample_run"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(SAMPLE, d)
    return d


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, list[Path]]:
    """The sample run with every figure drawn once (drawing is the slow part: tests reuse it)."""
    d = tmp_path_factory.mktemp("rendered") / "run"
    shutil.copytree(SAMPLE, d)
    return d, R.write_run_figures(d)


@pytest.fixture
def drawn_run(tmp_path: Path, rendered) -> Path:
    d = tmp_path / "run"
    shutil.copytree(rendered[0], d)
    return d


def _check_png(path: Path, size: tuple[int, int]) -> None:
    assert path.stat().st_size > 0, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:  # verify() leaves the image unusable: reopen for the size
        assert img.format == "PNG"
        assert img.size == size, (path.name, img.size)


def _rows(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "rounds.jsonl").read_text().splitlines() if line.strip()]


def _write_rows(d: Path, rows: list[dict]) -> None:
    (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _edit_summary(d: Path, **changes) -> None:
    s = json.loads((d / "summary.json").read_text())
    s.update(changes)
    (d / "summary.json").write_text(json.dumps(s))


def test_sample_run_has_the_keys_the_heatmaps_read():
    rows = _rows(SAMPLE)
    assert rows and all(r["phase"] == "search" for r in rows)
    for r in rows:
        probs = r[R.OP_PROBS_KEY]
        for cell in ("normal", "reduce"):
            assert len(probs[cell]) == len(r[R.EDGES_KEY])
            assert all(len(p) == len(r[R.PRIMITIVES_KEY]) and abs(sum(p) - 1) < 1e-3 for p in probs[cell])


def test_every_figure_renders_as_a_png_of_the_expected_size(rendered):
    run, written = rendered
    assert [p.name for p in written] == list(R.FIGURES)
    for name, size in R.FIGURE_SIZES.items():
        _check_png(run / name, size)
    assert not (run / R.ERRORS_FILE).exists()


def test_report_lists_every_figure_and_the_summary_numbers(drawn_run: Path):
    run = drawn_run
    assert R.main([str(run)]) == 0
    page = (run / R.REPORT_FILE).read_text()
    summary = json.loads((run / "summary.json").read_text())
    for name in R.FIGURES:  # embedded by relative path
        assert f"]({name})" in page
    assert f"| Final test accuracy | {R.format_accuracy(summary['final_test_accuracy'])} |" in page
    assert R.format_accuracy(summary["supernet_test_accuracy"]) in page
    assert R.format_accuracy(summary["personalized_accuracy"]) in page
    assert R.format_count(summary["params"]) in page
    for node in summary["genotype"]["normal"]:
        for choice in node:
            assert f"`{choice['op']}`" in page


def test_report_redraws_only_missing_figures(drawn_run: Path):
    run = drawn_run
    (run / "temperature.png").unlink()
    before = (run / "cell_normal.png").stat().st_mtime_ns
    R.write_run_report(run)
    _check_png(run / "temperature.png", R.FIGURE_SIZES["temperature.png"])
    assert (run / "cell_normal.png").stat().st_mtime_ns == before


def test_comparison_of_two_runs(tmp_path: Path, drawn_run: Path):
    run = drawn_run
    other = tmp_path / "fednas run"  # a space in the path: links must survive it
    shutil.copytree(run, other)
    _edit_summary(other, method="fednas", final_test_accuracy=0.4, retrain_time_s=7.5)
    out = tmp_path / "pages" / "cmp.md"
    assert R.main([str(run), str(other), "--out", str(out)]) == 0
    page = out.read_text()
    table = [line for line in page.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Run | Method | Final acc.")
    assert any("| fedmetanas |" in line and "| 0.4833 |" in line for line in table)
    assert any("| fednas |" in line and "| 0.4000 |" in line for line in table)
    assert "Time to FedNAS acc." in table[0]
    assert "](comparison_accuracy_vs_time.png)" in page
    _check_png(out.parent / R.COMPARISON_FIGURE, R.COMPARISON_FIGURE_SIZE)
    assert "(../run/report.md)" in page and "(<../fednas run/report.md>)" in page
    assert (run / R.REPORT_FILE).exists() and (other / R.REPORT_FILE).exists()


def test_comparison_from_a_benchmark_json(tmp_path: Path, drawn_run: Path):
    run = drawn_run
    doc = {
        "preset": "digits-tiny",
        "machine": "test machine",
        "rows": [
            {
                "method": "fedmetanas",
                "final_test_accuracy": 0.48,
                "supernet_test_accuracy": 0.52,
                "search_time_s": 32.0,
                "retrain_time_s": 0.0,
                "total_time_s": 32.1,
                "time_to_reach_fednas_accuracy_s": 20.0,
                "personalized_accuracy": 0.66,
                "params": 1570,
                "results_dir": "run",
            },
            {
                "method": "fedavg",
                "final_test_accuracy": 0.31,
                "supernet_test_accuracy": None,
                "search_time_s": 10.0,
                "retrain_time_s": 0.0,
                "total_time_s": 10.0,
                "time_to_reach_fednas_accuracy_s": None,
                "personalized_accuracy": 0.5,
                "params": 900,
                "results_dir": "gone",
            },
        ],
    }
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "comparison_report.md"
    assert R.main([str(path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "digits-tiny" in page and "test machine" in page
    assert "| fedmetanas | 0.4800 | 0.5200 | 0.6600 |" in page
    assert "| fedavg | 0.3100 | – | 0.5000 |" in page and "not reached" in page
    assert (run / R.REPORT_FILE).exists()  # the row's results_dir, relative to the json, got its page
    _check_png(tmp_path / R.COMPARISON_FIGURE, R.COMPARISON_FIGURE_SIZE)


def test_comparison_over_seeds_shows_each_methods_means(tmp_path: Path):
    """benchmarks.compare writes a method's figures over seeds as <figure>_mean / _std."""
    rows = [
        {
            "method": "fedmetanas",
            "seeds": [0, 1],
            "final_test_accuracy_mean": 0.3,
            "final_test_accuracy_std": 0.1,
            "personalized_accuracy_mean": 0.5,
            "total_time_s_mean": 42.0,
            "params_mean": 1570.0,
            "time_to_reach_fednas_accuracy_s_mean": None,
        }
    ]
    path = tmp_path / "comparison.json"
    path.write_text(json.dumps({"preset": "digits", "rows": rows}))
    out = tmp_path / "comparison_report.md"
    assert R.main([str(path), "--out", str(out)]) == 0
    page = out.read_text()
    assert "| fedmetanas | fedmetanas | 0.3000 | – | 0.5000 | – | – | 42.0 s | not reached | 1,570 |" in page


def test_corrupt_rounds_line_is_recorded_and_the_figures_still_drawn(run: Path):
    lines = (run / "rounds.jsonl").read_text().splitlines()
    lines.insert(2, '{"phase": "search", "round": 3, "accur')  # a torn line
    (run / "rounds.jsonl").write_text("\n".join(lines) + "\n")
    written = R.write_run_figures(run)
    assert [p.name for p in written] == list(R.FIGURES)
    errors = (run / R.ERRORS_FILE).read_text()
    assert "rounds.jsonl line 3" in errors


def test_missing_op_probs_loses_only_the_heatmaps(run: Path):
    _write_rows(run, [{k: v for k, v in r.items() if k != R.OP_PROBS_KEY} for r in _rows(run)])
    written = {p.name for p in R.write_run_figures(run)}
    heatmaps = {"alpha_heatmap_normal.png", "alpha_heatmap_reduce.png"}
    assert written == set(R.FIGURES) - heatmaps
    errors = (run / R.ERRORS_FILE).read_text()
    assert all(f"{h}: ValueError" in errors and R.OP_PROBS_KEY in errors for h in heatmaps)
    R.write_run_report(run)
    page = (run / R.REPORT_FILE).read_text()
    assert "alpha_heatmap_normal.png`" in page and "](alpha_heatmap_normal.png)" not in page


def test_one_failing_figure_does_not_stop_the_others(run: Path, monkeypatch):
    def boom(data, path):
        raise RuntimeError("drawing exploded")

    monkeypatch.setitem(R.RENDERERS, "temperature.png", boom)
    (run / "summary.json").write_text("{ not json")  # genotype then comes from genotype.yaml
    written = {p.name for p in R.write_run_figures(run)}
    assert "temperature.png" not in written and "personalization.png" not in written
    assert {"accuracy_vs_round.png", "accuracy_vs_time.png", "cell_normal.png", "cell_reduce.png"} <= written
    errors = (run / R.ERRORS_FILE).read_text()
    assert "temperature.png: RuntimeError: drawing exploded" in errors and "summary.json" in errors
    monkeypatch.undo()
    shutil.copyfile(SAMPLE / "summary.json", run / "summary.json")
    R.render_run_figures(run, ["temperature.png", "personalization.png"])
    assert not (run / R.ERRORS_FILE).exists()  # a clean redraw clears the errors


def test_fixed_network_run_skips_search_figures_without_errors(run: Path):
    _edit_summary(run, method="fedavg", genotype=None, supernet_test_accuracy=None)
    (run / "genotype.yaml").unlink()
    _write_rows(
        run,
        [
            {"phase": "fedavg", "round": i, "tau": 1.0, "accuracy": 0.1 * i, "loss": 2 - 0.1 * i, "elapsed-s": 2.0 * i}
            for i in range(1, 5)
        ],
    )
    result = R.render_run_figures(run)
    assert {p.name for p in result.written} == {"accuracy_vs_round.png", "accuracy_vs_time.png", "personalization.png"}
    assert set(result.skipped) == set(R.FIGURES) - {p.name for p in result.written}
    assert not result.errors and not (run / R.ERRORS_FILE).exists()


def test_never_raises_on_a_missing_or_empty_directory(tmp_path: Path):
    assert R.write_run_figures(tmp_path / "nope") == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert R.write_run_figures(empty) == []
    assert "rounds.jsonl: missing" in (empty / R.ERRORS_FILE).read_text()


def test_resumed_run_duplicates_keep_the_last_line(run: Path):
    rows = _rows(run)
    _write_rows(run, rows[:3] + [{**rows[2], "accuracy": 0.99}] + rows[3:])
    loaded, problems = R.load_rounds(run / "rounds.jsonl")
    assert not problems and [r["round"] for r in loaded] == [r["round"] for r in rows]
    assert loaded[2]["accuracy"] == 0.99


def test_tensorboard_logger(tmp_path: Path, run: Path):
    off = R.TensorBoardLogger(tmp_path / "off", enabled=False)
    off.log_round(_rows(run)[0])  # disabled: a no-op that imports nothing
    off.close()
    assert not (tmp_path / "off").exists()
    if not R.tensorboard_available():
        with pytest.raises(R.TensorBoardUnavailable):
            R.TensorBoardLogger(tmp_path / "tb")
        return
    log_dir = R.write_tensorboard(run, tmp_path / "tb")
    assert any(p.name.startswith("events.out.tfevents") for p in log_dir.iterdir())

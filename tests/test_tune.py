"""benchmarks.tune: trials scored on validation data, equal budgets, and studies that resume."""

from __future__ import annotations

import optuna
import pytest

from benchmarks.tune import (
    SEARCH_SPACES,
    close_interrupted_trials,
    load_study,
    parse_range,
    preset_values,
    search_space,
    study_space,
    suggest,
    trial_command,
    tune,
)


def test_a_resumed_study_draws_new_values(tmp_path):
    """Each process seeds its sampler; a fixed seed would repeat the first trial after a restart."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    drawn = []
    for _ in range(3):  # three "processes", one trial each
        study = load_study("toy", "fedavg", tmp_path)
        trial = study.ask()
        drawn.append(suggest(trial, "fedavg"))
        study.tell(trial, 0.5)
    assert len({tuple(sorted(d.items())) for d in drawn}) == 3
    again = load_study("toy", "fedavg", tmp_path, create=False)
    assert len(again.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in again.trials)


def test_trial_scores_on_the_validation_split_never_the_test_set(tmp_path):
    cmd = trial_command("digits", "fednas", {"outer-lr-w": 0.05, "local-epochs": 2}, tmp_path, ["seed=1"], 10)
    joined = " ".join(cmd)
    assert 'eval-split="validation"' in joined and "num-partitions=10" in joined
    assert 'method="fednas"' in joined and "outer-lr-w=0.05 local-epochs=2" in joined
    # the trial's values come last, after the preset and the caller's overrides
    assert cmd[-1] == "outer-lr-w=0.05 local-epochs=2"


def test_every_method_is_tuned_over_stated_ranges():
    assert set(SEARCH_SPACES) == {"fedmetanas", "fednas", "fedavg"}
    for space in SEARCH_SPACES.values():
        assert "outer-lr-w" in space
        for spec in space.values():
            assert spec[0] in ("float", "choice")
            if spec[0] == "float":
                assert 0 < spec[1] < spec[2]


def test_a_trial_left_running_by_a_dead_process_is_closed_as_failed(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study("toy", "fednas", tmp_path)
    done = study.ask()
    suggest(done, "fednas")
    study.tell(done, 0.4)
    suggest(study.ask(), "fednas")  # its process "dies" here: never told
    resumed = load_study("toy", "fednas", tmp_path)
    assert close_interrupted_trials(resumed) == [1]
    states = [t.state for t in load_study("toy", "fednas", tmp_path, create=False).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


def test_a_widened_range_is_drawn_from_and_fixed_with_its_study(tmp_path):
    """A study that found its best at a range's edge reruns wider; the stored ranges, not the
    defaults, then govern every resumed process and the report."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    method, key, spec = parse_range("fedavg.local-epochs=8,12,16")
    assert (method, key, spec) == ("fedavg", "local-epochs", ("choice", [8, 12, 16]))
    assert parse_range("fedavg.outer-lr-w=0.01..0.5")[2] == ("float", 0.01, 0.5, True)
    ranges = {method: {key: spec}}
    tune("toy", ["fedavg"], 0, tmp_path, [], 10, ranges)  # zero trials: the study and its ranges only
    study = load_study("toy", "fedavg", tmp_path)
    space = study_space(study, "fedavg")
    assert space == search_space("fedavg", ranges) and space["local-epochs"] == ("choice", [8, 12, 16])
    drawn = {suggest(study.ask(), "fedavg", space)["local-epochs"] for _ in range(12)}
    assert drawn <= {8, 12, 16} and drawn & {12, 16}
    with pytest.raises(SystemExit, match="other ranges"):
        study_space(study, "fedavg", {})  # resuming with the defaults would mix ranges


@pytest.mark.parametrize(
    "text", ["fedavg.local-epochs", "fedavg.momentum=1,2", "fedx.outer-lr-w=0.1..0.2", "fedavg.outer-lr-w=0.5..0.1"]
)
def test_a_bad_range_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="--range"):
        parse_range(text)


def test_the_preset_setting_can_be_one_of_the_trials(tmp_path):
    """Every method's first trial can be its preset's own values, so the study shows where it stands."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space("fedavg", {"fedavg": {"local-epochs": ("choice", [4, 8, 12, 16])}})
    values = preset_values("cifar10-cpu", "fedavg", space, [])
    assert values == {"outer-lr-w": 0.0277, "weight-decay": 1.59e-05, "local-epochs": 8}  # conf/cifar10-cpu.toml
    tune("cifar10-cpu", ["fedavg"], 0, tmp_path, [], 10, {"fedavg": {"local-epochs": ("choice", [4, 8, 12, 16])}}, True)
    waiting = load_study("cifar10-cpu", "fedavg", tmp_path).trials
    assert len(waiting) == 1 and waiting[0].user_attrs["enqueued"] == "the preset's setting"
    with pytest.raises(SystemExit, match="outside"):
        preset_values(
            "cifar10-cpu", "fedavg", search_space("fedavg", {"fedavg": {"local-epochs": ("choice", [1, 2])}}), []
        )

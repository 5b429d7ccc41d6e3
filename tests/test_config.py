"""The run config: defaults, the pyproject's keys, method tables, presets, and bad values raising
a ConfigError that names the key (the CLI's one-line errors: tests/test_config_errors.py)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedmetanas_core.run import config as C
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.space import PRIMITIVES

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


# --- defaults and keys ------------------------------------------------------------------------


def test_config_defaults_and_attribute_access():
    cfg = RunConfig.from_flat({})
    assert dict(cfg) == C.defaults()
    assert (
        cfg.num_server_rounds == C.BY_NAME["num-server-rounds"].default
        and cfg.tau_min == 0.1
        and cfg.input_pruning is True
    )
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


# --- method tables and presets ----------------------------------------------------------------


def test_later_plain_keys_override_earlier_method_tables(tmp_path):
    from harness.cli import parse_run_config

    preset = tmp_path / "p.toml"
    preset.write_text("num-server-rounds = 10\n[fedmetanas]\ndiscrete-round = 8\nlocal-meta-iters = 4\n")
    flat = parse_run_config([str(preset), "num-server-rounds=3 discrete-round=0"])
    cfg = RunConfig.from_flat(flat, check_paths=False)
    assert (cfg.num_server_rounds, cfg.discrete_round, cfg.local_meta_iters) == (3, 0, 4)


def test_method_tables_apply_to_their_own_method_only():
    preset = {
        "num-server-rounds": 10,
        "fednas.num-server-rounds": 4,
        "fednas.retrain-rounds": 7,
        "fedavg.local-epochs": 3,
    }
    fednas = RunConfig.from_flat({**preset, "method": "fednas"}, check_paths=False)
    assert (fednas.num_server_rounds, fednas.retrain_rounds, fednas.local_epochs) == (4, 7, 1)
    meta = RunConfig.from_flat(preset, check_paths=False)  # the default method
    assert (meta.method, meta.num_server_rounds, meta.retrain_rounds) == (
        "fedmetanas",
        10,
        C.BY_NAME["retrain-rounds"].default,
    )
    assert RunConfig.from_flat({**preset, "method": "fedavg"}, check_paths=False).local_epochs == 3


@pytest.mark.parametrize(
    "preset", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "conf").glob("*.toml"))
)
def test_every_preset_is_valid_for_every_method(preset):
    from harness.cli import parse_run_config

    flat = parse_run_config([str(Path(__file__).resolve().parents[1] / "conf" / preset)])
    for method in C.METHODS:
        cfg = RunConfig.from_flat({**flat, "method": method}, check_paths=False)
        assert cfg.method == method


# --- bad values -------------------------------------------------------------------------------


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

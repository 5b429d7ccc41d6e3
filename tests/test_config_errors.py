"""Bad configuration is rejected up front, in one line naming the key, before anything starts.

Every case goes through the real CLI (``python -m harness.cli run -c "key=value ..."``) in a
subprocess. A ``flwr`` stub comes first on PATH: if a bad value ever slipped through validation,
the CLI would reach it, and the stub's marker in the output fails the case without starting a run.
The calls run in a thread pool (each is a short Python start-up), so the whole set takes seconds.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.run.node_config import validate_node_config

ROOT = Path(__file__).resolve().parents[1]
STUB_MARKER = "FLWR-STUB-REACHED"

# (case id, key the error must name, 'key=value ...' with {tmp} for the scratch folder)
CASES = [
    ("unknown-method", "method", 'method="darts"'),
    ("unknown-strategy", "strategy", 'strategy="FedFoo"'),
    ("unknown-dataset", "dataset", 'dataset="imagenet"'),
    ("unknown-partitioner", "partitioner", 'partitioner="random"'),
    ("unknown-key", "no-such-key", "no-such-key=1"),
    ("zero-rounds", "num-server-rounds", "num-server-rounds=0"),
    ("zero-meta-iters", "local-meta-iters", "local-meta-iters=0"),
    ("zero-outer-lr", "outer-lr-w", "outer-lr-w=0.0"),
    ("negative-inner-lr", "inner-lr-alpha", "inner-lr-alpha=-0.1"),
    ("zero-fraction-train", "fraction-train", "fraction-train=0.0"),
    ("zero-round-timeout", "round-timeout", "round-timeout=0"),
    ("negative-seed", "seed", "seed=-1"),
    ("tau-max-below-min", "tau-max", "tau-max=0.05 tau-min=0.1"),
    ("zero-tau-min", "tau-min", "tau-min=0.0"),
    ("discrete-round-in-warmup", "discrete-round", "warmup-rounds=3 discrete-round=3"),
    ("unknown-key-in-method-table", "fednas.no-such-key", "fednas.no-such-key=1"),
    ("bad-value-in-own-method-table", "retrain-rounds", 'method="fednas" fednas.retrain-rounds=-1'),
    ("zero-inner-steps", "inner-steps", "inner-steps=0"),
    ("zero-dirichlet-alpha", "dirichlet-alpha", "dirichlet-alpha=0.0"),
    ("negative-dirichlet-alpha", "dirichlet-alpha", "dirichlet-alpha=-1.0"),
    ("unknown-op", "primitives", 'primitives="none,conv_7x7"'),
    ("only-none-op", "primitives", 'primitives="none"'),
    ("reduction-cell-past-the-last", "reduction-cells", 'num-cells=2 reduction-cells="1,2"'),
    ("reduction-cells-not-indices", "reduction-cells", 'reduction-cells="first"'),
    ("reduction-cells-repeat", "reduction-cells", 'reduction-cells="0,0"'),
    ("string-for-int", "batch-size", 'batch-size="big"'),
    ("batch-size-one", "eval-batch-size", "eval-batch-size=1"),
    ("splits-leave-no-train", "query-fraction", "query-fraction=0.6 local-test-fraction=0.5"),
    ("unknown-corrupt-policy", "on-corrupt-image", 'on-corrupt-image="ignore"'),
    ("unknown-relax-mode", "relax-mode", 'relax-mode="hard"'),
    ("unknown-device", "device", 'device="tpu"'),
    ("bad-maml-order", "maml-order", "maml-order=3"),
    ("min-partition-size-below-3", "min-partition-size", "min-partition-size=2"),
    ("imagefolder-missing-dir", "data-dir", 'dataset="imagefolder" data-dir="{tmp}/missing"'),
    ("imagefolder-no-data-dir", "data-dir", 'dataset="imagefolder"'),
    ("imagefolder-without-test", "data-dir", 'dataset="imagefolder" data-dir="{tmp}/train-only"'),
    ("imagefolder-without-train", "data-dir", 'dataset="imagefolder" data-dir="{tmp}/test-only"'),
    ("imagefolder-data-dir-is-a-file", "data-dir", 'dataset="imagefolder" data-dir="{tmp}/a-file"'),
    ("torchvision-data-dir-not-creatable", "data-dir", 'dataset="mnist" data-dir="{tmp}/a-file/mnist"'),
    ("hf-without-name", "hf-dataset", 'dataset="hf"'),
    ("hf-local-dir-missing", "hf-dataset", 'dataset="hf" hf-dataset="imagefolder:{tmp}/missing"'),
    ("results-dir-not-creatable", "results-dir", 'results-dir="{tmp}/a-file/out"'),
    ("results-dir-is-a-file", "results-dir", 'results-dir="{tmp}/a-file"'),
    ("results-dir-not-writable", "results-dir", 'results-dir="/proc/fedmetanas-out"'),  # os.access says yes to root
    ("krum-lower-case-too-few-nodes", "min-available-nodes", 'strategy="krum"'),  # checked as Krum
    ("missing-genotype-file", "fedavg-genotype", 'method="fedavg" fedavg-genotype="{tmp}/missing.yaml"'),
    ("min-train-above-available", "min-train-nodes", "min-available-nodes=3 min-train-nodes=5"),
    ("partitions-below-nodes", "num-partitions", "num-partitions=2 min-available-nodes=4 min-train-nodes=2"),
    ("krum-too-few-nodes", "min-available-nodes", 'strategy="Krum" num-malicious-nodes=1 min-available-nodes=4'),
    ("krum-default-two-nodes", "min-available-nodes", 'strategy="Krum"'),
    (
        "multikrum-selects-too-many",
        "num-nodes-to-select",
        'strategy="MultiKrum" num-malicious-nodes=1 min-available-nodes=5 num-nodes-to-select=5',
    ),
    ("bulyan-too-few-nodes", "min-available-nodes", 'strategy="Bulyan" num-malicious-nodes=1 min-available-nodes=6'),
    ("trimmedavg-trims-nothing", "min-available-nodes", 'strategy="FedTrimmedAvg" min-available-nodes=4'),
    ("trim-beta-half", "trim-beta", 'strategy="FedTrimmedAvg" trim-beta=0.5 min-available-nodes=10'),
    ("not-a-toml-value", "results-dir", "results-dir=/unquoted/path"),
    ("unknown-dp-mode", "dp", 'dp="gaussian"'),
    ("negative-dp-noise", "dp-noise-multiplier", 'dp="server-fixed" dp-noise-multiplier=-1.0'),
    ("zero-dp-clipping-norm", "dp-clipping-norm", 'dp="server-fixed" dp-clipping-norm=0.0'),
    ("dp-delta-one", "dp-delta", "dp-delta=1.0"),
    ("dp-target-quantile-above-one", "dp-target-quantile", "dp-target-quantile=1.5"),
    ("zero-dp-clip-lr", "dp-clip-lr", "dp-clip-lr=0.0"),
    ("negative-dp-count-stddev", "dp-clipped-count-stddev", "dp-clipped-count-stddev=-1.0"),
    # 12 sampled clients a round, 10 simulated (the CLI's --num-supernodes): would wait forever
    (
        "dp-samples-more-than-federation",
        "min-train-nodes",
        'dp="client-fixed" min-available-nodes=12 min-train-nodes=12',
    ),
    # adaptive clipping with 10 clients: z must be < 2 x (10 / 20)
    ("dp-adaptive-noise-too-high", "dp-noise-multiplier", 'dp="client-adaptive" dp-noise-multiplier=1.0'),
    ("dp-with-log-softmax-alphas", "alpha-aggregation", 'dp="server-fixed" alpha-aggregation="log-softmax"'),
    ("unknown-attack", "attack", 'attack="label-flip"'),
    ("attack-without-attackers", "attack-clients", 'attack="sign-flip"'),
    ("attack-clients-not-ids", "attack-clients", 'attack="sign-flip" attack-clients="0,x"'),
    ("attack-clients-repeat", "attack-clients", 'attack="sign-flip" attack-clients="1,1"'),
    (
        "attack-client-beyond-partitions",
        "attack-clients",
        'attack="alpha-poison" attack-clients="0,10" num-partitions=10 min-available-nodes=10',
    ),
    ("zero-attack-scale", "attack-scale", "attack-scale=0.0"),
    ("unknown-alpha-defence", "alpha-defence", 'alpha-defence="mean"'),
    ("alpha-screen-factor-below-one", "alpha-screen-factor", "alpha-screen-factor=0.5"),
    ("alpha-defence-with-dp", "alpha-defence", 'alpha-defence="median" dp="server-fixed"'),
]

# Needs server_app.strategy.check_strategy wired into the CLI (config.py never imports flwr).
IMPORT_CASE = ("strategy-import-fails", "strategy", 'strategy="no_such_package.module:MyStrategy"')


def _scratch(root: Path) -> Path:
    (root / "train-only" / "train" / "cat").mkdir(parents=True)
    (root / "test-only" / "test" / "cat").mkdir(parents=True)
    (root / "a-file").write_text("not a folder\n")
    (root / "out").mkdir()
    stub_bin = root / "bin"
    stub_bin.mkdir()
    stub = stub_bin / "flwr"
    stub.write_text(f'#!/bin/sh\necho {STUB_MARKER} "$@"\nexit 3\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return root


def _run_cli(root: Path, case: tuple[str, str, str]) -> subprocess.CompletedProcess:
    name, _, overrides = case
    overrides = overrides.format(tmp=root)
    if "results-dir" not in overrides:  # if validation ever passed, nothing lands in the repo
        overrides += f' results-dir="{root}/out/{name}"'
    env = {**os.environ, "PATH": f"{root / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--app", str(ROOT), "-c", overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=60,
    )


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    root = _scratch(tmp_path_factory.mktemp("bad-configs"))
    cases = CASES + [IMPORT_CASE]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: _run_cli(root, c), cases))
    return {case[0]: result for case, result in zip(cases, results, strict=False)}


def _assert_rejected(result: subprocess.CompletedProcess, key: str) -> None:
    output = result.stdout + result.stderr
    assert STUB_MARKER not in output, f"validation let it through and flwr was called:\n{output}"
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    assert f"'{key}'" in lines[0] and "invalid" in lines[0], lines[0]


def test_there_are_at_least_25_bad_configurations():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.slow  # the CLI in subprocesses
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_rejects_bad_config_before_starting(cli_results, case):
    _assert_rejected(cli_results[case[0]], case[1])


@pytest.mark.slow  # the CLI in a subprocess
def test_cli_rejects_unimportable_strategy(cli_results):
    _assert_rejected(cli_results[IMPORT_CASE[0]], IMPORT_CASE[1])


def test_every_config_error_is_one_line():
    for flat in ({"method": "x\ny"}, {"tau-max": float("inf")}, {"results-dir": "/etc/passwd/x"}):
        with pytest.raises(ConfigError) as info:
            RunConfig.from_flat(flat)
        assert "\n" not in str(info.value)


def test_good_paths_pass(tmp_path):
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        (tree / split / "cat").mkdir(parents=True)
    cfg = RunConfig.from_flat(
        {
            "dataset": "imagefolder",
            "data-dir": str(tree),
            "results-dir": str(tmp_path / "new" / "deeper"),
        }
    )
    assert cfg.data_dir == str(tree)
    RunConfig.from_flat({"dataset": "mnist", "data-dir": str(tmp_path / "will-be-made")})
    RunConfig.from_flat({"strategy": "Krum", "min-available-nodes": 3})
    RunConfig.from_flat({"strategy": "Bulyan", "num-malicious-nodes": 1, "min-available-nodes": 7})
    RunConfig.from_flat({"strategy": "FedTrimmedAvg", "min-available-nodes": 5})
    RunConfig.from_flat(
        {"strategy": "MultiKrum", "num-malicious-nodes": 1, "min-available-nodes": 5, "num-nodes-to-select": 4}
    )


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("results_dir", ["/proc/fedmetanas-out", "/proc"])
def test_unwritable_results_dir_is_rejected_even_for_root(results_dir):
    """/proc exists and os.access calls it writable (always, for root): only a real attempt tells."""
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({"results-dir": results_dir})
    assert info.value.key == "results-dir" and "\n" not in str(info.value)


def test_strategy_names_in_any_case_become_flowers_names():
    from server_app.strategy import build_base_strategy

    for given, canonical in (
        ("krum", "Krum"),
        ("fedavg", "FedAvg"),
        ("FEDADAM", "FedAdam"),
        ("MultiKrum", "MultiKrum"),
    ):
        cfg = RunConfig.from_flat({"strategy": given, "min-available-nodes": 5})
        assert cfg.strategy == canonical
        assert type(build_base_strategy(cfg)).__name__ == canonical
    path = "flwr.serverapp.strategy:FedMedian"  # import paths are Python names: kept as given
    assert RunConfig.from_flat({"strategy": path}).strategy == path
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig.from_flat({"strategy": "krumm"})


def test_config_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(ConfigError("seed", -1, "must be >= 0")))
    assert (err.key, err.value, str(err)) == ("seed", -1, "run-config 'seed' = -1 is invalid: must be >= 0")


# --- node config ---------------------------------------------------------------------------------


def test_node_config_valid_is_normalised(tmp_path):
    assert validate_node_config({"partition-id": 0, "num-partitions": 1}) == {"partition-id": 0, "num-partitions": 1}
    assert validate_node_config({"partition-id": "3", "num-partitions": 10.0}) == {
        "partition-id": 3,
        "num-partitions": 10,
    }
    assert validate_node_config({"data-dir": str(tmp_path)}) == {"data-dir": str(tmp_path)}
    assert validate_node_config({}) == {}
    assert validate_node_config({"something-else": 1}) == {"something-else": 1}
    cfg = RunConfig.from_flat({"num-partitions": 4, "min-available-nodes": 2})
    assert validate_node_config({"partition-id": 3}, cfg) == {"partition-id": 3}


@pytest.mark.parametrize(
    "node_config, key",
    [
        ({"partition-id": -1, "num-partitions": 2}, "partition-id"),
        ({"partition-id": 1.5, "num-partitions": 2}, "partition-id"),
        ({"partition-id": True, "num-partitions": 2}, "partition-id"),
        ({"partition-id": "first", "num-partitions": 2}, "partition-id"),
        ({"partition-id": 0, "num-partitions": 0}, "num-partitions"),
        ({"partition-id": 2, "num-partitions": 2}, "partition-id"),
        ({"partition_id": 0}, "partition_id"),
        ({"data-dir": "/no/such/folder"}, "data-dir"),
        ({"data-dir": ""}, "data-dir"),
        ({"data-dir": 3}, "data-dir"),
    ],
)
def test_node_config_errors_name_the_key(node_config, key):
    with pytest.raises(ConfigError) as info:
        validate_node_config(node_config)
    assert info.value.key == key
    assert str(info.value).startswith(f"node-config '{key}'")


def test_node_config_against_the_run_config(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="'data-dir'"):
        validate_node_config({"data-dir": str(a_file)})
    with pytest.raises(ConfigError, match="'num-partitions'.*required"):
        validate_node_config({"partition-id": 0}, RunConfig.from_flat({}))
    with pytest.raises(ConfigError, match="'partition-id'"):
        validate_node_config({"partition-id": 4, "num-partitions": 10}, RunConfig.from_flat({"num-partitions": 4}))
    with pytest.raises(ConfigError, match="train/"):
        validate_node_config(
            {"data-dir": str(tmp_path)}, RunConfig.from_flat({"dataset": "imagefolder"}, check_paths=False)
        )

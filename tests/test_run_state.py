"""What a run owns and must not share: its clients' identities, its torch settings, its skipped
rounds' reasons and its checkpoint (issue 13). Unit tests: no Flower run, no simulation."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM
from helpers import NodeIds
from PIL import Image

from client_app.app import in_run_settings
from fedmetanas_core import data as D
from fedmetanas_core.data import node_cache
from fedmetanas_core.data.node_cache import node_data
from fedmetanas_core.federation import client_round
from fedmetanas_core.federation.phases import Handoff
from fedmetanas_core.method.training import run_settings
from fedmetanas_core.run.config import RunConfig, defaults
from fedmetanas_core.run.outputs import CHECKPOINT_FILE, load_checkpoint, rng_states, save_checkpoint, set_rng_states
from fedmetanas_core.space import fast_path_enabled
from fedmetanas_core.util.lru import LruCache
from fedmetanas_core.util.seeding import make_generator
from flower_records import array_record
from harness import cli
from server_app.app import Experiment, client_order
from server_app.checkpoint import Progress, RunCheckpoint
from server_app.strategy import (
    TOO_FEW_REPLIES,
    SearchStrategy,
    load_strategy_state,
    strategy_state,
)
from server_app.summary import skipped_rounds

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def _context(run_id: int, node_id: int, node_config: dict, run_config: dict) -> Context:
    return Context(run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config)


# --- 1. a device with its own data is identified by its node id -----------------------------------


def _image_tree(root, shade: int):
    for split, count in (("train", 5), ("test", 2)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.full((6, 6, 3), (shade + 40 * (label == "b") + i) % 256, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def test_devices_with_their_own_data_get_their_node_id_and_own_streams(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    D.clear_caches()
    cfg = RunConfig.from_flat({"dataset": "imagefolder"}, check_paths=False)
    contexts = [
        _context(13101, node_id, {"data-dir": str(_image_tree(tmp_path / f"device-{node_id}", shade))}, dict(cfg))
        for node_id, shade in ((9_000_000_000_000_000_001, 10), (42, 100))  # Flower node ids are uint64
    ]
    datas = [node_data(cfg, dict(c.node_config), c.node_id) for c in contexts]
    assert [d.partition_id for d in datas] == [c.node_id for c in contexts]
    draws = [torch.rand(8, generator=make_generator(cfg.seed, "train", d.partition_id, "search", 1)) for d in datas]
    assert not torch.equal(*draws)
    # a node config's partition-id still wins over the node id
    by_id = node_data(cfg.replace(dataset="digits"), {"partition-id": 3, "num-partitions": 4}, node_id=42)
    assert by_id.partition_id == 3
    D.clear_caches()


def test_a_process_serving_runs_with_other_data_settings_loads_their_own_data(monkeypatch):
    """The client's data cache is keyed by the whole DataSpec: two runs that differ only in a data
    setting (query-fraction, local-test-fraction, image-size, min-partition-size, ...) must not share
    cached splits; the same settings reuse them."""
    monkeypatch.setattr(node_cache, "NODE_DATA", LruCache(128))
    cfg = RunConfig.from_flat({"dataset": "digits", "num-partitions": 4, "partitioner": "iid"}, check_paths=False)
    node = {"partition-id": 1}
    first = node_data(cfg, node)
    assert node_data(cfg, dict(node)) is first  # cached
    other = node_data(cfg.replace(query_fraction=0.3), node)
    assert len(other.query) > len(first.query), "stale splits from the previous run's query-fraction"
    loads = []
    monkeypatch.setattr(D.clients, "load_client_data", lambda spec: loads.append(spec) or SimpleNamespace(spec=spec))
    for key, value in (("local-test-fraction", 0.1), ("image-size", 16), ("min-partition-size", 20), ("seed", 5)):
        assert node_data(cfg.replace(**{key: value}), node).spec == loads[-1], f"{key} reused another run's data"
    assert len(loads) == 4 and len(set(loads)) == 4
    assert node_data(cfg, node) is first and len(loads) == 4


def test_an_actor_serving_a_large_population_keeps_a_bounded_data_cache(monkeypatch):
    """Least recently used out: a Ray actor that serves 1,000 simulated clients must not hold them all."""
    monkeypatch.setattr(node_cache, "NODE_DATA", LruCache(3))
    loads = []
    monkeypatch.setattr(
        D.clients, "load_client_data", lambda spec: loads.append(spec.partition_id) or SimpleNamespace(spec=spec)
    )
    cfg = RunConfig.from_flat({"dataset": "digits", "num-partitions": 1000}, check_paths=False)
    for pid in (0, 1, 2, 0, 3, 0, 1):  # 1 is the least recently used when 3 arrives
        node_data(cfg, {"partition-id": pid})
    assert loads == [0, 1, 2, 3, 1]
    assert [spec.partition_id for spec in node_cache.NODE_DATA] == [3, 0, 1]


def test_an_actor_serving_many_runs_keeps_a_bounded_config_cache(monkeypatch):
    """Issue 27 (5): the validated run configs, one per run id, are bounded like the data cache
    (least recently used out), not kept for every run the actor ever served."""
    monkeypatch.setattr(client_round, "RUN_CONFIGS", LruCache(3))
    validated = []
    real = RunConfig.from_flat.__func__
    monkeypatch.setattr(
        RunConfig,
        "from_flat",
        classmethod(lambda cls, flat, **kw: validated.append(flat["seed"]) or real(cls, flat, **kw)),
    )

    for run_id in (0, 1, 2, 0, 3, 0, 1):  # 1 is the least recently used when 3 arrives
        assert client_round.run_config(run_id, {"seed": run_id}).seed == run_id
    assert validated == [0, 1, 2, 3, 1]
    assert list(client_round.RUN_CONFIGS) == [3, 0, 1]


def test_server_orders_replies_by_node_id_sized_partition_ids():
    """Error replies last, after partition ids as large as Flower's uint64 node ids."""
    grid = NodeIds([11, 12, 13])
    msgs = list(
        FedAvg(min_available_nodes=3).configure_train(
            1, array_record({"w": np.zeros(2, np.float32)}), ConfigRecord({}), grid
        )
    )
    pids = [2**64 - 5, 7, 2**40]
    replies = [
        Message(RecordDict({"metrics": MetricRecord({"num-examples": 1, "partition-id": pid})}), reply_to=m)
        for pid, m in zip(pids, msgs, strict=False)
    ]
    error = Message(Error(code=0, reason="client failed"), reply_to=msgs[0])
    ordered = sorted([error, *replies], key=client_order)
    assert [int(r.content["metrics"]["partition-id"]) for r in ordered[:-1]] == sorted(pids) and ordered[-1] is error


# --- 2. a run's torch settings are its own --------------------------------------------------------


def _settings() -> tuple[bool, bool, int]:
    return torch.are_deterministic_algorithms_enabled(), fast_path_enabled(), torch.get_num_threads()


def test_client_runs_in_one_process_each_get_their_own_settings():
    seen = []

    @in_run_settings
    def handler(msg, context):
        seen.append(_settings())
        return msg

    before = _settings()
    runs = [
        (13201, {"deterministic": True, "fast-path": False, "torch-threads": 3}),
        (13202, {"deterministic": False, "fast-path": True, "torch-threads": 1}),
        (13201, {}),  # the first run again: its settings, not the second run's
    ]
    for run_id, run_config in runs:
        handler(None, _context(run_id, 1, {}, run_config))
        assert _settings() == before  # nothing leaks out of a call
    assert seen == [(True, False, 3), (False, True, 1), (True, False, 3)]


def test_server_run_settings_apply_for_the_run_only():
    before = _settings()
    with run_settings(RunConfig.from_flat({"deterministic": True, "fast-path": False})):
        assert _settings()[:2] == (True, False)
    with run_settings(RunConfig.from_flat({"deterministic": False, "fast-path": True})):
        assert _settings()[:2] == (False, True)
    assert _settings() == before


# --- 3. rounds skipped for errors are counted apart, and fail `fedmetanas run` --------------------


class FailingFedAvg(FedAvg):
    def aggregate_train(self, server_round, replies):
        raise RuntimeError("cannot aggregate")


def _replies(strategy: SearchStrategy, n: int) -> list[Message]:
    arrays = array_record({"w": np.zeros(3, np.float32)})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({}), NodeIds([11, 12, 13])))[:n]
    return [
        Message(
            RecordDict(
                {
                    "arrays": array_record({"w": np.full(3, i + 1.0, np.float32)}),
                    "metrics": MetricRecord({"num-examples": 10}),
                }
            ),
            reply_to=m,
        )
        for i, m in enumerate(msgs)
    ]


def test_aggregate_train_tells_errors_from_too_few_replies():
    failing = SearchStrategy(FailingFedAvg(min_available_nodes=3), "logits", 2)
    assert failing.aggregate_train(1, _replies(failing, 3)) == (None, None)
    assert failing.skipped_reason == "error: RuntimeError: cannot aggregate"
    strict = SearchStrategy(FedAvg(min_available_nodes=3), "logits", 3)
    assert strict.aggregate_train(1, _replies(strict, 2)) == (None, None)
    assert strict.skipped_reason == TOO_FEW_REPLIES
    arrays, _ = strict.aggregate_train(1, _replies(strict, 3))
    assert arrays is not None and strict.skipped_reason is None


def test_summary_counts_skipped_rounds_by_reason():
    rows = [
        {"aggregated": True, "skipped-reason": None},
        {"aggregated": False, "skipped-reason": TOO_FEW_REPLIES},
        {"aggregated": False, "skipped-reason": "error: RuntimeError: x"},
        {"aggregated": False, "skipped-reason": "error: aggregate is not finite"},
        {"aggregated": False},  # a row from before skipped-reason existed
    ]
    assert skipped_rounds(rows) == {"skipped_rounds": 4, "skipped_rounds_error": 2}


def test_error_skip_share_limit():
    limit = cli.MAX_ERROR_SKIPPED_SHARE
    assert cli.error_skip_problem({"skipped_rounds": 9, "skipped_rounds_error": 0}, 10) is None
    assert cli.error_skip_problem({"skipped_rounds_error": int(10 * limit)}, 10) is None
    problem = cli.error_skip_problem({"skipped_rounds_error": int(10 * limit) + 1}, 10)
    assert problem and "\n" not in problem and "aggregation errors" in problem
    assert cli.error_skip_problem({}, 10) is None  # a summary from before the count existed


def _flower_json(payload: dict, colour: bool) -> str:
    """What ``flwr run --format json`` prints: rich's ``print_json``, as Flower 1.42 calls it."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, force_terminal=colour, width=80).print_json(data=payload)
    return buf.getvalue()


REAL_POPEN = subprocess.Popen


class FakeFlwrRun:
    """`flwr run` that starts run 7 and exits 0, whatever became of the run; the people-facing
    line's wording is ``human`` (Flower may change it), ``--format json`` prints Flower's JSON;
    `flwr log 7 ... --stream` prints a log line."""

    human = "🎊 Successfully started run 7\n"
    colour = False
    calls: list = []

    def __new__(cls, cmd, **kwargs):  # only flwr is faked: the CLI's pgrep (its private SuperLink) runs for real
        return super().__new__(cls) if cmd[0] == "flwr" else REAL_POPEN(cmd, **kwargs)

    def __init__(self, cmd, **kwargs):
        FakeFlwrRun.calls.append(cmd)
        self.cmd, self.returncode = cmd, 0
        if cmd[1] == "log":
            lines = ["INFO :      Starting logstream for run_id `7`\n", "[search 1/1] ...\n"]
        elif "--format" in cmd and cmd[cmd.index("--format") + 1] == "json":
            payload = {
                "success": True,
                "run-id": "7",
                "federation-id": "",
                "fab-id": "fedmetanas/fedmetanas",
                "fab-name": "fedmetanas",
                "fab-version": "0.1.0",
                "fab-hash": "0123abcd",
                "fab-filename": "fedmetanas.fedmetanas.0-1-0.0123abcd.fab",
            }
            lines = _flower_json(payload, self.colour).splitlines(keepends=True)
        else:
            lines = [self.human]
        self.stdout = iter(lines)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cli_fails_a_completed_run_that_lost_rounds_to_errors(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rows = [{"aggregated": True}] * 7 + [{"aggregated": False, "skipped-reason": "error: RuntimeError: x"}] * 3
    (out / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"final_test_accuracy": 0.5, "skipped_rounds": 3, "skipped_rounds_error": 3}
    (out / "summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr(subprocess, "Popen", FakeFlwrRun)
    monkeypatch.setattr(cli, "_run_status", lambda *a: "finished:completed")
    assert cli.main(["run", "-c", f'results-dir="{out}"']) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    # the reason, then where the run's private SuperLink left its log (kept when a run fails)
    assert len(err) == 2 and "3 of 10 rounds were skipped for aggregation errors" in err[0]
    assert "private SuperLink's log" in err[1]
    shutil.rmtree(err[1].split(" is in ")[1].rsplit("/", 1)[0], ignore_errors=True)
    (out / "summary.json").write_text(json.dumps({**summary, "skipped_rounds_error": 2}))
    assert cli.main(["run", "-c", f'results-dir="{out}"']) == 0


@pytest.mark.parametrize("colour", [False, True])
def test_cli_finds_the_run_id_whatever_flower_says_to_people(tmp_path, monkeypatch, capsys, colour):
    """Issue 27 (4): the run id comes from Flower's JSON output, so a wording change in the line
    printed for people cannot turn a completed run into exit 1."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "rounds.jsonl").write_text(json.dumps({"aggregated": True}) + "\n")
    (out / "summary.json").write_text(json.dumps({"final_test_accuracy": 0.5, "skipped_rounds_error": 0}))
    asked = []
    monkeypatch.setattr(FakeFlwrRun, "human", "🎊 Run 7 is on its way\n")
    monkeypatch.setattr(FakeFlwrRun, "colour", colour)
    monkeypatch.setattr(FakeFlwrRun, "calls", [])
    monkeypatch.setattr(subprocess, "Popen", FakeFlwrRun)
    monkeypatch.setattr(
        cli, "_run_status", lambda connection, run_id, env: asked.append(run_id) or "finished:completed"
    )
    assert cli.main(["run", "-c", f'results-dir="{out}"']) == 0, capsys.readouterr()
    assert asked == ["7"]
    assert "[search 1/1]" in capsys.readouterr().out  # the run's log reached the terminal


def test_parse_run_id_reads_flowers_json_only():
    payload = {"success": True, "run-id": "1234567890123", "federation-id": ""}
    noisy = "Warning: something\n" + _flower_json(payload, colour=True) + "trailing text {not json}\n"
    assert cli.parse_run_id(noisy) == "1234567890123"
    failed = _flower_json({"success": False, "error-message": "Failed to start run"}, colour=False)
    assert cli.parse_run_id(failed) is None
    assert cli.parse_run_id("🎊 Successfully started run 7\n") is None  # people's wording is not parsed


# --- 5. the CLI's defaults are the config module's -------------------------------------------------


def test_cli_defaults_come_from_the_config_module_not_pyproject(tmp_path, monkeypatch, capsys):
    seen = []
    real = RunConfig.from_flat.__func__
    monkeypatch.setattr(
        RunConfig, "from_flat", classmethod(lambda cls, flat, **kw: seen.append(dict(flat)) or real(cls, flat, **kw))
    )
    monkeypatch.setattr(cli, "SOURCE_ROOT", tmp_path)  # no checkout and no packaged pyproject.toml
    monkeypatch.setattr(cli, "PACKAGED_PYPROJECT", tmp_path / "missing" / "pyproject.toml")
    assert cli.main(["check"]) == 0
    assert seen == [defaults()]
    assert cli.main(["check", "-c", "seed=5"]) == 0 and seen[-1] == {**defaults(), "seed": 5}


# --- 6. the checkpoint holds tensors and plain data only -------------------------------------------


def test_checkpoint_loads_weights_only_and_round_trips_rng_and_strategy_state(tmp_path):
    adam = FedAdam()
    adam.m_t = {"w": np.arange(3, dtype=np.float32), "b": np.ones(2)}
    adam.v_t = {"w": np.full(3, 0.5, np.float32), "b": np.zeros(2)}
    avgm = FedAvgM(server_momentum=0.9)
    avgm.momentum_vector = [np.ones((2, 2), np.float32), np.arange(3.0)]
    avgm.current_arrays = array_record({"w": np.full(3, 2.0, np.float32)})
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # numpy caches the second Gaussian: part of its state
    cfg = RunConfig.from_flat({"strategy": "FedAdam"})
    progress = Progress(
        done=[("search", 1), ("search", 2)],
        nodes_seen={2**64 - 1, 5},
        rejected_total=1,
        carried=Handoff(None, {"supernet_test_accuracy": np.float64(0.5), "supernet_params": 7}, [3.5]),
    )
    experiment = SimpleNamespace(
        checkpoint=RunCheckpoint(tmp_path, cfg),
        strategy=SimpleNamespace(base=adam),
        progress=progress,
        accountant=None,
    )
    phase = SimpleNamespace(
        masks={"arch.alpha.normal": torch.zeros(2, 3, dtype=torch.bool)},
        last={"accuracy": np.float64(0.25), "op-probs": [[0.5, 0.5]], "genotype": {"normal": []}},
    )
    Experiment.save(experiment, 0, phase, 2, array_record({"w": np.ones(3, np.float32)}), 12.5)  # the server's own save
    expected = (random.random(), float(np.random.normal()), torch.rand(3))

    torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # what load_checkpoint does
    ck = load_checkpoint(tmp_path)
    assert ck["round"] == 2 and ck["last"]["accuracy"] == 0.25 and ck["done"] == [("search", 1), ("search", 2)]
    assert ck["config"] == dict(cfg) and sorted(ck["nodes_seen"]) == [5, 2**64 - 1]
    assert Handoff.from_dict(ck["extra"]) == progress.carried  # what finished phases left
    assert torch.equal(ck["arrays"]["w"], torch.ones(3))
    set_rng_states(ck["rng"])
    assert (random.random(), float(np.random.normal())) == expected[:2] and torch.equal(torch.rand(3), expected[2])

    fresh = FedAdam()
    load_strategy_state(fresh, ck["strategy"])
    for moment in ("m_t", "v_t"):
        got, want = getattr(fresh, moment), getattr(adam, moment)
        assert set(got) == set(want) and all(
            isinstance(v, np.ndarray) and v.dtype == want[k].dtype and np.array_equal(v, want[k])
            for k, v in got.items()
        )
    save_checkpoint(tmp_path, {"strategy": strategy_state(avgm)})
    fresh_m = FedAvgM(server_momentum=0.9)
    load_strategy_state(fresh_m, load_checkpoint(tmp_path)["strategy"])
    assert all(
        np.array_equal(a, b) and a.dtype == b.dtype
        for a, b in zip(fresh_m.momentum_vector, avgm.momentum_vector, strict=True)
    )
    assert isinstance(fresh_m.current_arrays, ArrayRecord) and np.array_equal(
        fresh_m.current_arrays["w"].numpy(), np.full(3, 2.0)
    )
    assert strategy_state(FedAvg()) == {}


def test_rng_states_are_plain_data():
    states = rng_states()
    assert (
        isinstance(states["python"], list)
        and isinstance(states["numpy"][1], list)
        and isinstance(states["torch"], torch.Tensor)
    )


@pytest.mark.slow  # three real interpreters
def test_stop_pids_stops_exactly_the_given_processes_and_their_tree_is_found():
    """A parent that ignores SIGTERM (its child inherits that) is killed after the grace period;
    the child is found as a descendant; an unrelated process started beside them keeps running."""
    from fedmetanas_core.util.processes import alive, descendants, stop_pids

    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", stubborn])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.time() + 20
        while not descendants([parent.pid]) and time.time() < deadline:
            time.sleep(0.05)
        (child,) = descendants([parent.pid])
        time.sleep(0.3)  # let the parent install its SIGTERM handler
        stop_pids([parent.pid, child], grace_s=0.5)
        parent.wait(timeout=10)
        assert parent.returncode == -9  # SIGTERM ignored: killed
        assert not alive(child) and alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()

"""Faulty clients and bad data: excluded with a reason, never able to break the global model.

(a) Unit tests feed constructed Flower Messages to ``SearchStrategy.aggregate_train``; the faulty
    replies are made by the same ``corrupt_reply`` the simulation's fault injection uses.
(b) One real simulation (real ServerApp, ClientApp and Flower simulation engine) where three of
    five clients send a NaN reply, a wrong shape and an exception every round.
(c) Bad data: corrupt images and partitions too small to split.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, Krum

from fedmetanas_core import data as D
from fedmetanas_core.run.config import ConfigError, RunConfig
from harness.simulation import FAULT_KINDS, corrupt_reply, parse_faults, run_in_process
from server_app.strategy import SearchStrategy, check_strategy, short_reason

pytestmark = pytest.mark.usefixtures("flower_task_identity")

RNG = np.random.default_rng(0)
GLOBAL = {
    "net.stem.weight": RNG.normal(size=(4, 1, 3, 3)).astype(np.float32),
    "net.classifier.bias": RNG.normal(size=(10,)).astype(np.float32),
    "arch.alpha.normal": RNG.normal(size=(5, 4)).astype(np.float32),
}


def record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in state.items()})


def request(node: int) -> Message:
    return Message(
        RecordDict({"arrays": record(GLOBAL), "config": ConfigRecord({})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )


def reply(node: int, state: dict[str, np.ndarray], n: int, **metrics) -> Message:
    content = RecordDict(
        {"arrays": record(state), "metrics": MetricRecord({"num-examples": n, "train-loss": 1.0, **metrics})}
    )
    return Message(content, reply_to=request(node))


def good_replies() -> tuple[list[Message], list[dict[str, np.ndarray]], list[int]]:
    states = [{k: v + 0.1 * (i + 1) for k, v in GLOBAL.items()} for i in range(3)]
    sizes = [10, 20, 30]
    return [reply(i + 1, s, n) for i, (s, n) in enumerate(zip(states, sizes, strict=False))], states, sizes


def faulty_reply(kind: str, node: int = 99) -> Message:
    if kind == "exception":  # what Flower delivers for a ClientApp that raised
        return Message(Error(code=0, reason="ClientApp raised: RuntimeError: injected fault"), reply_to=request(node))
    req = request(node)
    return corrupt_reply(reply(node, {k: v.copy() for k, v in GLOBAL.items()}, 50), kind, req)


def strategy(min_replies: int = 2, base=None) -> SearchStrategy:
    s = SearchStrategy(base or FedAvg(min_train_nodes=1, min_available_nodes=1), "logits", min_replies)
    s.set_reference(record(GLOBAL))
    return s


def weighted_mean(states, sizes):
    total = sum(sizes)
    return {k: sum(s[k].astype(np.float64) * n / total for s, n in zip(states, sizes, strict=False)) for k in states[0]}


REASONS = {
    "nan": "non-finite",
    "inf": "non-finite",
    "shape": "wrong shape",
    "names": "wrong array names",
    "norm": "absurd norm",
    "exception": "client error",
}


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_faulty_reply_is_excluded_with_a_logged_reason(kind, caplog):
    good, states, sizes = good_replies()
    s = strategy()
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = s.aggregate_train(1, [good[0], faulty_reply(kind), *good[1:]])
    assert len(s.rejected) == 1 and s.rejected[0].startswith("node 99:") and REASONS[kind] in s.rejected[0]
    assert any("node 99" in r.getMessage() and REASONS[kind] in r.getMessage() for r in caplog.records)
    assert arrays is not None and set(arrays) == set(GLOBAL)
    expected = weighted_mean(states, sizes)
    for key, value in arrays.items():
        assert np.all(np.isfinite(value.numpy()))
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-5, atol=1e-6)
    assert metrics is not None


def test_all_faults_together_leave_the_mean_of_the_good_replies():
    good, states, sizes = good_replies()
    s = strategy()
    arrays, _ = s.aggregate_train(3, [faulty_reply(k, 90 + i) for i, k in enumerate(FAULT_KINDS)] + good)
    assert len(s.rejected) == len(FAULT_KINDS)
    expected = weighted_mean(states, sizes)
    for key, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: reply(7, GLOBAL, 0), "num-examples"),
        (lambda: reply(7, GLOBAL, float("nan")), "num-examples"),
        (lambda: reply(7, GLOBAL, 10, extra=1.0), "metric keys"),
        (lambda: reply(7, {**GLOBAL, "net.stem.weight": GLOBAL["net.stem.weight"].astype(np.complex64)}, 10), "dtype"),
        (lambda: Message(RecordDict({"arrays": record(GLOBAL)}), reply_to=request(7)), "MetricRecord"),
        (
            lambda: Message(
                RecordDict({"w": record(GLOBAL), "metrics": MetricRecord({"num-examples": 5})}), reply_to=request(7)
            ),
            "ArrayRecord",
        ),
    ],
)
def test_malformed_replies_are_excluded(make, reason):
    good, states, sizes = good_replies()
    s = strategy()
    arrays, _ = s.aggregate_train(1, [*good, make()])
    assert len(s.rejected) == 1 and reason in s.rejected[0], s.rejected
    expected = weighted_mean(states, sizes)
    for key, value in arrays.items():
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-5, atol=1e-6)


def test_too_few_usable_replies_skip_the_round_and_keep_the_global_model(caplog):
    good, _, _ = good_replies()
    before = {k: v.copy() for k, v in GLOBAL.items()}
    s = strategy(min_replies=2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        result = s.aggregate_train(2, [good[0], faulty_reply("nan", 5), faulty_reply("exception", 6)])
    assert result == (None, None)
    assert len(s.rejected) == 2
    assert any("round skipped" in r.getMessage() for r in caplog.records)
    assert all(np.array_equal(GLOBAL[k], before[k]) for k in GLOBAL)
    assert s.aggregate_train(3, []) == (None, None)


def test_non_finite_aggregate_or_failing_strategy_skips_the_round():
    class NaNAvg(FedAvg):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            return record({k: np.full_like(v.numpy(), np.nan) for k, v in arrays.items()}), metrics

    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):
            raise RuntimeError("cannot aggregate")

    good, _, _ = good_replies()
    arrays, _ = strategy(base=NaNAvg(min_train_nodes=1, min_available_nodes=1)).aggregate_train(1, good)
    assert arrays is None
    good, _, _ = good_replies()
    assert strategy(base=Broken(min_train_nodes=1, min_available_nodes=1)).aggregate_train(1, good) == (None, None)


def test_robust_strategy_behind_the_screen_never_sees_faulty_replies():
    good, _, _ = good_replies()
    more = [reply(10 + i, {k: v + 0.05 * i for k, v in GLOBAL.items()}, 10) for i in range(2)]
    s = strategy(base=Krum(num_malicious_nodes=0, min_train_nodes=1, min_available_nodes=1))
    arrays, _ = s.aggregate_train(1, [*good, *more, faulty_reply("norm"), faulty_reply("nan", 98)])
    assert arrays is not None and len(s.rejected) == 2
    assert all(np.all(np.isfinite(v.numpy())) for v in arrays.values())


def test_corrupt_reply_kinds_and_fault_parsing():
    base = reply(3, GLOBAL, 10)
    req = request(3)
    for kind in ("nan", "inf", "shape", "names", "norm"):
        out = corrupt_reply(base, kind, req)
        assert out.metadata.src_node_id == 3
        assert out.content["metrics"]["num-examples"] == 10
    assert all(np.array_equal(v.numpy(), GLOBAL[k]) for k, v in base.content["arrays"].items())  # original untouched
    assert parse_faults("0:exception, 1:nan") == {0: "exception", 1: "nan"}
    assert parse_faults("") == {}
    for bad in ("0", "x:nan", "0:melt"):
        with pytest.raises(ValueError):
            parse_faults(bad)


def test_client_error_reason_is_shortened_to_its_gist():
    ray_style = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
        "(pid=1)\n"
        '  File "x.py", line 1, in f\n    raise\nflwr.clientapp.client_app.ClientAppException: \n'
        "Exception ClientAppException occurred. Message: partition 3 has 2 example(s) but needs at least 3'>"
    )
    assert short_reason(ray_style) == "partition 3 has 2 example(s) but needs at least 3"
    assert short_reason("disk full") == "disk full" and short_reason(None) == "no reason given"
    assert len(short_reason("x" * 5000)) == 300
    s = strategy()
    good, _, _ = good_replies()
    s.aggregate_train(1, [*good, Message(Error(code=2, reason=ray_style), reply_to=request(5))])
    assert s.rejected == ["node 5: client error: partition 3 has 2 example(s) but needs at least 3"]


def test_check_strategy(tmp_path):
    check_strategy(RunConfig.from_flat({}))
    check_strategy(RunConfig.from_flat({"strategy": "FedAdam"}))
    for name, text in (
        ("no_such_package.module:MyStrategy", "cannot import module"),
        ("json:NoSuchClass", "no such class"),
        ("collections:OrderedDict", "not a flwr.serverapp.strategy.Strategy"),
    ):
        with pytest.raises(ConfigError) as info:
            check_strategy(RunConfig.from_flat({"strategy": name}))
        assert info.value.key == "strategy" and text in str(info.value), str(info.value)
    (tmp_path / "my_strategies_for_test.py").write_text(
        "from flwr.serverapp.strategy import FedAvg\n\nclass Mine(FedAvg):\n    pass\n"
    )
    check_strategy(RunConfig.from_flat({"strategy": "my_strategies_for_test:Mine"}), app_dir=tmp_path)
    (tmp_path / "my_broken_strategy_for_test.py").write_text("raise ImportError('boom')\n")
    with pytest.raises(ConfigError, match="importing it failed"):
        check_strategy(RunConfig.from_flat({"strategy": "my_broken_strategy_for_test:X"}), app_dir=tmp_path)


# --- (b) one real simulation ------------------------------------------------------------------

TINY_RUN = {
    "num-server-rounds": 2,
    "local-meta-iters": 2,
    "min-available-nodes": 5,
    "min-train-nodes": 2,
    "fraction-evaluate": 0.0,
    "num-cells": 2,
    "num-nodes": 2,
    "init-channels": 4,
    "stem-multiplier": 1,
    "primitives": "none,max_pool_3x3,skip_connect,sep_conv_3x3",
    "batch-size": 16,
    "partitioner": "iid",
    "train-subset": 400,
    "test-subset": 100,
    "checkpoint": False,
}


@pytest.mark.slow  # Flower's simulation engine (Ray)
def test_simulation_with_faulty_clients_completes_and_counts_rejections(tmp_path):
    out = tmp_path / "run"
    run_in_process(
        {**TINY_RUN, "results-dir": str(out)}, num_supernodes=5, faults={0: "nan", 1: "shape", 2: "exception"}
    )
    summary = json.loads((out / "summary.json").read_text())
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["replies"] == 5 and r["rejected"] == 3 and r["aggregated"], r
        reasons = " | ".join(r["rejected-reasons"])
        assert "non-finite" in reasons and "wrong shape" in reasons, reasons
        assert "client error: injected fault in partition 2" in reasons, reasons
        assert math.isfinite(r["accuracy"])
    assert summary["rejected_replies"] == 6
    assert math.isfinite(summary["final_test_accuracy"]) and math.isfinite(summary["final_test_loss"])


# --- (c) bad data -------------------------------------------------------------------------------


def make_tree(root: Path, per_class: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, colour in enumerate(((200, 30, 30), (30, 200, 30))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.clip(np.array(colour) + rng.integers(-20, 20, (6, 6, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_truncated_image_is_reported_with_its_path_or_skipped(tmp_path, fresh_data_caches):
    root = make_tree(tmp_path / "tree")
    good = (root / "train" / "class0" / "0.png").read_bytes()
    bad = root / "train" / "class1" / "truncated.png"
    bad.write_bytes(good[: len(good) // 2])  # a real PNG header, cut off
    with pytest.raises(D.DataError, match=r"truncated\.png.*on-corrupt-image"):
        D.load_dataset("imagefolder", str(root))
    with pytest.warns(UserWarning, match=r"truncated\.png"):
        train, test = D.load_dataset("imagefolder", str(root), on_corrupt_image="skip")
    assert (len(train), len(test)) == (8, 8)
    D.clear_caches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        client = D.load_client_data(
            D.DataSpec(
                dataset="imagefolder",
                data_dir=str(root),
                partitioner="iid",
                on_corrupt_image="skip",
                partition_id=0,
                num_partitions=2,
            )
        )
    assert len(client.train) + len(client.query) + len(client.test) == 4


def test_corrupt_test_image_fails_on_the_server_path(tmp_path, fresh_data_caches):
    root = make_tree(tmp_path / "tree")
    (root / "test" / "class0" / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(D.DataError, match=r"junk\.png"):
        D.load_dataset("imagefolder", str(root))


@pytest.mark.parametrize("size", [0, 1, 2])
def test_partition_too_small_to_split_names_the_setting(size):
    with pytest.raises(D.DataError) as info:
        D.split_partition(np.arange(size), partition_id=4)
    text = str(info.value)
    assert f"partition 4 has {size} example(s)" in text and "min-partition-size" in text


def test_smallest_splittable_partition_gets_one_example_per_split():
    train, query, test = D.split_partition(np.arange(3), query_fraction=0.2, test_fraction=0.2)
    assert (len(train), len(query), len(test)) == (1, 1, 1)
    train, query, test = D.split_partition(np.arange(4), query_fraction=0.45, test_fraction=0.45)
    assert min(len(train), len(query), len(test)) == 1 and len(train) + len(query) + len(test) == 4


def test_client_with_a_tiny_partition_gets_a_clear_error(fresh_data_caches):
    # 20 examples over 10 iid partitions: 2 each, too few for train, query and test
    with pytest.raises(D.DataError, match="partition 3 has 2 example"):
        D.load_client_data(D.DataSpec(partitioner="iid", train_subset=20, partition_id=3, num_partitions=10))


def test_dirichlet_min_partition_size_below_split_minimum_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        RunConfig.from_flat({"min-partition-size": 2})
    assert info.value.key == "min-partition-size"

"""ClientApp: decodes the round's records, runs the node's local work in the core, replies.

The work is ``fedmetanas_core.federation.client_round`` (build, load, train or personalize); the records'
conversions are ``flower_records``; the client-side DP mod is ``client_app.privacy``. The node's
data: when the SuperNode's node config names ``partition-id`` the global training set is
partitioned by id (simulation, or a deployment that asks for it); otherwise the node's own dataset
at its ``data-dir`` is the whole partition and its Flower node id is its partition id. No client
ever sees the global test set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.privacy import dp_mod
from fedmetanas_core.federation.client_round import (
    describe_node,
    node_threads,
    personalize_round,
    run_config,
    train_round,
)
from fedmetanas_core.method.training import run_settings
from flower_records import array_record, round_plan, torch_state

app = ClientApp()


def in_run_settings(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run ``handler`` under its run's torch settings (threads, determinism, fast path), restored
    afterwards: a process serving several runs must give each its own settings."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        cfg = run_config(context.run_id, context.run_config)
        with run_settings(cfg, node_threads(cfg)):
            return handler(msg, context)

    return wrapped


def decoded(msg: Message, context: Context) -> tuple:
    """The core's arguments from the message and the context: run config, round config, received
    tensors, round plan, node config, node id."""
    config, state = dict(msg.content["config"]), torch_state(msg.content["arrays"])
    cfg = run_config(context.run_id, context.run_config)
    return cfg, config, state, round_plan(config, state), dict(context.node_config), context.node_id


@app.train(mods=[dp_mod])
@in_run_settings
def train(msg: Message, context: Context) -> Message:
    arrays, metrics = train_round(*decoded(msg, context))
    return Message(RecordDict({"arrays": array_record(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
@in_run_settings
def evaluate(msg: Message, context: Context) -> Message:
    """Local test accuracy of the deployed network before and after adapting it on local training data."""
    metrics = personalize_round(*decoded(msg, context))
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The node's declared budget and partition: which tier it searches for (device tiers)."""
    node = describe_node(run_config(context.run_id, context.run_config), context.node_config)
    return Message(RecordDict({"node": ConfigRecord(node)}), reply_to=msg)

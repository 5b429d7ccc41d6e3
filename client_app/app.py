"""ClientApp: decodes the round's records, runs the node's local work in the core, replies.

The node's data: when the SuperNode's node config names ``partition-id`` the global training set
is partitioned by id (simulation, or a deployment that asks for it); otherwise the node's own
dataset at its ``data-dir`` is the whole partition and the node's Flower node id is its partition
id (its random streams and its results on the server are its own). No client ever sees the global
test set.
"""

from __future__ import annotations

import functools
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, adaptiveclipping_mod, fixedclipping_mod

from fedmetanas_core.attacks import parse_attack_clients, poison
from fedmetanas_core.config import RunConfig
from fedmetanas_core.coordinator import plan_from_config
from fedmetanas_core.data import ClientData, DataSpec, load_client_data
from fedmetanas_core.genotype import Genotype, build_fixed_network
from fedmetanas_core.node_config import validate_node_config
from fedmetanas_core.privacy import local_reply_epsilon
from fedmetanas_core.seeding import make_generator
from fedmetanas_core.space import SearchModel
from fedmetanas_core.training import local_trainer, personalize_fixed, resolve_device, run_settings, space_from_config
from fedmetanas_core.transfer import live_keys
from flower_records import array_record, numpy_state

app = ClientApp()

# by run id; least recently used first out: an actor outlives its runs (a long-lived SuperNode or a
# Ray cluster serving run after run), so it keeps only the configs of the last few
_CONFIGS: OrderedDict[int, RunConfig] = OrderedDict()
RUN_CONFIG_CACHE = 8
# by everything that decides the data (never stale); least recently used first out, so an actor
# serving a population of thousands of simulated clients holds at most this many
_DATA: OrderedDict[DataSpec, ClientData] = OrderedDict()
CLIENT_DATA_CACHE = 128


def run_config(context: Context) -> RunConfig:
    """Validated once per run and process (Ray actors live across rounds), at most
    ``RUN_CONFIG_CACHE`` runs kept."""
    cfg = _CONFIGS.get(context.run_id)
    if cfg is None:
        cfg = RunConfig.from_flat(dict(context.run_config), check_paths=False)
        _CONFIGS[context.run_id] = cfg
        while len(_CONFIGS) > RUN_CONFIG_CACHE:
            _CONFIGS.popitem(last=False)
    else:
        _CONFIGS.move_to_end(context.run_id)
    return cfg


def in_run_settings(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Run ``handler`` under its run's torch settings (threads, determinism, fast path), restored
    afterwards: a process serving several runs must give each its own settings."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        cfg = run_config(context)
        threads = cfg.torch_threads or (1 if any(k.startswith("RAY_") for k in os.environ) else 0)
        with run_settings(cfg, threads):
            return handler(msg, context)

    return wrapped


def node_data(cfg: RunConfig, node_config: dict[str, Any], node_id: int = 0) -> ClientData:
    """The node's data; a node with its own data (no ``partition-id``) is identified by ``node_id``."""
    spec = DataSpec.from_config(cfg, node_config, node_id)
    if spec in _DATA:
        _DATA.move_to_end(spec)
    else:
        _DATA[spec] = load_client_data(spec)
        while len(_DATA) > CLIENT_DATA_CACHE:
            _DATA.popitem(last=False)
    return _DATA[spec]


def build_model(cfg: RunConfig, config: dict[str, Any], device: torch.device) -> torch.nn.Module:
    width = int(config["init-channels"]) if "init-channels" in config else None  # a budget may size it
    space = space_from_config(cfg, int(config["num-classes"]), int(config["in-channels"]), width)
    if config["phase"] == "search":
        return SearchModel(space).to(device)
    genotype = Genotype.from_json(config["genotype"]) if config.get("genotype") else None
    return build_fixed_network(space, genotype, int(config.get("cnn-channels", cfg.fedavg_channels))).to(device)


def load_received(
    model: torch.nn.Module, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], transfer: str
) -> None:
    """Load what the server sent: a supernet under live transfer lacks exactly the ops its masks
    drop (``transfer.live_keys``); anything else means server and client disagree, and is refused."""
    names = list(model.state_dict())
    expected = live_keys(model.space, names, masks) if isinstance(model, SearchModel) and transfer == "live" else names
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state))[:3], sorted(set(state) - set(expected))[:3]
        raise ValueError(
            f"the arrays sent do not match the round's live weights (missing {missing}, unexpected {extra})"
        )
    model.load_state_dict(state, strict=len(expected) == len(names))


def _prepare(msg: Message, context: Context):
    cfg = run_config(context)
    node_config = validate_node_config(dict(context.node_config), cfg)
    config = dict(msg.content["config"])
    device = resolve_device(cfg.device)
    model = build_model(cfg, config, device)
    state = msg.content["arrays"].to_torch_state_dict()
    shapes = {k: v.shape for k, v in state.items()}
    plan = plan_from_config(config, shapes)
    load_received(model, state, plan.masks, cfg.transfer)
    plan.masks = {k: v.to(device) for k, v in plan.masks.items()}
    data = node_data(cfg, node_config, context.node_id)
    return cfg, config, device, model, plan, data


def dp_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """The run's client-side DP (the ``dp`` key): Flower's ``fixedclipping_mod`` /
    ``adaptiveclipping_mod`` (the server's DP wrapper sends the clipping norm) or ``LocalDpMod``;
    nothing for the other modes. Mods are fixed when the ClientApp is built, so this one reads the
    run config and picks. Flower's mods pair the reply's arrays with the sent ones by position:
    the reply is put in the sent key order first."""
    cfg = run_config(context)
    if cfg.dp == "client-fixed":
        mod = fixedclipping_mod
    elif cfg.dp == "client-adaptive":
        mod = adaptiveclipping_mod
    elif cfg.dp == "local":
        z, delta = cfg.dp_noise_multiplier, cfg.dp_delta
        mod = LocalDpMod(cfg.dp_clipping_norm, cfg.dp_clipping_norm, local_reply_epsilon(z, delta), delta)
    else:
        return call_next(msg, context)
    sent = list(msg.content["arrays"].keys()) if "arrays" in msg.content.array_records else []

    def in_sent_order(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if not reply.has_error() and "arrays" in reply.content.array_records:
            arrays = reply.content["arrays"]
            if set(arrays.keys()) == set(sent):
                reply.content["arrays"] = ArrayRecord({k: arrays[k] for k in sent})
        return reply

    return mod(msg, context, in_sent_order)


@app.train(mods=[dp_mod])
@in_run_settings
def train(msg: Message, context: Context) -> Message:
    t0 = time.time()
    cfg, config, device, model, plan, data = _prepare(msg, context)
    generator = make_generator(cfg.seed, "train", data.partition_id, config.get("phase"), plan.server_round)
    mu = float(config.get("proximal-mu", 0.0))  # set by FedProx
    trainer = local_trainer(config["phase"], cfg.method)  # training.LOCAL_TRAINING, by phase kind and method
    result = trainer(model, data, cfg, plan, generator, device, mu)
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "partition-id": data.partition_id,
            "train-loss": result.train_loss,
            "steps": result.steps,
            "images": result.images,
            "client-seconds": time.time() - t0,
            "started-at": t0,  # unix time: the server's rounds.jsonl shows when the first client began
        }
    )
    received = msg.content["arrays"].keys()  # the reply carries what was sent: nothing pruned travels back
    reply = ArrayRecord({k: v for k, v in model.state_dict().items() if k in received})
    arrays = attacked(cfg, data.partition_id, msg.content["arrays"], reply)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def attacked(cfg: RunConfig, partition_id: int, sent: ArrayRecord, reply: ArrayRecord) -> ArrayRecord:
    """Simulations only: an attacking partition (``attack-clients``) replies with the poisoned
    state ``attacks.poison`` makes from what the server sent and the honest reply; others as they are."""
    if cfg.attack == "none" or partition_id not in parse_attack_clients(cfg.attack_clients):
        return reply
    poisoned = poison(cfg.attack, numpy_state(sent), numpy_state(reply), cfg.attack_scale, cfg.primitive_list)
    return array_record(poisoned)


@app.evaluate()
@in_run_settings
def evaluate(msg: Message, context: Context) -> Message:
    """Local test accuracy of the deployed network before and after adapting it on local training data."""
    cfg, config, device, model, plan, data = _prepare(msg, context)
    if config["phase"] != "fixed":
        raise ValueError("personalization evaluates the deployed (fixed) network; the server sent a supernet")
    generator = make_generator(cfg.seed, "personalize", data.partition_id)
    result = personalize_fixed(model, data, cfg, generator, device)
    metrics = MetricRecord({"num-examples": len(data.test), "partition-id": data.partition_id, **result})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)

"""A client's round, Flower-free: the work a node does between decoding the server's message and
replying to it.

The ClientApp turns records into plain values (the round's config, the received tensors and the
``RoundPlan``) and hands them here; what comes back (the reply's arrays, the metrics) it turns into
records again. The same code runs under a Flower simulation, a deployment and the harness's
in-process grid. A node process outlives its runs, so the validated run configs it keeps are
bounded (``RUN_CONFIGS``), like its data (``data.node_cache``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..data import ClientData, node_data
from ..method.genotype import Genotype, build_fixed_network
from ..method.tier_distill import deployed_forward, distilled
from ..method.tiers import declared_budget, smaller_tier_index, split_smaller_tiers
from ..method.training import RoundPlan, local_trainer, personalize_fixed, resolve_device, space_from_config
from ..method.transfer import live_keys
from ..run.config import RunConfig
from ..run.node_config import validate_node_config
from ..space import SearchModel
from ..threats.attacks import attacked
from ..util.lru import LruCache
from ..util.seeding import make_generator
from .coordinator import plan_from_config

# by run id: an actor serving run after run (a long-lived SuperNode, a Ray cluster) keeps the last few
RUN_CONFIGS: LruCache[int, RunConfig] = LruCache(8)
# by what the network is: a node reloads the round's weights into the network it built last round
# rather than building it again (a supernet takes 20-40 ms to build, a discrete-cell round ~300 ms in all)
NETWORKS: LruCache[tuple, torch.nn.Module] = LruCache(4)


def run_config(run_id: int, flat: Mapping[str, Any]) -> RunConfig:
    """The run's config, validated once per run and process (Ray actors live across rounds)."""
    return RUN_CONFIGS.get(run_id, lambda: RunConfig.from_flat(dict(flat), check_paths=False))


def node_threads(cfg: RunConfig) -> int:
    """Torch threads for a node's work: ``torch-threads``, else one inside Ray (its actors share the
    machine's cores), else torch's default (0)."""
    return cfg.torch_threads or (1 if any(k.startswith("RAY_") for k in os.environ) else 0)


def build_model(cfg: RunConfig, config: Mapping[str, Any], device: torch.device) -> torch.nn.Module:
    """The network the round's config describes: the supernet while searching, else the fixed one.

    Built once per process and thread, then reused (``NETWORKS``): its weights are whatever the last
    round left, so the caller loads every weight it uses (``load_received``: the ops a mask drops
    keep stale values, and the forward pass never runs them)."""
    width = int(config["init-channels"]) if "init-channels" in config else None  # a budget may size it
    space = space_from_config(cfg, int(config["num-classes"]), int(config["in-channels"]), width)
    phase, genotype_json = config["phase"], config.get("genotype") or ""
    channels = int(config.get("cnn-channels", cfg.fedavg_channels))

    def build() -> torch.nn.Module:
        if phase == "search":
            return SearchModel(space).to(device)
        genotype = Genotype.from_json(genotype_json) if genotype_json else None
        return build_fixed_network(space, genotype, channels).to(device)

    key = (space, phase, genotype_json if phase != "search" else "", channels, str(device), threading.get_ident())
    model = NETWORKS.get(key, build)
    model.zero_grad(set_to_none=True)
    return model.train()


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


def _node(cfg: RunConfig, node_config: Mapping[str, Any], node_id: int) -> tuple[torch.device, ClientData]:
    """The node's device and data (its node config validated)."""
    node_config = validate_node_config(dict(node_config), cfg)
    return resolve_device(cfg.device), node_data(cfg, node_config, node_id)


def received_network(
    cfg: RunConfig, config: Mapping[str, Any], state: dict[str, torch.Tensor], plan: RoundPlan, device: torch.device
) -> torch.nn.Module:
    """The network the server sent, built and loaded on ``device``; the plan's masks moved there too."""
    model = build_model(cfg, config, device)
    load_received(model, state, plan.masks, cfg.transfer)
    plan.masks = {k: v.to(device) for k, v in plan.masks.items()}
    return model


def train_round(
    cfg: RunConfig,
    config: Mapping[str, Any],
    state: dict[str, torch.Tensor],
    plan: RoundPlan,
    node_config: Mapping[str, Any],
    node_id: int,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train on the node's data as the round's phase and the method say (``training.LOCAL_TRAINING``);
    the reply carries exactly the arrays sent (nothing pruned travels back), poisoned when this
    partition attacks (``attacks.attacked``), and the round's metrics. With device tiers the message
    may also carry smaller tiers' networks (``train-smaller-tiers``): the node trains their weights
    on the same data, their architecture frozen, and sends them back under their prefix."""
    t0 = time.time()
    own_config, own_state, smaller = split_smaller_tiers(dict(config), state)
    device, data = _node(cfg, node_config, node_id)
    # the teacher's targets first: a tier of the same width is the same reused network (NETWORKS),
    # so loading the teacher after the node's own network would overwrite its weights and alphas
    own_data = teacher_targets(cfg, data, smaller, device) if cfg.tier_distill > 0 else data
    model = received_network(cfg, own_config, own_state, plan, device)
    generator = make_generator(cfg.seed, "train", data.partition_id, config.get("phase"), plan.server_round)
    mu = float(config.get("proximal-mu", 0.0))  # set by FedProx
    result = local_trainer(config["phase"], cfg.method)(model, own_data, cfg, plan, generator, device, mu)
    steps, images = result.steps, result.images
    # copies: the network is reused next round (build_model), and a reply must not change with it
    honest = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if k in own_state}
    for prefix, sub_config, sub_state in smaller:
        sub_plan = plan_from_config(sub_config, {k: v.shape for k, v in sub_state.items()})
        sub_model = received_network(cfg, sub_config, sub_state, sub_plan, device)
        sub_generator = make_generator(cfg.seed, "train", data.partition_id, prefix, plan.server_round)
        sub = local_trainer(sub_config["phase"], cfg.method)(sub_model, data, cfg, sub_plan, sub_generator, device, mu)
        steps, images = steps + sub.steps, images + sub.images
        honest.update(
            {prefix + k: v.detach().cpu().numpy().copy() for k, v in sub_model.state_dict().items() if k in sub_state}
        )
    metrics = {
        "num-examples": result.num_examples,
        "partition-id": data.partition_id,
        "train-loss": result.train_loss,
        "steps": steps,
        "images": images,
        "client-seconds": time.time() - t0,
        "started-at": t0,  # unix time: the server's rounds.jsonl shows when the first client began
    }
    received = {k: v.numpy() for k, v in state.items()}
    return attacked(cfg, data.partition_id, received, honest), metrics


def teacher_targets(
    cfg: RunConfig, data: ClientData, smaller: list[tuple[str, dict, dict]], device: torch.device
) -> ClientData:
    """``data`` with soft targets from the next smaller tier's deployed network, as received
    (``tier-distill``); as it is when there is no smaller tier or its cell is undecided."""
    if not smaller:
        return data
    _, teacher_config, teacher_state = max(smaller, key=lambda sub: smaller_tier_index(sub[0]))
    teacher_plan = plan_from_config(teacher_config, {k: v.shape for k, v in teacher_state.items()})
    teacher = deployed_forward(
        received_network(cfg, teacher_config, teacher_state, teacher_plan, device), teacher_plan.masks
    )
    return data if teacher is None else distilled(data, teacher, cfg.tier_distill, cfg.eval_batch_size, device)


def personalize_round(
    cfg: RunConfig,
    config: Mapping[str, Any],
    state: dict[str, torch.Tensor],
    plan: RoundPlan,
    node_config: Mapping[str, Any],
    node_id: int,
) -> dict[str, Any]:
    """Local test accuracy of the deployed network before and after adapting it on local training data."""
    if config["phase"] != "fixed":
        raise ValueError("personalization evaluates the deployed (fixed) network; the server sent a supernet")
    device, data = _node(cfg, node_config, node_id)
    model = received_network(cfg, config, state, plan, device)
    result = personalize_fixed(model, data, cfg, make_generator(cfg.seed, "personalize", data.partition_id), device)
    return {"num-examples": len(data.test), "partition-id": data.partition_id, **result}


def describe_node(cfg: RunConfig, node_config: Mapping[str, Any]) -> dict[str, Any]:
    """What the server asks before a tiered run (device tiers): the budget the node's config
    declares, and its partition in simulation; a bad node config raises ConfigError naming the key."""
    node_config = validate_node_config(dict(node_config), cfg)
    declared = declared_budget(node_config)
    return {
        "partition-id": int(node_config.get("partition-id", -1)),
        "num-partitions": int(node_config.get("num-partitions", cfg.num_partitions)),
        "budget-kind": declared[0] if declared else "",
        "budget-limit": declared[1] if declared else 0.0,
    }

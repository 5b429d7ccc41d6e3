"""The server's side of device tiers: which node searches for which tier, a tiered round, and each
tier's network at the end (``fedmetanas_core.federation.tiered`` holds what is shared and what not).

Before the first round the server asks every connected node (a ``query`` message) for the budget
its node config declares and, in simulation, its partition; a node whose budget no tier meets, or
whose node config is invalid, is told apart in the log with the reason and takes no part, and the
run goes on with the others. Each round every participating node gets its own tier's slice of the
weights, its tier's architecture, masks and cost model; faulty replies are screened as in any run.
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log

from fedmetanas_core.federation.coordinator import deployed_config, finite_state, image_hw, model_config
from fedmetanas_core.federation.tiered import TieredPhase, tier_config
from fedmetanas_core.method.aggregation import State
from fedmetanas_core.method.budget import cost_report
from fedmetanas_core.method.genotype import count_parameters
from fedmetanas_core.method.tiers import Tier, client_tier, local_mean, parse_tiers
from fedmetanas_core.method.training import evaluate, state_arrays
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.run.config_keys import parse_budget, parse_tier_shares
from fedmetanas_core.run.outputs import RunRecorder
from fedmetanas_core.util.seeding import derive_seed
from flower_records import array_record, numpy_state, round_record
from server_app.exchange import connected_nodes, send_and_receive
from server_app.strategy import reply_issue, short_reason


def sample_nodes(
    nodes: list[int], fraction: float, minimum: int, seed: int, server_round: int, stream: str = "tier-sample"
) -> list[int]:
    """``fraction`` of ``nodes`` (at least ``minimum``; Flower's rule), drawn by seed, round and
    ``stream`` (training and evaluation draw apart, as Flower's two samples do).
    Positions are drawn, not ids: Flower's node ids are unsigned 64-bit and numpy would make a mix
    of ids above and below 2**63 floats."""
    k = min(len(nodes), max(minimum, int(len(nodes) * fraction)))
    if k == len(nodes):
        return list(nodes)
    rng = np.random.default_rng(derive_seed(seed, stream, server_round))
    return [nodes[i] for i in sorted(rng.choice(len(nodes), size=k, replace=False).tolist())]


class TierRounds:
    """A tiered run's node-to-tier map and rounds; has the fields a round's row reads from a strategy."""

    def __init__(self, grid, cfg: RunConfig, phase: TieredPhase, base_config: dict[str, Any]):
        self.grid, self.cfg, self.phase, self.base_config = grid, cfg, phase, base_config
        self.rejected: list[str] = []
        self.alpha_screened: list[str] = []
        self.update_norms: list[tuple[float, float]] = []
        self.skipped_reason: str | None = None
        self.node_tier, self.refused = self.ask_nodes()
        self.references: dict[int, State] = {}

    def ask_nodes(self) -> tuple[dict[int, int], dict[int, str]]:
        """Node id -> index of its tier in the phase; node id -> why it takes no part."""
        cfg, all_tiers = self.cfg, parse_tiers(self.cfg.tiers)
        shares = parse_tier_shares(cfg.tier_shares, len(all_tiers))
        run_budget = parse_budget(cfg.budget)
        in_process = not hasattr(self.grid, "push_messages")  # an in-process grid has all its nodes at once
        settle = 0.0 if in_process else 2.0
        nodes = connected_nodes(self.grid, cfg.min_available_nodes, cfg.round_timeout, settle, cfg.round_timeout)
        ask = RecordDict({"config": ConfigRecord({"ask": "tier"})})
        messages = [Message(ask, dst_node_id=n, message_type="query") for n in nodes]
        node_tier: dict[int, int] = {}
        refused: dict[int, str] = {}
        for reply in send_and_receive(self.grid, messages, cfg.round_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() or "node" not in reply.content.config_records:
                reason = short_reason(reply.error.reason) if reply.has_error() else "no answer to the tier query"
                refused[node] = reason
                continue
            answer = dict(reply.content["node"])
            declared = (str(answer["budget-kind"]), float(answer["budget-limit"])) if answer["budget-kind"] else None
            partition = int(answer["partition-id"])
            tier, why = client_tier(
                all_tiers,
                declared,
                partition if partition >= 0 else None,
                int(answer["num-partitions"]) or None,
                shares,
                cfg.seed,
                run_budget,
            )
            if tier is None:
                refused[node] = why
            elif tier not in self.phase.tiers:
                refused[node] = f"{why}: tier {tier.budget}, and only-tier = {cfg.only_tier}"
            else:
                node_tier[node] = self.phase.tiers.index(tier)
                log(INFO, "node %s searches for tier %s (%s)", node, tier.budget, why)
        for node in nodes:
            if node not in node_tier and node not in refused:
                refused[node] = "no reply to the tier query"
        for node, reason in refused.items():
            log(WARNING, "node %s takes no part in this run: %s", node, reason)
        empty = [t.budget for i, t in enumerate(self.phase.tiers) if i not in node_tier.values()]
        if empty:  # its architecture would never move, and its cell be decided by the masks' schedule alone
            raise ConfigError(
                "tiers",
                cfg.tiers,
                f"no client searches for tier {', '.join(empty)} (tier-shares, or the nodes' declared budgets)",
            )
        if len(node_tier) < self.cfg.min_train_nodes:
            raise ConfigError(
                "min-train-nodes",
                cfg.min_train_nodes,
                f"only {len(node_tier)} node(s) can take part in the tiered run (the others' reasons are logged)",
            )
        return node_tier, refused

    def sampled(self, server_round: int) -> list[int]:
        """This round's nodes: the participants still connected, all of them or ``fraction-train``
        of them (seeded)."""
        online = set(self.grid.get_node_ids())
        nodes = [n for n in sorted(self.node_tier) if n in online]
        return sample_nodes(nodes, self.cfg.fraction_train, self.cfg.min_train_nodes, self.cfg.seed, server_round)

    def configure_train(self, server_round: int, state: State) -> tuple[list[Message], dict[str, Any]]:
        """Each sampled node's message (its tier's round); and the largest tier's config for the row."""
        messages, config = [], {}
        chosen = self.sampled(server_round)
        for i in range(len(self.phase.phases)):
            config, arrays = self.phase.tier_round(i, server_round, state)
            self.references[i] = arrays
            record = RecordDict({"arrays": array_record(arrays), "config": round_record(self.base_config, config)})
            for node in chosen:
                if self.node_tier[node] == i:
                    messages.append(Message(record, dst_node_id=node, message_type="train"))
        return messages, config

    def aggregate_train(self, server_round: int, state: State, replies: list[Message]) -> State | None:
        """The next state, or None (round skipped) when too few usable replies or a non-finite result."""
        self.rejected, self.update_norms, self.skipped_reason = [], [], None
        usable = []
        for msg in replies:
            node = msg.metadata.src_node_id
            tier = self.node_tier.get(node)
            try:
                reason = "not a participant" if tier is None else reply_issue(msg, self.references[tier])
            except Exception as exc:  # a reply the screen cannot read is a faulty reply
                reason = f"unreadable reply: {type(exc).__name__}: {exc}"
            if reason:
                self.rejected.append(f"node {node}: {reason}")
                log(WARNING, "round %s: reply from node %s excluded from aggregation: %s", server_round, node, reason)
                continue
            usable.append((tier, numpy_state(msg.content["arrays"]), float(msg.content["metrics"]["num-examples"])))
        if len(usable) < self.cfg.min_train_nodes:
            self.skipped_reason = "too few replies"
            return None
        out = self.phase.aggregate(state, usable)
        if not finite_state(out):
            self.skipped_reason = "error: aggregate is not finite"
            return None
        return out

    def personalize(self, i: int, net, genotype, server_round: int) -> list[dict[str, Any]]:
        """Tier ``i``'s network adapted and scored on its clients' local test splits: ``fraction-evaluate``
        of them (at least one), as the run without tiers samples its evaluation."""
        nodes = [n for n, t in sorted(self.node_tier.items()) if t == i]
        if self.cfg.fraction_evaluate == 0 or not nodes:
            return []
        nodes = sample_nodes(nodes, self.cfg.fraction_evaluate, 1, self.cfg.seed, server_round, "tier-evaluate")
        config = round_record(
            self.base_config, model_config(self.phase.phases[i].space), deployed_config(net, genotype)
        )
        record = RecordDict({"arrays": array_record(state_arrays(net)), "config": config})
        messages = [Message(record, dst_node_id=n, message_type="evaluate") for n in nodes]
        replies = send_and_receive(self.grid, messages, self.cfg.round_timeout)
        ok = [
            dict(m.content["metrics"]) for m in replies if not m.has_error() and "metrics" in m.content.metric_records
        ]
        return sorted(ok, key=lambda m: m.get("partition-id", -1))


def write_tier_results(rounds: TierRounds, test, device, results_dir: Path, server_round: int) -> list[dict[str, Any]]:
    """Per tier: its network on the global test set and its clients' local test splits, cost, the
    exported model with its measured latency, in ``tiers/<name>/``; returns the summary rows."""
    phase, cfg = rounds.phase, rounds.cfg
    rows = []
    for i, (tier, net) in enumerate(zip(phase.tiers, phase.tier_networks(), strict=True)):
        sub = phase.phases[i]
        genotype = getattr(sub, "genotype", None)
        result = evaluate(net, test, cfg.eval_batch_size, device)
        clients = rounds.personalize(i, net, genotype, server_round)
        cost = cost_report(tier_config(cfg, tier), sub.space, image_hw(test), net)
        row = tier_summary(tier, result, clients, cost, genotype, net, sum(t == i for t in rounds.node_tier.values()))
        recorder = RunRecorder(results_dir / "tiers" / tier.name)
        if genotype is not None:
            recorder.write_genotype(genotype)
        recorder.save_model(net, sub.space, genotype)
        recorder.write_summary(row)
        export_tier(recorder.dir, net, test, cost)
        rows.append(row)
        log(
            INFO,
            "tier %s: test accuracy %.4f, local %s, %s",
            tier.budget,
            result["accuracy"],
            row["local_test_accuracy"],
            cost,
        )
    return rows


def tier_summary(tier: Tier, result, clients, cost, genotype, net, num_clients: int) -> dict[str, Any]:
    return {
        "tier": tier.name,
        "budget": tier.budget,
        "clients": num_clients,
        "final_test_accuracy": result["accuracy"],
        "local_test_accuracy": local_mean(clients, "accuracy-before"),
        "personalized_accuracy": local_mean(clients, "accuracy-after"),
        "per_client": clients,
        "cost": cost,
        "params": count_parameters(net),
        "macs": cost["macs"],
        "latency_ms": cost.get("latency_ms"),
        "within_budget": cost.get("within_budget"),
        "genotype": genotype.to_dict() if genotype is not None else None,
    }


def export_tier(out: Path, net, test, cost: dict[str, Any]) -> None:
    """TorchScript and ONNX with export.json; never fatal (summary.json is already written)."""
    from fedmetanas_core.deployment.export import export_model

    try:
        export_model(net, test, out, extra={"cost": cost})
    except Exception as exc:  # reported, never fatal
        log(WARNING, "tier export failed: %s: %s", type(exc).__name__, exc)
        (out / "export_error.txt").write_text(f"{type(exc).__name__}: {exc}\n")

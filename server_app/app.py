"""ServerApp: validates the run config, drives the phases round by round, writes the results.

Thin: the method lives in ``fedmetanas_core`` (``phases.plan_phases`` says what a run is); this
module runs "for each phase, for each round", moves records between Flower and the phases, keeps
the clock, and checkpoints after every round so a crash loses no finished round.
"""

from __future__ import annotations

import math
import time
from datetime import datetime
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmetanas_core.data import DataSpec, load_test_set
from fedmetanas_core.data.run_data import validation_set
from fedmetanas_core.federation.coordinator import (
    ProgressClock,
    deployed_config,
    fmt_duration,
    image_hw,
    model_config,
    space_for_run,
)
from fedmetanas_core.federation.phases import Phase, plan_phases
from fedmetanas_core.federation.tiered import TieredPhase
from fedmetanas_core.method.budget import cost_report
from fedmetanas_core.method.genotype import Genotype, count_parameters
from fedmetanas_core.method.training import evaluate, resolve_device, run_settings, state_arrays
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.run.outputs import RunRecorder, machine_description, package_versions
from fedmetanas_core.threats.privacy import make_accountant
from flower_records import array_record, numpy_state, round_record, select
from server_app.checkpoint import RunCheckpoint
from server_app.exchange import connected_nodes, send_and_receive
from server_app.privacy import current_clipping_norm, wrap_dp
from server_app.strategy import (
    SearchStrategy,
    alpha_defence_args,
    build_base_strategy,
    check_strategy,
    load_strategy_state,
    strategy_state,
)
from server_app.summary import (
    accuracy_fields,
    communication_fields,
    privacy_fields,
    run_fields,
    skipped_rounds,
    time_fields,
)
from server_app.tiers import TierRounds, write_tier_results

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        cfg = RunConfig.from_flat(context.run_config)
        check_strategy(cfg)
    except ConfigError as exc:
        log(ERROR, "%s", exc)
        raise SystemExit(2) from None
    with run_settings(cfg):  # this run's determinism and fast path, not the previous run's in this process
        try:
            run_experiment(grid, cfg)
        except ConfigError as exc:  # found once the federation is known (e.g. a DP config for its size)
            log(ERROR, "%s", exc)
            raise SystemExit(2) from None


def _reply_metrics(replies: list[Message]) -> list:
    """The metrics record of every reply that has one (no error)."""
    return [m.content["metrics"] for m in replies if not m.has_error() and "metrics" in m.content.metric_records]


def _reply_metric(replies: list[Message], name: str) -> list[float]:
    return [float(r[name]) for r in _reply_metrics(replies) if name in r]


def _last_client_end(replies: list[Message], t_round: float) -> float | None:
    """When the last client finished its round's work, from the round's start."""
    ends = [
        float(r["started-at"]) + float(r["client-seconds"])
        for r in _reply_metrics(replies)
        if "started-at" in r and "client-seconds" in r
    ]
    return max(ends) - t_round if ends else None


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _record_bytes(msg: Message) -> int:
    """Bytes of the arrays a message carries (shape x item size: the payload, without the .npy
    header Flower adds per tensor); 0 for an error reply."""
    if msg.has_error() or "arrays" not in msg.content.array_records:
        return 0
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in msg.content["arrays"].values())


def _answered(replies: list[Message]) -> bool:
    return any(not m.has_error() for m in replies)


def federation_size(
    grid: Grid, cfg: RunConfig, settle_s: float = 2.0, limit_s: float = 30.0, wait_s: float | None = None
) -> int:
    """The number of clients DP samples from: num-partitions when set, otherwise the connected
    nodes once at least min-available-nodes are there and the count stopped changing for
    ``settle_s``, or ``limit_s`` after there were enough (nodes register one by one; set
    num-partitions to make it exact). Never fewer than min-available-nodes: DP would account for a
    population the rounds never sample from, so after ``wait_s`` (default round-timeout) with too
    few nodes it raises ConfigError naming min-available-nodes."""
    if cfg.num_partitions:
        return cfg.num_partitions
    wait_s = cfg.round_timeout if wait_s is None else wait_s
    count = len(connected_nodes(grid, cfg.min_available_nodes, wait_s, settle_s, limit_s))
    if count < cfg.min_available_nodes:
        raise ConfigError(
            "min-available-nodes",
            cfg.min_available_nodes,
            f"only {count} node(s) connected within {wait_s:g} s (round-timeout); DP accounting needs the "
            f"federation's size: start more nodes, lower min-available-nodes, or set num-partitions",
        )
    return count


def client_order(msg: Message) -> tuple[int, int]:
    """Aggregate in a fixed order (by partition id: the node id for nodes with their own data) so
    float sums repeat exactly across runs."""
    if not msg.has_error() and "metrics" in msg.content.metric_records:
        return int(msg.content["metrics"].get("partition-id", 0)), msg.metadata.src_node_id
    return 1 << 64, msg.metadata.src_node_id  # after every partition id, node ids (uint64) included


class Experiment:
    """One run: its phases, timers, recorder and test set; the checkpoint is ``RunCheckpoint``."""

    def __init__(self, grid: Grid, cfg: RunConfig):
        self.grid, self.cfg = grid, cfg
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.recorder = RunRecorder(cfg.resolved_results_dir(stamp))
        self.checkpoint = RunCheckpoint(self.recorder.dir, cfg)
        if not self.checkpoint.resumed:
            self.recorder.start_log()
        self.recorder.write_config(dict(cfg))
        self.population = federation_size(grid, cfg) if cfg.dp != "none" else None
        cfg.check_dp(self.population)  # before any data is loaded
        self.accountant = make_accountant(cfg, self.population) if self.population else None
        self.device = resolve_device(cfg.device)
        if cfg.eval_split == "validation":  # tuning: score on data carved from the clients' training data
            self.test = validation_set(cfg)
        else:
            self.test = load_test_set(DataSpec.from_config(cfg))
        self.space = space_for_run(cfg, self.test)
        self.base_config = {"method": cfg.method, **model_config(self.space)}
        self.phases: list[Phase] = plan_phases(cfg, self.space, self.test, self.device)
        self.clock = ProgressClock(sum(p.rounds for p in self.phases))
        self.strategy: SearchStrategy | None = None  # the running phase's
        self.tiers: TierRounds | None = None  # a tiered phase's node tiers and rounds
        self.tensorboard = None
        if cfg.tensorboard:
            from fedmetanas_core.report.tensorboard_log import TensorBoardLogger

            self.tensorboard = TensorBoardLogger(self.recorder.dir / "tensorboard")
        self.progress = self.checkpoint.progress()  # a resume restores the RNGs here, after the set-up
        self.clock.done = len(self.progress.done)
        self.clock.start -= self.progress.elapsed_before
        if self.accountant is not None:
            self.accountant.releases = self.progress.dp_releases

    def run_phase(self, index: int, phase: Phase) -> None:
        """Start ``phase`` from what the phases before it left (or from the checkpoint) and run its rounds."""
        cfg = self.cfg
        search = phase.kind == "search"
        base = build_base_strategy(cfg)
        if self.population is not None:
            base = wrap_dp(base, cfg, self.population)
        strategy = SearchStrategy(
            base,
            cfg.alpha_aggregation if search else "logits",
            cfg.min_train_nodes,
            **(alpha_defence_args(cfg) if search else {}),
        )
        self.strategy = strategy
        phase.start(self.progress.carried)
        if isinstance(phase, TieredPhase):
            self.tiers = TierRounds(self.grid, cfg, phase, self.base_config)
        arrays = array_record(phase.initial_state())
        start = 1
        saved = self.checkpoint.phase_state(index)
        if saved is not None:
            phase.restore(saved.arrays, saved.masks, saved.last)
            arrays = array_record(saved.arrays)
            load_strategy_state(strategy.base, saved.strategy)
            start = saved.round + 1
        for rnd in range(start, phase.rounds + 1):
            arrays = self.run_round(index, phase, rnd, arrays)

    def run_round(self, index: int, phase: Phase, rnd: int, arrays: ArrayRecord) -> ArrayRecord:
        cfg, strategy = self.cfg, self.strategy
        t_round = time.time()
        clipping_norm = current_clipping_norm(strategy.base)  # this round's (adaptive clipping moves it)
        screen = self.tiers if isinstance(phase, TieredPhase) else strategy  # what the row reads
        if screen is self.tiers:  # each node its tier's slice, architecture and plan
            messages, largest = self.tiers.configure_train(rnd, numpy_state(arrays))
            config = round_record(self.base_config, largest)
        else:
            config = round_record(self.base_config, phase.round_config(rnd))
            live = select(arrays, phase.live_keys(list(arrays.keys())))  # pruned ops stay home
            messages = list(strategy.configure_train(rnd, live, config, self.grid))
        bytes_sent = sum(_record_bytes(m) for m in messages)
        replies = sorted(send_and_receive(self.grid, messages, cfg.round_timeout), key=client_order)
        replies_in = time.time() - t_round
        bytes_received = sum(_record_bytes(m) for m in replies)
        client_seconds = _reply_metric(replies, "client-seconds")
        self.progress.nodes_seen.update(m.metadata.src_node_id for m in replies)
        t_server = time.time()
        if screen is self.tiers:
            aggregated = self.tiers.aggregate_train(rnd, numpy_state(arrays), replies)
        else:
            record, _ = strategy.aggregate_train(rnd, replies)
            aggregated = numpy_state(record) if record is not None else None
        if aggregated is not None:  # the live part aggregated; dead ops keep their last aggregate
            state = numpy_state(arrays) | aggregated
            metrics = phase.accept(rnd, state)
            arrays = array_record(state)
        else:
            metrics = {**phase.last, "tau": phase.plan(rnd).tau}
        server_seconds = time.time() - t_server
        self.progress.rejected_total += len(screen.rejected)
        if self.accountant is not None and (aggregated is not None if cfg.dp != "local" else _answered(replies)):
            self.accountant.release()  # local DP: every reply the server saw was a release
        norms, arch_norms = zip(*screen.update_norms, strict=False) if screen.update_norms else ((), ())
        elapsed, remaining = self.clock.tick()
        row = {
            "phase": phase.name,
            "round": rnd,
            **{k: v for k, v in metrics.items() if k != "genotype"},
            "lr-w": config.get("lr-w"),  # as sent this round
            "replies": len(replies),
            "bytes-sent": bytes_sent,  # the arrays' bytes to all of the round's clients (no framing)
            "bytes-received": bytes_received,
            "aggregated": aggregated is not None,
            "skipped-reason": screen.skipped_reason,  # None, "too few replies" or "error: ..."
            "rejected": len(screen.rejected),
            "rejected-reasons": screen.rejected,
            "alpha-screened": len(screen.alpha_screened),  # replies whose logits alpha-defence=norm-screen left out
            "round-s": time.time() - t_round,
            "client-s-max": max(client_seconds, default=0.0),
            "client-s-sum": sum(client_seconds),  # with round-s and server-s: the framework's share of the round
            "round-started-at": t_round,  # unix time: with the first client's start, where a run's time goes
            "first-client-start-s": min(_reply_metric(replies, "started-at"), default=t_round) - t_round,
            # when the last client finished and when the server had every reply: the gap is the
            # transport's and the pulls' wait (one clock in simulation; across machines, clock skew too)
            "last-client-end-s": _last_client_end(replies, t_round),
            "replies-in-s": replies_in,
            "client-steps-mean": _mean(_reply_metric(replies, "steps")),  # optimizer steps per client
            "client-images-mean": _mean(_reply_metric(replies, "images")),  # images through forward+backward per client
            "server-s": server_seconds,  # aggregation, masks, test-set evaluation
            "elapsed-s": elapsed,
            # L2 norms of the usable replies' updates (reply - global), before the server clips them
            # (client-side DP: after the client clipped): what a clipping norm is chosen from
            "update-norms": [round(n, 6) for n in norms],
            "update-norm-mean": _mean(list(norms)),
            "update-norm-max": max(norms, default=None),
            "update-norm-arch-mean": _mean(list(arch_norms)),
        }
        if self.accountant is not None:
            row["dp-clipping-norm"] = clipping_norm if clipping_norm is not None else cfg.dp_clipping_norm
            row["dp-epsilon"] = self.accountant.epsilon()  # spent so far at dp-delta; None = unbounded (no noise)
        self.recorder.log_round(row)
        if self.tensorboard is not None:
            self.tensorboard.log_round(row)
        self.progress.done.append((phase.name, rnd))
        if cfg.checkpoint:
            self.save(index, phase, rnd, arrays, elapsed)
        acc = metrics.get("accuracy", float("nan"))
        extra = f" supernet {metrics['supernet-accuracy']:.4f}" if "supernet-accuracy" in metrics else ""
        log(
            INFO,
            "[%s %d/%d] tau %.3f | test acc %.4f%s | elapsed %s | remaining ~%s%s",
            phase.name,
            rnd,
            phase.rounds,
            metrics.get("tau", 1.0),
            acc,
            extra,
            fmt_duration(elapsed),
            fmt_duration(remaining),
            f" | {len(screen.rejected)} replies rejected" if screen.rejected else "",
        )
        return arrays

    @staticmethod
    def compute_per_client_round(rows: list[dict[str, Any]]) -> dict[str, float | None]:
        """Mean optimizer steps and images per client per round over the whole run (all phases)."""
        steps = [r["client-steps-mean"] for r in rows if r.get("client-steps-mean") is not None]
        images = [r["client-images-mean"] for r in rows if r.get("client-images-mean") is not None]
        return {"steps_per_client_round": _mean(steps), "images_per_client_round": _mean(images)}

    def save(self, index: int, phase: Phase, rnd: int, arrays: ArrayRecord, elapsed: float) -> None:
        if self.accountant is not None:
            self.progress.dp_releases = self.accountant.releases
        state = strategy_state(self.strategy.base)
        self.checkpoint.save(self.progress, index, rnd, numpy_state(arrays), phase.masks, phase.last, state, elapsed)

    def personalize(self, final_net: torch.nn.Module, genotype: Genotype | None, rounds: int) -> list[dict[str, Any]]:
        """Every method's deployed network, adapted and scored the same way on every client."""
        if self.cfg.fraction_evaluate == 0:
            return []
        config = round_record(self.base_config, deployed_config(final_net, genotype))
        arrays = array_record(state_arrays(final_net))
        messages = self.strategy.configure_evaluate(rounds, arrays, config, self.grid)
        replies = send_and_receive(self.grid, messages, self.cfg.round_timeout)
        self.strategy.aggregate_evaluate(rounds, replies)
        return sorted(self.strategy.evaluate_replies, key=lambda m: m.get("partition-id", -1))


def run_experiment(grid: Grid, cfg: RunConfig) -> Path:
    """For each phase, for each round; then the deployed network's scores and the summary."""
    exp = Experiment(grid, cfg)
    progress = exp.progress
    t0 = time.time() - progress.elapsed_before
    for index, phase in enumerate(exp.phases):
        if index < progress.first_phase:
            continue  # finished before the resume: what it left is in the checkpoint
        exp.run_phase(index, phase)
        elapsed = time.time() - t0  # the phase's rounds: what it hands off is computed after
        progress.carried = progress.carried.then(phase.handoff(), elapsed)
    final_phase = exp.phases[-1]
    final_net = final_phase.final_network()
    final_eval = evaluate(final_net, exp.test, cfg.eval_batch_size, exp.device)
    train_end = time.time()
    genotype = progress.carried.genotype
    tiers = None
    if exp.tiers is not None:  # each tier's network, scored on its own clients, exported
        tiers = write_tier_results(exp.tiers, exp.test, exp.device, exp.recorder.dir, final_phase.rounds)
        clients = tiers[-1]["per_client"]
    else:
        clients = exp.personalize(final_net, genotype, final_phase.rounds)
    rows = exp.recorder.read_rounds()
    final_clipping_norm = current_clipping_norm(exp.strategy.base) if exp.strategy is not None else None
    summary = {
        **run_fields(cfg, len(progress.nodes_seen), [p.rounds for p in exp.phases]),
        **accuracy_fields(final_eval, progress.carried, clients, cfg),
        **exp.compute_per_client_round(rows),
        **time_fields(progress.carried, t0, train_end),
        "genotype": genotype.to_dict() if genotype else None,
        "params": count_parameters(final_net),
        "supernet_params": progress.carried.results.get("supernet_params"),
        # a tiered run's network is its largest tier's, costed against that tier's budget
        "cost": tiers[-1]["cost"] if tiers else cost_report(cfg, exp.space, image_hw(exp.test), final_net),
        **communication_fields(rows),
        "rejected_replies": progress.rejected_total,
        **privacy_fields(cfg, exp.accountant, final_clipping_norm),
        **skipped_rounds(rows),
        "resumed": exp.checkpoint.resumed,
        "tiers": tiers,
        "refused_nodes": {str(k): v for k, v in exp.tiers.refused.items()} if exp.tiers is not None else None,
        "seed": cfg.seed,
        "machine": machine_description(),
        "versions": package_versions(),
        "results_dir": str(exp.recorder.dir),
    }
    if genotype is not None:
        exp.recorder.write_genotype(genotype)
    exp.recorder.save_model(final_net, exp.space, genotype)
    exp.recorder.write_summary(summary)
    _after_run(exp.recorder.dir, final_net, exp.test, summary["cost"])
    log(
        INFO,
        "final test accuracy %.4f (supernet %s) | personalized %s",
        final_eval["accuracy"],
        summary["supernet_test_accuracy"],
        summary["personalized_accuracy"],
    )
    log(INFO, "Results written to %s", exp.recorder.dir)
    return exp.recorder.dir


def _after_run(results_dir: Path, final_net, test, cost: dict[str, Any]) -> None:
    """Device export and figures: extras that must never cost a run its numeric results."""
    for name, step in (("export", _export), ("figures", _figures)):
        try:
            step(results_dir, final_net, test, cost)
        except Exception as exc:  # reported, never fatal: summary.json is already written
            log(WARNING, "%s failed (numeric results are saved): %s: %s", name, type(exc).__name__, exc)
            (results_dir / f"{name}_error.txt").write_text(f"{type(exc).__name__}: {exc}\n")


def _export(results_dir: Path, final_net, test, cost: dict[str, Any]) -> None:
    from fedmetanas_core.deployment.export import export_model

    export_model(final_net, test, results_dir, extra={"cost": cost})


def _figures(results_dir: Path, final_net, test, cost: dict[str, Any]) -> None:
    from fedmetanas_core.report.figures import write_run_figures

    write_run_figures(results_dir)

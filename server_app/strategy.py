"""The server's aggregation: any Flower strategy, composed with the architecture-search safeguards.

``SearchStrategy`` wraps a Flower strategy (FedAvg, FedAdam, Krum, ... or a user's own class) and
adds, once for all of them: screening of faulty replies (errors, wrong names or shapes, NaN/Inf,
absurd norms), the alpha-aggregation rule, and a finite-check of the aggregate. The method's own
logic (temperature, masks, genotype) lives in ``fedmetanas_core.federation.coordinator`` and reaches the
clients through the ConfigRecord, so no strategy needs to know about it.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategies
from flwr.serverapp.strategy import Strategy

from fedmetanas_core.federation.coordinator import finite_state
from fedmetanas_core.method.aggregation import reply_problem, transform_logits
from fedmetanas_core.names import is_arch
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.threats.attacks import LOGIT_RULES, robust_logits, screen_replies
from fedmetanas_core.threats.privacy import update_norms
from flower_records import array_record, numpy_state, select

# dp modes whose noise the server adds (a Flower DP strategy wraps the base strategy)
DP_WRAPPED = ("server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
UNIT_WEIGHT = "dp-unit-weight"  # the metric every reply gets under DP: the base strategy averages uniformly

TOO_FEW_REPLIES = "too few replies"  # a round's skipped-reason; every other reason starts with "error: "

# run-config keys -> constructor arguments of Flower's strategies (passed where the class takes them)
STRATEGY_ARGUMENTS = {
    "proximal_mu": "proximal-mu",
    "server_learning_rate": "server-learning-rate",
    "server_momentum": "server-momentum",
    "eta": "eta",
    "eta_l": "eta-l",
    "beta_1": "beta-1",
    "beta_2": "beta-2",
    "tau": "tau",
    "beta": "trim-beta",
    "num_malicious_nodes": "num-malicious-nodes",
    "num_nodes_to_select": "num-nodes-to-select",
}


def strategy_class(name: str) -> type[Strategy]:
    """A Flower strategy by name, or a user's own class by import path 'package.module:ClassName'."""
    if ":" in name:
        module_name, class_name = name.split(":", 1)
        cls = getattr(importlib.import_module(module_name), class_name)
    else:
        cls = getattr(flwr_strategies, name)
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise TypeError(f"strategy '{name}' is not a flwr.serverapp.strategy.Strategy subclass")
    return cls


def check_strategy(cfg: RunConfig, app_dir: str | Path | None = None) -> None:
    """Up-front check that ``strategy`` imports, is a Strategy and accepts the run's settings.

    Raises ``ConfigError('strategy', ...)`` (one line, no traceback) instead of failing once the data
    is loaded. ``app_dir``: the Flower app directory, put on ``sys.path`` while importing, as the
    ServerApp has it (the CLI's own ``sys.path`` may not contain it).
    """
    added = app_dir is not None and str(app_dir) not in sys.path
    if added:
        sys.path.insert(0, str(app_dir))
    try:
        try:
            strategy_class(cfg.strategy)
        except ModuleNotFoundError as exc:
            raise ConfigError("strategy", cfg.strategy, f"cannot import module {exc.name!r}") from None
        except AttributeError:
            where = cfg.strategy.split(":", 1)[0] if ":" in cfg.strategy else "flwr.serverapp.strategy"
            raise ConfigError("strategy", cfg.strategy, f"{where} has no such class") from None
        except TypeError as exc:
            raise ConfigError("strategy", cfg.strategy, str(exc)) from None
        except Exception as exc:  # the user's module failed while importing
            raise ConfigError("strategy", cfg.strategy, f"importing it failed: {type(exc).__name__}: {exc}") from None
        try:
            build_base_strategy(cfg)
        except Exception as exc:  # e.g. a constructor that rejects the run's parameters
            raise ConfigError(
                "strategy", cfg.strategy, f"cannot be built from the run config: {type(exc).__name__}: {exc}"
            ) from None
    finally:
        if added:
            sys.path.remove(str(app_dir))


def alpha_defence_args(cfg: RunConfig) -> dict[str, Any]:
    """SearchStrategy's robust alpha aggregation, from the run config (search phases only)."""
    return {"alpha_defence": cfg.alpha_defence, "trim_beta": cfg.trim_beta, "screen_factor": cfg.alpha_screen_factor}


def build_base_strategy(cfg: RunConfig) -> Strategy:
    """A fresh strategy instance (one per phase: FedAdam's moments must not cross architectures)."""
    cls = strategy_class(cfg.strategy)
    accepted = inspect.signature(cls.__init__).parameters
    candidates = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate if cfg.fraction_evaluate > 0 else 1.0,
        "min_train_nodes": cfg.min_train_nodes,
        "min_evaluate_nodes": 1,
        "min_available_nodes": cfg.min_available_nodes,
        **{arg: cfg[key] for arg, key in STRATEGY_ARGUMENTS.items()},
    }
    if cfg.dp in DP_WRAPPED:  # Flower's noise (z*C/m) is calibrated for the uniform mean of m clipped updates
        candidates["weighted_by_key"] = UNIT_WEIGHT
    return cls(**{k: v for k, v in candidates.items() if k in accepted})


# What a Flower strategy learns during a phase (flwr 1.42, flwr.serverapp.strategy); all else it
# holds is built from the run config. FedAdam, FedYogi and FedAdagrad subclass FedOpt (FedOpt's
# current_arrays is set again by every configure_train); FedAvgM sets current_arrays only once, then
# from its own aggregates. FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan learn nothing.
STRATEGY_STATE: dict[type, tuple[str, ...]] = {
    flwr_strategies.fedopt.FedOpt: ("m_t", "v_t"),
    flwr_strategies.FedAvgM: ("momentum_vector", "current_arrays"),
}


def strategy_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's learned state for the checkpoint, as tensors and plain data (it loads with
    ``weights_only=True``). A user's class with state provides ``state_dict()`` and
    ``load_state_dict(state)`` returning / taking such data; without them it is saved as stateless."""
    if hasattr(strategy, "state_dict"):
        return strategy.state_dict()
    if _is_dp_wrapper(strategy):  # the adaptive norm, and what the wrapped strategy learned
        return {"dp-clipping-norm": float(strategy.clipping_norm), "dp-inner": strategy_state(strategy.strategy)}
    names = next((n for cls, n in STRATEGY_STATE.items() if isinstance(strategy, cls)), ())
    state = {}
    for name in names:
        value = getattr(strategy, name, None)
        if isinstance(value, ArrayRecord):
            value = numpy_state(value)
        state[name] = _to_tensors(value)
    return state


def load_strategy_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Inverse of ``strategy_state``: numpy arrays again, where Flower's strategies keep them."""
    if hasattr(strategy, "load_state_dict"):
        strategy.load_state_dict(state)
        return
    if _is_dp_wrapper(strategy):
        strategy.clipping_norm = float(state["dp-clipping-norm"])
        load_strategy_state(strategy.strategy, state["dp-inner"])
        return
    for name, value in state.items():
        value = _to_numpy(value)
        if name == "current_arrays" and isinstance(strategy, flwr_strategies.FedAvgM) and value is not None:
            value = array_record(value)
        setattr(strategy, name, value)


def restrict_strategy_state(strategy: Strategy, keys: list[str]) -> None:
    """Keep only ``keys`` (in this order) in what the strategy learned per array: with live transfer
    the arrays a round carries shrink as masks drop ops, and FedOpt's moments and FedAvgM's arrays and
    momentum would no longer match the replies. A user's class with per-array state provides
    ``restrict_to(keys)``."""
    if hasattr(strategy, "restrict_to"):
        strategy.restrict_to(keys)
        return
    if _is_dp_wrapper(strategy):  # the wrapper keeps only this round's arrays; the strategy it wraps may learn
        restrict_strategy_state(strategy.strategy, keys)
        return
    if isinstance(strategy, flwr_strategies.fedopt.FedOpt):
        for name in ("m_t", "v_t"):
            moments = getattr(strategy, name, None)
            if moments:
                setattr(strategy, name, {k: moments[k] for k in keys if k in moments})
    if isinstance(strategy, flwr_strategies.FedAvgM) and strategy.current_arrays is not None:
        old = list(strategy.current_arrays.keys())
        if old != keys:
            index = {k: i for i, k in enumerate(old)}
            if strategy.momentum_vector is not None:  # a list in current_arrays' order
                strategy.momentum_vector = [strategy.momentum_vector[index[k]] for k in keys]
            strategy.current_arrays = select(strategy.current_arrays, keys)


def _is_dp_wrapper(strategy: Strategy) -> bool:
    from .privacy import is_dp_wrapper

    return is_dp_wrapper(strategy)


def _to_tensors(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_tensors(v) for v in value]
    return value


def _to_numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    return value


class SearchStrategy(Strategy):
    """Delegates sampling and aggregation to ``base``; never lets a faulty reply reach the model."""

    def __init__(
        self,
        base: Strategy,
        alpha_aggregation: str = "logits",
        min_replies: int = 1,
        alpha_defence: str = "none",
        trim_beta: float = 0.2,
        screen_factor: float = 3.0,
    ):
        self.base = base
        self.dp = _is_dp_wrapper(base)  # replies get unit weights, the reference's key order, a full count
        self.update_norms: list[tuple[float, float]] = []  # (all arrays, logits only) per usable reply, last round
        self.alpha_aggregation = alpha_aggregation
        self.min_replies = min_replies
        self.alpha_defence, self.trim_beta, self.screen_factor = alpha_defence, trim_beta, screen_factor
        self.alpha_screened: list[
            str
        ] = []  # replies the screen left out (their logits, or all of them), last train round
        self._reference: dict[str, np.ndarray] | None = None
        self.rejected: list[str] = []  # reasons, for the last train round
        # why the last train round was skipped: None (aggregated), TOO_FEW_REPLIES or "error: ..."
        self.skipped_reason: str | None = None
        self.evaluate_replies: list[dict] = []  # per-client metrics of the last evaluate round

    def summary(self) -> None:
        log(
            INFO,
            "\t├──> SearchStrategy around %s (alpha aggregation: %s, alpha defence: %s)",
            type(self.base).__name__,
            self.alpha_aggregation,
            self.alpha_defence,
        )
        self.base.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.set_reference(arrays)
        restrict_strategy_state(self.base, list(arrays.keys()))
        messages = self.base.configure_train(server_round, arrays, config, grid)
        if self.dp and hasattr(self.base, "current_arrays") and self.alpha_aggregation != "logits":
            # server-side clipping measures reply - global on what is averaged: the transformed logits
            self.base.current_arrays = array_record(transform_logits(self._reference, self.alpha_aggregation))
        return messages

    def set_reference(self, arrays: ArrayRecord) -> None:
        """The global model replies are screened against (names, shapes, dtypes, norm)."""
        self._reference = numpy_state(arrays)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good: list[Message] = []
        self.rejected = []
        self.alpha_screened = []
        self.skipped_reason = None

        def reject(msg: Message, reason: str) -> None:
            node = msg.metadata.src_node_id
            self.rejected.append(f"node {node}: {reason}")
            log(WARNING, "round %s: reply from node %s excluded from aggregation: %s", server_round, node, reason)

        for msg in replies:
            try:
                reason = self._problem(msg)
            except Exception as exc:  # a reply the screen cannot even read is a faulty reply
                reason = f"unreadable reply: {type(exc).__name__}: {exc}"
            if reason:
                reject(msg, reason)
                continue
            good.append(msg)
        # Flower's strategies refuse the whole round when metric keys differ between replies:
        # keep the replies with the most common key set, so one odd client cannot block a round.
        keysets = [frozenset(m.content["metrics"].keys()) for m in good]
        if len(set(keysets)) > 1:
            common = Counter(keysets).most_common(1)[0][0]
            for msg, keys in zip(list(good), keysets, strict=False):
                if keys != common:
                    reject(msg, f"metric keys {sorted(keys)} differ from the other replies' {sorted(common)}")
                    good.remove(msg)
        self.update_norms = []
        for msg in good:
            state = numpy_state(msg.content["arrays"])
            self.update_norms.append(update_norms(state, self._reference or state, is_arch))
        if self.alpha_defence == "update-screen":
            for i in sorted(screen_replies(self.update_norms, self.screen_factor), reverse=True):
                self.alpha_screened.insert(0, f"node {good.pop(i).metadata.src_node_id}")
            if self.alpha_screened:
                log(
                    INFO,
                    "round %s: update screen left out the replies of %s",
                    server_round,
                    ", ".join(self.alpha_screened),
                )
        if self.dp:
            for msg in good:  # Flower's clipping pairs arrays by position: put them in the sent order
                arrays = msg.content["arrays"]
                msg.content["arrays"] = select(arrays, [k for k in (self._reference or arrays) if k in arrays])
                msg.content["metrics"][UNIT_WEIGHT] = 1
        if self.alpha_aggregation != "logits":
            for msg in good:
                state = numpy_state(msg.content["arrays"])
                msg.content["arrays"] = array_record(transform_logits(state, self.alpha_aggregation))
        if len(good) < self.min_replies:
            log(
                WARNING,
                "round %s: only %s usable replies (< %s): round skipped, global model unchanged",
                server_round,
                len(good),
                self.min_replies,
            )
            self.skipped_reason = TOO_FEW_REPLIES
            return None, None
        expected = getattr(self.base, "num_sampled_clients", None) if self.dp else None
        if expected is not None and len(good) != expected:
            # the noise is calibrated for the mean of exactly that many clipped updates
            log(
                WARNING,
                "round %s: %s usable replies, DP noise is calibrated for %s: round skipped",
                server_round,
                len(good),
                expected,
            )
            self.skipped_reason = f"error: dp: {len(good)} usable replies, the noise is calibrated for {expected}"
            return None, None
        # the replies' logits and weights, read before the base strategy runs (FedMedian and
        # FedTrimmedAvg pop the arrays out of the replies)
        defended = self._arch_replies(good) if self.alpha_defence in LOGIT_RULES else None
        try:
            arrays, metrics = self.base.aggregate_train(server_round, good)
        except Exception as exc:  # e.g. a robust strategy that cannot aggregate this many replies
            log(
                WARNING,
                "round %s: aggregation failed (%s: %s): round skipped, global model unchanged",
                server_round,
                type(exc).__name__,
                exc,
            )
            self.skipped_reason = f"error: {type(exc).__name__}: {short_reason(str(exc))}"
            return None, None
        if arrays is None:
            log(
                WARNING,
                "round %s: %s returned no aggregate: round skipped, global model unchanged",
                server_round,
                type(self.base).__name__,
            )
            self.skipped_reason = f"error: {type(self.base).__name__} returned no aggregate"
        elif not finite_state(numpy_state(arrays)):
            log(WARNING, "round %s: aggregate is not finite: round skipped, global model unchanged", server_round)
            self.skipped_reason = "error: aggregate is not finite"
            return None, metrics
        if arrays is not None and defended is not None:
            arrays = self._defend_alphas(server_round, defended, arrays)
        return arrays, metrics

    @staticmethod
    def _arch_replies(good: list[Message]) -> list[tuple[int, dict[str, np.ndarray], float]]:
        """(node id, architecture logits, num-examples) of each usable reply."""
        return [
            (
                m.metadata.src_node_id,
                numpy_state(m.content["arrays"], filter(is_arch, m.content["arrays"].keys())),
                float(m.content["metrics"]["num-examples"]),
            )
            for m in good
        ]

    def _defend_alphas(
        self, server_round: int, replies: list[tuple[int, dict[str, np.ndarray], float]], arrays: ArrayRecord
    ) -> ArrayRecord:
        """Replace the base strategy's architecture logits by the robust per-element aggregate
        (``alpha-defence``): the weights stay the base strategy's, whichever it is."""
        states = [state for _, state, _ in replies]
        weights = [n for _, _, n in replies]
        reference = transform_logits(self._reference or states[0], self.alpha_aggregation)
        logits, dropped = robust_logits(
            states, weights, reference, self.alpha_defence, self.trim_beta, self.screen_factor
        )
        for i in dropped:
            self.alpha_screened.append(f"node {replies[i][0]}")
        if dropped:
            log(
                INFO,
                "round %s: alpha norm screen left out the logits of %s",
                server_round,
                ", ".join(self.alpha_screened),
            )
        out = numpy_state(arrays)
        out.update(logits)
        return array_record(out)

    def _problem(self, msg: Message) -> str | None:
        return reply_issue(msg, self._reference)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.base.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        ok = [m for m in replies if not m.has_error() and "metrics" in m.content.metric_records]
        self.evaluate_replies = [dict(m.content["metrics"]) for m in ok]
        if not ok:
            return None
        if self.dp:  # the base strategy averages by the unit weight under DP (build_base_strategy)
            for m in ok:
                m.content["metrics"][UNIT_WEIGHT] = 1
        try:
            return self.base.aggregate_evaluate(server_round, ok)
        except Exception as exc:  # inconsistent evaluate replies must not end a finished search
            log(WARNING, "round %s: evaluate aggregation failed: %s", server_round, exc)
            return None


def reply_issue(msg: Message, reference: dict[str, np.ndarray] | None) -> str | None:
    """Why a train reply must not reach the model (error, wrong records, names, shapes, dtypes,
    NaN/Inf, absurd norm against ``reference``), or None."""
    if msg.has_error():
        return f"client error: {short_reason(msg.error.reason)}"
    content = msg.content
    if len(content.array_records) != 1 or "arrays" not in content.array_records:
        return "reply must carry exactly one ArrayRecord named 'arrays'"
    if len(content.metric_records) != 1 or "metrics" not in content.metric_records:
        return "reply must carry exactly one MetricRecord named 'metrics'"
    metrics = content.metric_records["metrics"]
    if "num-examples" not in metrics:
        return "reply lacks 'num-examples' in its MetricRecord 'metrics'"
    n = metrics["num-examples"]
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not np.isfinite(n) or n <= 0:
        return f"bad num-examples {n!r}"
    try:
        state = numpy_state(content["arrays"])
    except Exception as exc:  # an undecodable array is a faulty reply, not a server crash
        return f"undecodable arrays: {exc}"
    reference = reference or state
    for key, value in state.items():
        if value.dtype.kind not in "fiu" or (key in reference and value.dtype.kind != reference[key].dtype.kind):
            return f"wrong dtype for {key}: {value.dtype}"
    return reply_problem(state, reference)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def short_reason(reason: str | None, limit: int = 300) -> str:
    """The gist of a client's error: Flower's simulation wraps it in a whole remote traceback."""
    text = _ANSI.sub("", reason or "").strip()
    text = text[:-2] if text.endswith("'>") else text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "no reason given"
    match = re.search(r"occurred\. Message: (.*)$", last)
    last = match.group(1) if match and match.group(1) else last
    return last if len(last) <= limit else last[: limit - 3] + "..."

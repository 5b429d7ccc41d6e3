"""The run-config key table: every key, its type, default, allowed values and meaning.

The Flower app declares the same keys in ``pyproject.toml`` and docs/configuration.md lists them; both are
generated from ``KEYS`` here (``python -m fedmetanas_core.run.config [--toml]``), and tests keep them
in step. ``fedmetanas_core.run.config`` validates a run's values against this table.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..names import COST_KINDS, KNOWN_OPS, NORMS, PRIMITIVES
from ..threats.attacks import ALPHA_DEFENCES, ATTACKS, parse_attack_clients
from ..threats.privacy import DP_MODES

METHODS = ("fedmetanas", "fednas", "fedavg")  # the one list of methods: add a new method's name here
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "hf")
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
CORRUPT_IMAGE_POLICIES = ("fail", "skip")
BUDGET_PENALTIES = ("target", "hinge")
STRATEGIES = (
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "FedMedian",
    "FedTrimmedAvg",
    "Krum",
    "MultiKrum",
    "Bulyan",
)


class ConfigError(ValueError):
    """A config value that is not allowed; the one-line message names key, value and what is allowed.

    ``source`` is ``run-config`` or ``node-config`` (a SuperNode's ``--node-config``).
    """

    def __init__(self, key: str, value: Any, allowed: str, source: str = "run-config"):
        self.key, self.value, self.allowed, self.source = key, value, allowed, source
        super().__init__(f"{source} '{key}' = {value!r} is invalid: {allowed}")

    def __reduce__(self):  # picklable (Ray ships exceptions between processes)
        return (type(self), (self.key, self.value, self.allowed, self.source))


@dataclass(frozen=True)
class Key:
    name: str
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns an error text, or None when fine
    group: str = "run"
    normalize: Callable[[Any], Any] | None = None  # the canonical form of a value, before the check

    @property
    def type(self) -> type:
        return type(self.default)


def _choice(options: Iterable[str]) -> Callable[[Any], str | None]:
    options = tuple(options)
    return lambda v: None if v in options else f"must be one of {', '.join(map(str, options))}"


def _method(v: Any) -> str | None:
    """Reads ``METHODS`` when called, not at import: the list is the single place a method is added."""
    return _choice(METHODS)(v)


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be > 0"


def _unit_open(v: Any) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _unit(v: Any) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _fraction_below_one(v: Any) -> str | None:
    return None if 0 < v < 1 else "must be in (0, 1)"


def _below_half(v: Any) -> str | None:
    return None if 0 <= v < 0.5 else "must be in [0, 0.5) (the fraction cut at each end)"


def _cell_indices(v: str) -> str | None:
    parts = [p.strip() for p in v.split(",")] if v.strip() else []
    if not all(p.isdigit() for p in parts):
        return "must be comma-separated cell indices (0, 1, ...), or empty for DARTS's rule"
    if len(set(parts)) != len(parts):
        return "cell indices must not repeat"
    return None


def _primitives(v: str) -> str | None:
    names = [p.strip() for p in v.split(",") if p.strip()]
    unknown = [p for p in names if p not in KNOWN_OPS]
    if unknown:
        return f"unknown op(s) {', '.join(unknown)}; allowed: {', '.join(KNOWN_OPS)}"
    if len(set(names)) != len(names):
        return "ops must not repeat"
    if not [p for p in names if p != "none"]:
        return "needs at least one op other than 'none'"
    return None


def parse_budget(text: str) -> tuple[str, float] | None:
    """``"macs:2e5"`` -> ("macs", 200000.0); "" -> None; anything else raises ValueError saying why."""
    text = text.strip()
    if not text:
        return None
    kind, sep, value = text.partition(":")
    kind = kind.strip()
    if not sep:
        raise ValueError(f"expected KIND:LIMIT with KIND one of {', '.join(COST_KINDS)}, e.g. macs:200000")
    if kind not in COST_KINDS:
        raise ValueError(f"unknown budget kind {kind!r}; one of {', '.join(COST_KINDS)}")
    try:
        limit = float(value)
    except ValueError:
        raise ValueError(f"limit {value.strip()!r} is not a number") from None
    if not math.isfinite(limit) or limit <= 0:
        raise ValueError("the limit must be a finite number > 0")
    return kind, limit


def _parsed_by(parse: Callable[[str], Any]) -> Callable[[str], str | None]:
    """A key's check: the value parses, else the parser's reason."""

    def check(v: str) -> str | None:
        try:
            parse(v)
        except ValueError as exc:
            return str(exc)
        return None

    return check


_budget = _parsed_by(parse_budget)


TIER_KINDS = ("macs", "params")  # counted: a latency table holds one width, device tiers have several


def parse_tier_budgets(text: str) -> list[tuple[str, float]]:
    """``tiers``: "macs:20000,macs:160000" -> budgets by increasing limit; '' -> []; else ValueError."""
    parsed = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        budget = parse_budget(item)
        if budget[0] not in TIER_KINDS:
            raise ValueError(f"{item!r}: tiers limit {' or '.join(TIER_KINDS)} (a latency table holds one width)")
        parsed.append(budget)
    if len({k for k, _ in parsed}) > 1:
        raise ValueError("every tier must limit the same kind")
    if len({limit for _, limit in parsed}) != len(parsed):
        raise ValueError("tier budgets must differ")
    if len(parsed) == 1:
        raise ValueError("one tier is the run's budget: set budget instead, or give two or more")
    return sorted(parsed, key=lambda b: b[1])


def parse_latency_tables(text: str) -> list[str]:
    """``latency-table``'s paths: one table, or several (comma-separated, one per width) to size the space."""
    return [path.strip() for path in text.split(",") if path.strip()]


def parse_tier_shares(text: str, num_tiers: int) -> list[float]:
    """``tier-shares`` as fractions summing to 1 ('' = equal shares); ValueError saying why."""
    if not text.strip():
        return [1.0 / num_tiers] * num_tiers
    try:
        shares = [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError("expected comma-separated numbers, one per tier") from None
    if len(shares) != num_tiers or not all(0 < s < math.inf for s in shares):
        raise ValueError(f"expected {num_tiers} numbers > 0, one per tier")
    return [s / sum(shares) for s in shares]


_tiers = _parsed_by(parse_tier_budgets)


def _attack_clients(v: str) -> str | None:
    try:
        parse_attack_clients(v)
    except ValueError as exc:
        return f'{exc}; expected comma-separated partition ids such as "0,1"'
    return None


def _canonical_strategy(v: str) -> str:
    """Flower's spelling of a built-in strategy name in any case ('krum' -> 'Krum'); import paths
    are Python names and stay as given."""
    if ":" in v:
        return v
    return {name.lower(): name for name in STRATEGIES}.get(v.strip().lower(), v)


def _strategy(v: str) -> str | None:
    if v in STRATEGIES or (":" in v and all(v.split(":", 1))):
        return None
    return f"must be one of {', '.join(STRATEGIES)} or an import path 'package.module:ClassName'"


KEYS: tuple[Key, ...] = (
    # --- run
    Key(
        "method",
        "fedmetanas",
        "fedmetanas | fednas (search + FedAvg retraining) | fedavg (fixed architecture)",
        _method,
    ),
    Key("num-server-rounds", 20, "federated rounds (FedNAS: search rounds)", _at_least(1)),
    Key("seed", 0, "global seed: partitions, init, Gumbel noise, task sampling", _at_least(0)),
    Key("deterministic", False, "use deterministic torch algorithms (CPU runs repeat exactly)"),
    Key("device", "auto", "auto (CUDA when present) | cpu | cuda", _choice(("auto", "cpu", "cuda"))),
    Key(
        "fast-path",
        True,
        "fast supernet path (same results within float rounding); false = the plain eager reference path",
    ),
    Key(
        "torch-threads",
        0,
        "torch threads per client process; 0 = one per simulated client when clients share cores",
        _at_least(0),
    ),
    Key("fraction-train", 1.0, "fraction of nodes sampled for training each round", _unit_open),
    Key("fraction-evaluate", 1.0, "fraction of nodes sampled for local evaluation each round (0 = off)", _unit),
    Key("min-available-nodes", 2, "wait for this many nodes before a round starts", _at_least(1)),
    Key("min-train-nodes", 2, "fewest training replies a round may be aggregated from", _at_least(1)),
    Key("round-timeout", 3600.0, "seconds to wait for a round's replies", _positive),
    Key("results-dir", "", "where outputs go; '' = ./results/<method>-<dataset>-<time> (made absolute)"),
    Key("resume", False, "continue the run whose checkpoint is in results-dir (same config required)"),
    Key("tensorboard", False, "also log per-round scalars to <results-dir>/tensorboard (pip install tensorboard)"),
    Key("checkpoint", True, "write checkpoint.pt atomically after every round"),
    Key(
        "strategy",
        "FedAvg",
        "server aggregation: a Flower strategy name (any case) or 'package.module:ClassName'",
        _strategy,
        normalize=_canonical_strategy,
    ),
    Key(
        "transfer",
        "live",
        "live | full: once the server's masks drop an op, its weights are neither sent nor returned (live) or "
        "still travel (full)",
        _choice(("live", "full")),
    ),
    # --- data
    Key(
        "dataset",
        "digits",
        "digits | mnist | fashion-mnist | cifar10 | cifar100 | imagefolder | hf",
        _choice(DATASETS),
        "data",
    ),
    Key(
        "data-dir",
        "",
        "dataset folder (downloads go here; imagefolder: has train/ and test/); '' = ./data",
        None,
        "data",
    ),
    Key("hf-dataset", "", "Hugging Face dataset for dataset = hf (hub name or 'imagefolder:/abs/dir')", None, "data"),
    Key("num-partitions", 0, "partitions when partitioning by id; 0 = the node's num-partitions", _at_least(0), "data"),
    Key(
        "partitioner",
        "dirichlet",
        "iid | dirichlet | pathological | shard (flwr-datasets)",
        _choice(PARTITIONERS),
        "data",
    ),
    Key("dirichlet-alpha", 0.5, "Dirichlet concentration over labels (smaller = more non-IID)", _positive, "data"),
    Key("classes-per-client", 2, "pathological partitioner: classes per client", _at_least(1), "data"),
    Key("shards-per-client", 2, "shard partitioner: shards per client", _at_least(1), "data"),
    Key("min-partition-size", 10, "smallest allowed partition (Dirichlet retries to meet it)", _at_least(3), "data"),
    Key(
        "query-source",
        "train",
        "FedMetaNAS meta-step query batches: query-split (held-out, DARTS-style validation) | train (further "
        "train-split minibatches, disjoint from the support batch, as MAML in FL: every training example then "
        "trains the weights)",
        _choice(("query-split", "train")),
        "meta",
    ),
    Key(
        "query-fraction",
        0.2,
        "share of a client's partition used as MAML query / FedNAS alpha-validation split",
        _fraction_below_one,
        "data",
    ),
    Key(
        "local-test-fraction",
        0.2,
        "share of a client's partition held out as its local test split",
        _fraction_below_one,
        "data",
    ),
    Key("image-size", 0, "resize images to this square size once at load; 0 = native", _at_least(0), "data"),
    Key("train-subset", 0, "use this many training examples (0 = all)", _at_least(0), "data"),
    Key("test-subset", 0, "use this many global test examples (0 = all)", _at_least(0), "data"),
    Key(
        "eval-split",
        "test",
        "test | validation: what the server evaluates every round; validation = the union of the clients' local "
        "test splits, carved from the training data (for tuning: never the test set; needs num-partitions)",
        _choice(("test", "validation")),
        "data",
    ),
    Key(
        "on-corrupt-image",
        "fail",
        "fail | skip: what to do with an unreadable image file",
        _choice(CORRUPT_IMAGE_POLICIES),
        "data",
    ),
    Key("batch-size", 64, "support / query / training batch size", _at_least(2), "data"),
    Key("eval-batch-size", 512, "evaluation batch size (>1: BatchNorm uses batch statistics)", _at_least(2), "data"),
    # --- search space
    Key("num-cells", 2, "cells in the supernet (which reduce: reduction-cells)", _at_least(1), "space"),
    Key("num-nodes", 2, "intermediate nodes per cell", _at_least(1), "space"),
    Key(
        "init-channels",
        8,
        "channels of the first cell; 0 = sized to the budget (the widest space whose expected cost under uniform "
        "op and pair probabilities fits it; with a latency budget, among the latency tables' widths)",
        _at_least(0),
        "space",
    ),
    Key(
        "reduction-cells",
        "",
        "comma-separated indices (from 0) of the cells that halve the resolution; empty = DARTS's rule "
        "(at 1/3 and 2/3 of the depth; the last cell of 2)",
        _cell_indices,
        "space",
    ),
    Key("stem-multiplier", 3, "stem output channels = stem-multiplier x init-channels", _at_least(1), "space"),
    Key(
        "norm",
        "batch",
        "batch | group: the normalisation in every op, stem and CNN (stateless, no affine parameters); batch = "
        "BatchNorm on batch statistics (DARTS's); group = GroupNorm with one group, per image (independent of a "
        "non-IID client's class mix in a batch)",
        _choice(NORMS),
        "space",
    ),
    Key(
        "search-norm",
        "",
        'the supernet\'s normalisation while the cell is undecided (search phases; "" = norm): batch | group. '
        'With norm="group" search-norm="batch" the search starts on batch statistics and the derived network '
        "(trained from the round its cell is decided, deployed) normalises per image",
        lambda v: None if v in ("", *NORMS) else f'must be "" (the same as norm) or one of {", ".join(NORMS)}',
        "space",
    ),
    Key(
        "primitives",
        ",".join(PRIMITIVES),
        "comma-separated op set: DARTS's (the default), conv_3x3 (a full 3x3 convolution) may be added",
        _primitives,
        "space",
    ),
    Key(
        "input-pruning",
        True,
        "pairwise input-node weights (beta) per node; off = every edge feeds its node",
        None,
        "space",
    ),
    # --- cost budget (fedmetanas_core/method/budget.py)
    Key(
        "budget",
        "",
        "'' = none; KIND:LIMIT limits the derived network, KIND macs | params | latency-ms (needs latency-table), "
        'e.g. "macs:200000"; the expected cost enters the architecture loss (every method\'s search) and '
        "derivation keeps the most likely cell within it",
        _budget,
        "budget",
    ),
    Key("budget-weight", 1.0, "weight of the cost term in the architecture loss", _positive, "budget"),
    Key(
        "budget-penalty",
        "target",
        "target: weight x |E[cost] / limit - 1| (spend the budget, TuNAS) | "
        "hinge: weight x max(0, E[cost] / limit - 1)",
        _choice(BUDGET_PENALTIES),
        "budget",
    ),
    Key(
        "latency-table",
        "",
        "a latency table from `fedmetanas profile`, measured on the device, for budget = latency-ms:...; "
        "several, comma-separated, measured at different init-channels: init-channels = 0 picks the width",
        None,
        "budget",
    ),
    # --- device tiers (fedmetanas_core/method/tiers.py, fedmetanas_core/federation/tiered.py)
    Key(
        "tiers",
        "",
        "'' = one network; comma-separated budgets of one kind (macs | params), e.g. \"macs:20000,macs:160000\": "
        "one search, one network per budget, weights shared (a narrower tier trains a slice), architecture per "
        "tier; a client searches for the largest budget within its node config's budget-macs / budget-params",
        _tiers,
        "budget",
    ),
    Key(
        "tier-shares",
        "",
        "with tiers, in simulation: the share of partitions in each tier (assigned by seed); '' = equal; a node "
        "config's budget-macs / budget-params overrides it",
        None,
        "budget",
    ),
    Key(
        "train-smaller-tiers",
        True,
        "with tiers: a node also trains every smaller tier's network (a slice of its own: the sandwich rule of "
        "slimmable networks) on its data, their architecture frozen, so a small tier's weights are trained as a "
        "network of their own by every client that can run them; off = each client trains only its tier (HeteroFL)",
        None,
        "budget",
    ),
    Key(
        "tier-distill",
        0.0,
        "with tiers and train-smaller-tiers: a node trains its own tier's network on targets mixed from its labels "
        "and the next smaller tier's deployed network's probabilities, this much of the latter (knowledge "
        "distillation across tiers: the smaller network is trained by every client); 0 = off",
        _unit,
        "budget",
    ),
    Key(
        "only-tier",
        -1,
        "with tiers: search for this tier only (index from 0, smallest first), on its clients only (the others "
        "take no part): a separate run per tier; -1 = every tier",
        _at_least(-1),
        "budget",
    ),
    # --- relaxation and soft pruning
    Key(
        "relax-mode",
        "gumbel-soft",
        "gumbel-soft | softmax | gumbel-hard (straight-through, runs only the sampled op)",
        _choice(("gumbel-soft", "softmax", "gumbel-hard")),
        "relaxation",
    ),
    Key("tau-max", 1.0, "temperature of the first round", _positive, "relaxation"),
    Key("tau-min", 0.1, "temperature of the last round (> 0)", _positive, "relaxation"),
    Key(
        "tau-schedule",
        "linear",
        "linear | exponential | cosine annealing over rounds",
        _choice(("linear", "exponential", "cosine")),
        "relaxation",
    ),
    Key(
        "eval-mode",
        "softmax",
        "supernet evaluation: softmax at the round's temperature without noise | argmax",
        _choice(("softmax", "argmax")),
        "relaxation",
    ),
    Key(
        "prune-threshold",
        0.01,
        "ops / input pairs with relaxed weight <= this are skipped in forward passes",
        _unit,
        "relaxation",
    ),
    Key(
        "mask-threshold",
        0.01,
        "server masks ops whose aggregated probability at tau-min is below this (0 = never)",
        _unit,
        "relaxation",
    ),
    Key("mask-start-round", 2, "first round after which permanent masks may grow", _at_least(1), "relaxation"),
    Key(
        "discrete-round",
        4,
        "FedMetaNAS: the round by which tau reaches tau-min and soft pruning leaves one op per edge and one input "
        "pair per node; later rounds train the discrete cell (past num-server-rounds: the last round; 0 = never "
        "force: threshold masks only, tau anneals over all rounds)",
        _at_least(0),
        "relaxation",
    ),
    Key(
        "alpha-aggregation",
        "logits",
        "logits | centered | log-softmax: how architecture logits are averaged",
        _choice(("logits", "centered", "log-softmax")),
        "relaxation",
    ),
    # --- meta learning (FedMetaNAS)
    Key("meta-learner", "fomaml", "fomaml | reptile", _choice(("fomaml", "reptile")), "meta"),
    Key("maml-order", 1, "1 = first-order MAML (paper), 2 = exact second order", _choice((1, 2)), "meta"),
    Key("inner-steps", 1, "task-learner steps K on each support batch", _at_least(1), "meta"),
    Key(
        "inner-lr-w",
        0.0269,
        "task-learner step size for weights (well below outer-lr-w: the meta objective is the loss after this "
        "step, and the global model is deployed as it is)",
        _positive,
        "meta",
    ),
    Key("inner-lr-alpha", 0.05, "task-learner step size for alphas/betas", _positive, "meta"),
    Key("tasks-per-meta-batch", 1, "tasks (support, query pairs) per meta step", _at_least(1), "meta"),
    Key("local-meta-iters", 12, "meta steps per client per round", _at_least(1), "meta"),
    Key("warmup-rounds", 1, "rounds with alphas frozen at tau-max", _at_least(0), "meta"),
    Key("reptile-lr-w", 1.0, "Reptile meta step size for weights", _positive, "meta"),
    Key("reptile-lr-alpha", 0.6, "Reptile meta step size for alphas", _positive, "meta"),
    # --- optimisers (all methods)
    Key("outer-lr-w", 0.0884, "meta / local optimiser learning rate for weights (SGD, momentum)", _positive, "optim"),
    Key(
        "lr-schedule",
        "constant",
        "constant | cosine: the weights' learning rate over each stage's rounds (FedMetaNAS's run, FedNAS's search "
        "and retraining, FedAvg's run), from outer-lr-w down to lr-min in the last round; sent by the server every "
        "round",
        _choice(("constant", "cosine")),
        "optim",
    ),
    Key(
        "lr-min",
        0.0,
        "the weights' learning rate in a stage's last round with lr-schedule = cosine",
        _at_least(0),
        "optim",
    ),
    Key("momentum", 0.9, "SGD momentum for weights", _unit, "optim"),
    Key("weight-decay", 3e-4, "weight decay for weights", _at_least(0), "optim"),
    Key("outer-lr-alpha", 0.059, "Adam learning rate for alphas/betas", _positive, "optim"),
    Key(
        "alpha-weight-decay",
        0.0,
        "Adam weight decay for alphas/betas (coupled L2: once alpha gradients vanish near tau-min it pulls every "
        "logit to 0 and erases the architecture)",
        _at_least(0),
        "optim",
    ),
    Key("grad-clip", 5.0, "gradient-norm clip for weights (0 = off)", _at_least(0), "optim"),
    Key(
        "personalize-steps",
        5,
        "local SGD steps on the deployed network in the personalization evaluation (every method)",
        _at_least(0),
        "optim",
    ),
    Key(
        "personalize-lr",
        0.05,
        "step size of those personalization steps (the same protocol for every method)",
        _positive,
        "optim",
    ),
    # --- baselines
    Key("local-epochs", 1, "FedNAS / FedAvg: local epochs per round", _at_least(1), "baselines"),
    Key(
        "retrain-rounds",
        10,
        "FedNAS: FedAvg rounds retraining the derived network from scratch",
        _at_least(0),
        "baselines",
    ),
    Key("retrain-local-epochs", 1, "FedNAS: local epochs per retraining round", _at_least(1), "baselines"),
    Key(
        "fedavg-genotype",
        "",
        "FedAvg: genotype.yaml of a fixed architecture; '' = a standard small CNN",
        None,
        "baselines",
    ),
    Key(
        "fedavg-channels",
        0,
        "FedAvg small CNN: channels of its first conv (then x2, x4); 0 = stem-multiplier x init-channels",
        _at_least(0),
        "baselines",
    ),
    # --- strategy parameters (used by the strategies that take them)
    Key("proximal-mu", 0.01, "FedProx proximal term", _at_least(0), "strategy"),
    Key("server-learning-rate", 1.0, "FedAvgM server learning rate", _positive, "strategy"),
    Key("server-momentum", 0.0, "FedAvgM server momentum", _unit, "strategy"),
    Key("eta", 0.01, "FedAdam/FedYogi/FedAdagrad server learning rate", _positive, "strategy"),
    Key("eta-l", 0.01, "FedOpt-family client learning rate (logged by Flower)", _positive, "strategy"),
    Key("beta-1", 0.9, "FedAdam/FedYogi first-moment decay", _unit, "strategy"),
    Key("beta-2", 0.99, "FedAdam/FedYogi second-moment decay", _unit, "strategy"),
    Key("tau", 0.001, "FedOpt-family adaptivity", _positive, "strategy"),
    Key("trim-beta", 0.2, "FedTrimmedAvg fraction cut at each end", _below_half, "strategy"),
    Key("num-malicious-nodes", 0, "Krum / MultiKrum / Bulyan: assumed malicious nodes", _at_least(0), "strategy"),
    Key("num-nodes-to-select", 1, "MultiKrum: nodes averaged", _at_least(1), "strategy"),
    # --- differential privacy (docs/privacy.md)
    Key(
        "dp",
        "none",
        "none | server-fixed | server-adaptive | client-fixed | client-adaptive | local: wrap the strategy in "
        "Flower's DP (client-*: the ClientApp clips; local: LocalDpMod noises each reply)",
        _choice(DP_MODES),
        "privacy",
    ),
    Key(
        "dp-noise-multiplier",
        1.0,
        "Gaussian noise std / clipping norm (every dp mode; adaptive: the target z of Andrew et al.)",
        _at_least(0),
        "privacy",
    ),
    Key(
        "dp-clipping-norm",
        1.0,
        "L2 bound on a client's update (weights and architecture logits together); adaptive: the initial norm",
        _positive,
        "privacy",
    ),
    Key(
        "dp-delta", 1e-5, "delta at which epsilon is reported (and LocalDpMod's delta)", _fraction_below_one, "privacy"
    ),
    Key(
        "dp-target-quantile",
        0.5,
        "adaptive clipping: the quantile of update norms the clipping norm tracks (share of updates left "
        "unclipped; Andrew et al.'s gamma)",
        _unit,
        "privacy",
    ),
    Key("dp-clip-lr", 0.2, "adaptive clipping: geometric learning rate of the clipping norm", _positive, "privacy"),
    Key(
        "dp-clipped-count-stddev",
        0.0,
        "adaptive clipping: noise std on the clipped-update count; 0 = sampled clients / 20 (Andrew et al.)",
        _at_least(0),
        "privacy",
    ),
    # --- attacks (simulations) and the architecture-logit defence (fedmetanas_core/threats/attacks.py)
    Key(
        "attack",
        "none",
        "none | sign-flip (the update of every array reversed and scaled) | alpha-poison (alphas pushed towards "
        "skip/pooling, weights honest): what the attack-clients send instead of their honest reply",
        _choice(ATTACKS),
        "attack",
    ),
    Key(
        "attack-clients",
        "",
        'comma-separated partition ids of the attacking clients, e.g. "0,1"',
        _attack_clients,
        "attack",
    ),
    Key(
        "attack-scale",
        5.0,
        "attack strength: sign-flip sends g - scale * update; alpha-poison adds +-scale to the alpha logits",
        _positive,
        "attack",
    ),
    Key(
        "alpha-defence",
        "none",
        "none | median | trimmed-mean (cuts trim-beta at each end) | norm-screen: architecture logits aggregated "
        "robustly per element, whatever strategy aggregates the weights; update-screen: replies whose weight or "
        "logit update is an outlier are left out entirely",
        _choice(ALPHA_DEFENCES),
        "attack",
    ),
    Key(
        "alpha-screen-factor",
        3.0,
        "norm-screen / update-screen: an update norm above this times the round's median one is screened out",
        _at_least(1.0),
        "attack",
    ),
)

BY_NAME: dict[str, Key] = {k.name: k for k in KEYS}


def defaults() -> dict[str, Any]:
    return {k.name: k.default for k in KEYS}


def cast_value(key: Key, value: Any) -> Any:
    """TOML gives int for 1 and float for 1.0: accept ints where floats go, nothing looser."""
    want = key.type
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if math.isfinite(value):
                return value
            raise ConfigError(key.name, value, "must be a finite number")
    elif want is str:
        if isinstance(value, str):
            return value
    raise ConfigError(key.name, value, f"must be of type {want.__name__}")


def toml_table() -> str:
    """The ``[tool.flwr.app.config]`` body of pyproject.toml, generated from KEYS."""

    def value(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else repr(v)

    lines, group = [], None
    for k in KEYS:
        if k.group != group:
            lines.append(f"# --- {k.group}")
            group = k.group
        lines.append(f"{k.name} = {value(k.default)}")
    return "\n".join(lines)


def markdown_table() -> str:
    """The run-config reference table of docs/configuration.md, generated so it never drifts from KEYS."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for k in KEYS:
        default = (
            f'"{k.default}"'
            if isinstance(k.default, str)
            else str(k.default).lower()
            if isinstance(k.default, bool)
            else k.default
        )
        rows.append(f"| `{k.name}` | `{default}` | {k.help} |")
    return "\n".join(rows)

"""Run configuration: validates a flat ``{key: value}`` mapping once, up front.

``RunConfig.from_flat`` checks every value against the key table (``config_keys``) and the keys'
relations before any data is loaded, so a typo costs a one-line error instead of hours of search.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..threats.attacks import parse_attack_clients
from ..threats.privacy import DPConfigError, check_dp
from . import config_keys
from .config_keys import (  # noqa: F401 (re-exported: the table's names are part of this module's API)
    BY_NAME,
    CORRUPT_IMAGE_POLICIES,
    DATASETS,
    KEYS,
    METHODS,
    PARTITIONERS,
    STRATEGIES,
    ConfigError,
    Key,
    cast_value,
    defaults,
    markdown_table,
    parse_budget,
    parse_tier_budgets,
    parse_tier_shares,
    toml_table,
)


def resolve_method_tables(flat: Mapping[str, Any], default_method: str | None = None) -> dict[str, Any]:
    """Apply ``<method>.<key>`` entries (a preset's ``[fednas]`` table) for the run's method only.

    One preset then holds every method's budget for a side-by-side comparison, and
    ``-c 'method="fednas"'`` picks FedNAS's; plain ``flwr run`` flattens tables the same way.
    """
    scoped = {k: v for k, v in flat.items() if "." in k and k.split(".", 1)[0] in config_keys.METHODS}
    out = {k: v for k, v in flat.items() if k not in scoped}
    method = out.get("method", default_method or BY_NAME["method"].default)
    for name, value in scoped.items():
        table, key = name.split(".", 1)
        if key not in BY_NAME or key == "method":
            raise ConfigError(name, value, f"unknown key in the [{table}] table; see docs/configuration.md")
        if table == method:
            out[key] = value
    return out


class RunConfig(Mapping[str, Any]):
    """A validated, read-only run config; ``cfg.num_server_rounds`` reads ``num-server-rounds``."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = dict(values)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], *, check_paths: bool = True) -> RunConfig:
        flat = resolve_method_tables(flat)
        unknown = sorted(set(flat) - set(BY_NAME))
        if unknown:
            raise ConfigError(unknown[0], flat[unknown[0]], "unknown key; see docs/configuration.md")
        values = defaults()
        for name, raw in flat.items():
            key = BY_NAME[name]
            value = cast_value(key, raw)
            value = key.normalize(value) if key.normalize else value
            problem = key.check(value) if key.check else None
            if problem:
                raise ConfigError(name, raw, problem)
            values[name] = value
        cfg = cls(values)
        cfg._check_relations(check_paths)
        return cfg

    def _check_relations(self, check_paths: bool) -> None:
        if self.method == "fedmetanas" and self.discrete_round and not self.warmup_rounds < self.discrete_round:
            raise ConfigError(
                "discrete-round", self.discrete_round, f"must be 0 or after the warm-up ({self.warmup_rounds} rounds)"
            )
        if self.lr_min > self.outer_lr_w:
            raise ConfigError("lr-min", self.lr_min, f"must be <= outer-lr-w ({self.outer_lr_w})")
        if self.tau_max < self.tau_min:
            raise ConfigError("tau-max", self.tau_max, f"must be >= tau-min ({self.tau_min})")
        if self.query_fraction + self.local_test_fraction >= 1:
            raise ConfigError("query-fraction", self.query_fraction, "query-fraction + local-test-fraction must be < 1")
        if self.min_train_nodes > self.min_available_nodes:
            raise ConfigError(
                "min-train-nodes", self.min_train_nodes, f"must be <= min-available-nodes ({self.min_available_nodes})"
            )
        if self.dataset == "hf" and not self.hf_dataset:
            raise ConfigError("hf-dataset", self.hf_dataset, "required when dataset = hf")
        if self.maml_order == 2 and self.meta_learner == "reptile":
            raise ConfigError("maml-order", 2, "second order applies to fomaml only, not reptile")
        if self.eval_split == "validation" and not self.num_partitions:
            raise ConfigError(
                "eval-split", "validation", "needs num-partitions (the server rebuilds the clients' local test splits)"
            )
        if 0 < self.num_partitions < self.min_available_nodes:
            raise ConfigError(
                "num-partitions",
                self.num_partitions,
                f"must be 0 (one partition per node) or >= min-available-nodes ({self.min_available_nodes})",
            )
        self._check_budget()
        self._check_tiers()
        self._check_reduction_cells()
        self._check_strategy_nodes()
        self.check_dp(self.num_partitions or None)
        self._check_attack()
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("tensorboard", True, "needs the tensorboard package: pip install -e '.[tensorboard]'")
        if check_paths:
            self._check_paths()

    @property
    def latency_table_paths(self) -> list[str]:
        return config_keys.parse_latency_tables(self.latency_table)

    def check_dp(self, population: int | None) -> None:
        """A DP config that cannot work with ``population`` clients (None: unknown yet) is refused
        here, before anything starts; the CLI and the ServerApp call it again once they know."""
        try:
            check_dp(self, population)
        except DPConfigError as exc:
            raise ConfigError(exc.key, exc.value, exc.reason) from None

    def _check_strategy_nodes(self) -> None:
        """Byzantine-robust and trimming strategies need enough nodes for their parameters.

        ``n`` is ``min-available-nodes``: rounds start only once that many nodes are connected.
        """
        n, f, name = self.min_available_nodes, self.num_malicious_nodes, self.strategy
        if name in ("Krum", "MultiKrum") and not n > 2 * f + 2:
            raise ConfigError(
                "min-available-nodes",
                n,
                f"strategy {name} with num-malicious-nodes={f} needs more than 2*f+2 = {2 * f + 2} nodes",
            )
        if name == "MultiKrum" and self.num_nodes_to_select > n - f:
            raise ConfigError(
                "num-nodes-to-select",
                self.num_nodes_to_select,
                f"MultiKrum needs num-nodes-to-select <= min-available-nodes - num-malicious-nodes ({n} - {f} = "
                f"{n - f})",
            )
        if name == "Bulyan" and n < 4 * f + 3:
            raise ConfigError(
                "min-available-nodes",
                n,
                f"strategy Bulyan with num-malicious-nodes={f} needs at least 4*f+3 = {4 * f + 3} nodes",
            )
        if name == "FedTrimmedAvg" and int(self.trim_beta * n) < 1:
            need = math.ceil(1 / self.trim_beta - 1e-9) if self.trim_beta > 0 else "infinitely many"
            raise ConfigError(
                "min-available-nodes",
                n,
                f"FedTrimmedAvg with trim-beta={self.trim_beta} trims nothing with fewer than {need} nodes "
                f"(raise min-available-nodes or trim-beta, or use FedAvg)",
            )

    def _check_attack(self) -> None:
        """An attack needs its attackers; ids must exist when the partitions are known."""
        ids = parse_attack_clients(self.attack_clients)
        if self.attack != "none" and not ids:
            raise ConfigError(
                "attack-clients", self.attack_clients, f"attack = {self.attack} needs at least one partition id"
            )
        if self.num_partitions and ids and max(ids) >= self.num_partitions:
            raise ConfigError(
                "attack-clients", self.attack_clients, f"partition ids must be < num-partitions ({self.num_partitions})"
            )
        if self.alpha_defence != "none" and self.dp != "none":
            # the defence would replace the noised logits by a robust aggregate of un-noised ones
            raise ConfigError(
                "alpha-defence",
                self.alpha_defence,
                f"cannot be combined with dp = {self.dp} (it would aggregate the logits without the DP noise)",
            )

    def _check_reduction_cells(self) -> None:
        positions = self.reduction_positions or ()
        if any(p >= self.num_cells for p in positions):
            raise ConfigError(
                "reduction-cells", self.reduction_cells, f"cell indices must be < num-cells ({self.num_cells})"
            )

    def _check_budget(self) -> None:
        """Budget keys that cannot work together (whether anything in the space fits needs the
        data's shape: ``budget.check_feasible``, in the CLI and at the ServerApp's start)."""
        parsed = parse_budget(self.budget)
        kind = parsed[0] if parsed else None
        if self.init_channels == 0 and kind is None and not self.tiers:
            raise ConfigError("init-channels", 0, '0 sizes the space to the budget: set budget (e.g. "macs:200000")')
        if kind == "latency-ms" and not self.latency_table:
            raise ConfigError(
                "latency-table",
                "",
                "budget latency-ms:... needs a latency table measured on the device (fedmetanas profile)",
            )
        if self.latency_table and kind != "latency-ms":
            raise ConfigError("latency-table", self.latency_table, 'is read only with budget = "latency-ms:..."')

    def _check_tiers(self) -> None:
        """Device tiers go with what their aggregation handles: FedAvg's weighted mean of slices, no
        DP, no robust alpha rules (``federation.tiered``)."""
        tiers = parse_tier_budgets(self.tiers)
        if not tiers:
            unset_keys = (("tier-shares", ""), ("only-tier", -1), ("train-smaller-tiers", True), ("tier-distill", 0))
            for key, unset in unset_keys:
                if self[key] != unset:
                    raise ConfigError(key, self[key], "is read only with tiers")
            return
        if self.method == "fednas":
            raise ConfigError("tiers", self.tiers, "apply to fedmetanas (one search) and fedavg (the CNN per tier)")
        if self.method == "fedavg" and self.fedavg_genotype:
            raise ConfigError("fedavg-genotype", self.fedavg_genotype, "tiers scale the small CNN; leave it empty")
        for key, allowed in (("strategy", "FedAvg"), ("dp", "none"), ("alpha-defence", "none")):
            if self[key] != allowed:
                raise ConfigError(
                    key,
                    self[key],
                    f"with tiers must be {allowed} (each element is averaged over the clients that trained it)",
                )
        if self.alpha_aggregation != "logits":
            raise ConfigError("alpha-aggregation", self.alpha_aggregation, "with tiers must be logits")
        budget = parse_budget(self.budget)
        if budget is not None and budget[0] != tiers[0][0]:
            raise ConfigError("budget", self.budget, f"with tiers must limit {tiers[0][0]} too (or be empty)")
        try:
            parse_tier_shares(self.tier_shares, len(tiers))
        except ValueError as exc:
            raise ConfigError("tier-shares", self.tier_shares, str(exc)) from None
        if self.tier_distill > 0 and not self.train_smaller_tiers:
            raise ConfigError("tier-distill", self.tier_distill, "needs train-smaller-tiers (its teacher)")
        if self.only_tier >= len(tiers):
            raise ConfigError("only-tier", self.only_tier, f"must be < the number of tiers ({len(tiers)}) or -1")

    def _check_paths(self) -> None:
        """Filesystem checks (server and CLI; clients skip them: their data-dir is the node's)."""
        if self.dataset == "imagefolder":
            root = Path(self.data_dir).expanduser()
            if not self.data_dir or not root.is_dir():
                raise ConfigError(
                    "data-dir", self.data_dir, "imagefolder needs an existing folder with train/ and test/"
                )
            for folder in (root, root / "train", root / "test"):
                if not folder.is_dir():
                    raise ConfigError("data-dir", self.data_dir, f"imagefolder needs a '{folder.name}/' subfolder")
                if not os.access(folder, os.R_OK | os.X_OK):
                    raise ConfigError("data-dir", self.data_dir, f"folder {folder} is not readable")
        elif self.dataset in ("mnist", "fashion-mnist", "cifar10", "cifar100"):
            # torchvision reads its files there, or downloads them there: readable, or creatable
            root = Path(self.resolved_data_dir())
            if root.exists():
                if not root.is_dir():
                    raise ConfigError("data-dir", self.data_dir, f"{root} exists but is not a directory")
                if not os.access(root, os.R_OK | os.X_OK):
                    raise ConfigError("data-dir", self.data_dir, f"folder {root} is not readable")
            else:
                problem = _creatable(root)
                if problem:
                    raise ConfigError(
                        "data-dir", self.data_dir, f"{root} does not exist and cannot be created: {problem}"
                    )
        elif self.dataset == "hf":
            builder, sep, local_dir = self.hf_dataset.partition(":")
            if sep and builder and "/" not in builder and not Path(local_dir).expanduser().is_dir():
                raise ConfigError("hf-dataset", self.hf_dataset, f"{local_dir!r} is not an existing directory")
        for path in self.latency_table_paths:
            if not (Path(path).is_file() and os.access(path, os.R_OK)):
                raise ConfigError(
                    "latency-table",
                    self.latency_table,
                    f"{path} must be a readable latency table (fedmetanas profile --out)",
                )
        if self.fedavg_genotype and not (
            Path(self.fedavg_genotype).is_file() and os.access(self.fedavg_genotype, os.R_OK)
        ):
            raise ConfigError("fedavg-genotype", self.fedavg_genotype, "must be a readable genotype.yaml")
        if self.results_dir:
            out = Path(self.results_dir).expanduser().resolve()
            if out.exists():
                if not out.is_dir():
                    raise ConfigError("results-dir", self.results_dir, "exists but is not a directory")
                problem = _not_writable(out)
                if problem:
                    raise ConfigError("results-dir", self.results_dir, f"directory is not writable: {problem}")
            else:
                problem = _creatable(out)
                if problem:
                    raise ConfigError("results-dir", self.results_dir, f"cannot be created: {problem}")

    # --- access
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_"):
            raise AttributeError(attr)
        try:
            return self._values[attr.replace("_", "-")]
        except KeyError:
            raise AttributeError(attr) from None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def replace(self, **changes: Any) -> RunConfig:
        values = dict(self._values)
        values.update({k.replace("_", "-"): v for k, v in changes.items()})
        return RunConfig.from_flat(values, check_paths=False)

    @property
    def primitive_list(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.primitives.split(",") if p.strip())

    @property
    def reduction_positions(self) -> tuple[int, ...] | None:
        """``reduction-cells`` as cell indices; None (empty key): DARTS's rule."""
        text = self.reduction_cells.strip()
        return tuple(int(p) for p in text.split(",")) if text else None

    def resolved_results_dir(self, stamp: str) -> Path:
        """Absolute results directory; Flower runs the ServerApp from the SuperLink's cwd."""
        if self.results_dir:
            return Path(self.results_dir).expanduser().resolve()
        return (Path.cwd() / "results" / f"{self.method}-{self.dataset}-{stamp}").resolve()

    def resolved_data_dir(self) -> str:
        return str(Path(self.data_dir or os.path.join(os.getcwd(), "data")).expanduser().resolve())


def _creatable(path: Path) -> str | None:
    """None when ``path`` could be made with mkdir -p: its nearest existing parent is a writable dir."""
    parent = path
    while not parent.exists():
        if parent.parent == parent:
            return "no existing parent folder"
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    problem = _not_writable(parent)
    return f"{parent} is not writable: {problem}" if problem else None


def _not_writable(folder: Path) -> str | None:
    """None when a folder can really be made in ``folder`` (made and removed again). ``os.access``
    is no answer: it says yes to root everywhere, and to pseudo file systems such as /proc."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".fedmetanas-write-check-", dir=folder))
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None


# python -m fedmetanas_core.run.config [--toml]: docs/configuration.md's table / pyproject block
if __name__ == "__main__":
    import sys

    print(toml_table() if "--toml" in sys.argv else markdown_table())

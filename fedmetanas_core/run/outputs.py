"""What a run leaves behind: config.yaml, rounds.jsonl, summary.json, genotype.yaml, the derived model.

Files are written atomically (``atomic``: temporary file, then rename), so a crash never leaves half a file.
"""

from __future__ import annotations

import io
import json
import os
import platform
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..method.genotype import DiscreteNetwork, Genotype, SimpleCNN, build_fixed_network
from ..space import SpaceConfig
from ..util.atomic import atomic_write_bytes, atomic_write_text

MODEL_FILE = "derived_model.pt"


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("fedmetanas", "flwr", "torch", "torchvision", "numpy", "flwr-datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def cpu_model() -> str:
    """The CPU's model name where the OS says it (Linux): two x86_64 CPUs round floats differently,
    so the same code and seed can end a few thousandths apart, and a figure must name its CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_description() -> str:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    model = cpu_model()
    cpu = f" ({model})" if model else ""
    return f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores{cpu}{gpu}"


class RunRecorder:
    def __init__(self, results_dir: Path):
        self.dir = Path(results_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def start_log(self) -> None:
        """A fresh (not resumed) run into a used results-dir logs its own rounds only: appending to
        the earlier run's rounds.jsonl would mix two runs' curves and timings."""
        (self.dir / "rounds.jsonl").unlink(missing_ok=True)

    def write_config(self, cfg: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(dict(cfg), sort_keys=True))

    def log_round(self, row: dict[str, Any]) -> None:
        with open(self.dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()

    def read_rounds(self) -> list[dict[str, Any]]:
        path = self.dir / "rounds.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))

    def write_genotype(self, genotype: Genotype) -> None:
        atomic_write_text(self.dir / "genotype.yaml", yaml.safe_dump(genotype.to_dict(), sort_keys=False))

    def save_model(self, net: torch.nn.Module, space: SpaceConfig, genotype: Genotype | None) -> Path:
        payload = {
            "space": asdict(space),
            "genotype": genotype.to_dict() if genotype is not None else None,
            "cnn_channels": net.channels if isinstance(net, SimpleCNN) else 0,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        }
        buf = io.BytesIO()
        torch.save(payload, buf)
        path = self.dir / MODEL_FILE
        atomic_write_bytes(path, buf.getvalue())
        return path


def load_derived_model(path: str | Path) -> DiscreteNetwork | SimpleCNN:
    """Load a run's final model (the derived network with its weights, ready for inference).

    ``path`` is a results directory or its ``derived_model.pt``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    payload = torch.load(path, map_location="cpu", weights_only=True)
    space = SpaceConfig(**{**payload["space"], "primitives": tuple(payload["space"]["primitives"])})
    genotype = Genotype.from_dict(payload["genotype"]) if payload["genotype"] is not None else None
    net = build_fixed_network(space, genotype, int(payload.get("cnn_channels", 0)))
    net.load_state_dict(payload["state_dict"])
    net.eval()
    return net


CHECKPOINT_FILE = "checkpoint.pt"

# keys that may differ between a run and its resumption without changing results
RESUME_NEUTRAL_KEYS = frozenset({"resume", "checkpoint", "results-dir", "round-timeout", "torch-threads", "device"})


def checkpoint_data(value: Any) -> Any:
    """``value`` as tensors and plain Python data only, which ``torch.load(weights_only=True)``
    accepts: numpy arrays become tensors (they come back as tensors), numpy scalars Python numbers."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.array(value))  # a copy: the checkpoint never aliases live arrays
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: checkpoint_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(checkpoint_data(v) for v in value)
    return value


def rng_states() -> dict[str, Any]:
    """Python's, numpy's and torch's global RNG states as plain lists and a tensor."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of ``rng_states``: the run continues drawing exactly where it stopped."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])


def save_checkpoint(results_dir: Path, payload: dict[str, Any]) -> None:
    """Everything needed to continue after the last finished round; written atomically, as tensors
    and plain data only (see ``checkpoint_data``) so that loading it never runs pickled code."""
    buf = io.BytesIO()
    torch.save(checkpoint_data(payload), buf)
    atomic_write_bytes(Path(results_dir) / CHECKPOINT_FILE, buf.getvalue())


def load_checkpoint(results_dir: Path) -> dict[str, Any] | None:
    """The checkpoint, read with ``weights_only=True``: a tampered file cannot execute code."""
    path = Path(results_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = (set(saved) | set(current)) - RESUME_NEUTRAL_KEYS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def truncate_rounds(results_dir: Path, keep: set[tuple[str, int]]) -> None:
    """Drop rounds.jsonl lines of rounds the checkpoint does not cover (logged, then crashed)."""
    path = Path(results_dir) / "rounds.jsonl"
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if (json.loads(ln)["phase"], json.loads(ln)["round"]) in keep]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))

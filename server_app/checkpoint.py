"""A run's checkpoint: what the ServerApp saves after every round and a resumed run starts from.

Its own object so that the experiment's loop only says when: ``RunCheckpoint`` refuses a resume
whose run config differs from the saved one, gives back the run's ``Progress`` (and restores the
RNG states, and drops rounds.jsonl lines the checkpoint does not cover), the saved state of the
phase the run stopped in, and writes a new checkpoint after a round. The file format (weights-only
torch, written atomically) is ``fedmetanas_core.run.outputs``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log

from fedmetanas_core.federation.phases import Handoff
from fedmetanas_core.run.config import ConfigError, RunConfig
from fedmetanas_core.run.outputs import (
    config_differences,
    load_checkpoint,
    rng_states,
    save_checkpoint,
    set_rng_states,
    truncate_rounds,
)


@dataclass
class Progress:
    """Where a run stands after its last finished round (all of it checkpointed)."""

    done: list[tuple[str, int]] = field(default_factory=list)  # (phase, round) of every finished round
    nodes_seen: set[int] = field(default_factory=set)
    rejected_total: int = 0
    elapsed_before: float = 0.0  # wall time of the run before a resume
    first_phase: int = 0  # the phase a resumed run continues in: the ones before it are finished
    carried: Handoff = field(default_factory=Handoff)  # what the finished phases left
    dp_releases: int = 0


@dataclass
class PhaseState:
    """The saved state of the phase a run stopped in: its arrays, masks, last metrics, strategy state."""

    round: int
    arrays: dict[str, np.ndarray]
    masks: dict[str, torch.Tensor]
    last: dict[str, Any]
    strategy: dict[str, Any]


class RunCheckpoint:
    """The checkpoint in ``results_dir``: read once when the run config says ``resume``."""

    def __init__(self, results_dir: Path, cfg: RunConfig):
        self.dir, self.cfg = Path(results_dir), cfg
        self.saved = self._load() if cfg.resume else None

    @property
    def resumed(self) -> bool:
        return self.saved is not None

    def _load(self) -> dict[str, Any]:
        try:
            ck = load_checkpoint(self.dir)
        except Exception as exc:  # e.g. written by a version that pickled numpy arrays
            raise ConfigError(
                "resume", True, f"checkpoint.pt in {self.dir} cannot be loaded: {type(exc).__name__}"
            ) from None
        if ck is None:
            raise ConfigError("resume", True, f"no checkpoint.pt in results-dir {self.dir}")
        changed = config_differences(ck["config"], dict(self.cfg))
        if changed:
            raise ConfigError("resume", True, f"the run config differs from the checkpoint's in {', '.join(changed)}")
        return ck

    def progress(self) -> Progress:
        """A fresh run's progress, or the saved one: then the global RNGs continue where they
        stopped and rounds.jsonl keeps only the rounds the checkpoint covers."""
        ck = self.saved
        if ck is None:
            return Progress()
        done = [tuple(d) for d in ck["done"]]
        set_rng_states(ck["rng"])
        truncate_rounds(self.dir, set(done))
        log(INFO, "Resuming from %s: %d rounds already done", self.dir, len(done))
        return Progress(
            done=done,
            nodes_seen=set(ck["nodes_seen"]),
            rejected_total=ck["rejected_total"],
            elapsed_before=ck["elapsed"],
            first_phase=ck["phase_index"],
            carried=Handoff.from_dict(ck["extra"]),
            dp_releases=int(ck.get("dp_releases", 0)),
        )

    def phase_state(self, index: int) -> PhaseState | None:
        """The saved state when the run stopped in phase ``index``, else None."""
        ck = self.saved
        if ck is None or ck["phase_index"] != index:
            return None
        arrays = {k: v.numpy() for k, v in ck["arrays"].items()}  # saved as tensors
        return PhaseState(ck["round"], arrays, ck["masks"], ck["last"], ck["strategy"])

    def save(
        self,
        progress: Progress,
        index: int,
        rnd: int,
        arrays: dict[str, np.ndarray],
        masks: dict[str, torch.Tensor],
        last: dict[str, Any],
        strategy: dict[str, Any],
        elapsed: float,
    ) -> None:
        """After round ``rnd`` of phase ``index``: everything needed to continue from the next one."""
        save_checkpoint(
            self.dir,
            {
                "config": dict(self.cfg),
                "phase_index": index,
                "round": rnd,
                "arrays": arrays,
                "masks": {k: v.cpu() for k, v in masks.items()},
                "last": last,
                "strategy": strategy,
                "done": progress.done,
                "elapsed": elapsed,
                "nodes_seen": sorted(progress.nodes_seen),
                "rejected_total": progress.rejected_total,
                "dp_releases": progress.dp_releases,
                "extra": progress.carried.to_dict(),
                "rng": rng_states(),
            },
        )

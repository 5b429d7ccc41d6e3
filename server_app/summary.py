"""summary.json, in parts: what ran, the deployed network's accuracy, time, bytes, privacy spent.

Each part is built from plain values (the run config, counts, the rows of rounds.jsonl, the core's
accountant), never from the ServerApp's objects; keys keep the order the file has always had, and
``server_app.app.run_experiment`` joins the parts.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmetanas_core.federation.phases import Handoff
from fedmetanas_core.run.config import RunConfig
from fedmetanas_core.threats.privacy import MEAN_STRATEGIES

if TYPE_CHECKING:
    from fedmetanas_core.threats.privacy import PrivacyAccountant


def skipped_rounds(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Rounds skipped, and of them those skipped for an error (not merely too few replies), from
    rounds.jsonl rows: ``fedmetanas run`` fails a run that lost too many rounds to errors."""
    skipped = [r for r in rows if not r.get("aggregated")]
    errors = [r for r in skipped if str(r.get("skipped-reason") or "").startswith("error")]
    return {"skipped_rounds": len(skipped), "skipped_rounds_error": len(errors)}


def run_fields(cfg: RunConfig, num_clients: int, phase_rounds: list[int]) -> dict[str, Any]:
    """What ran: method, data, the clients that replied, and rounds (the first phase's, then those
    of the phases after it: FedNAS's retraining)."""
    return {
        "method": cfg.method,
        "strategy": cfg.strategy,
        "dataset": cfg.dataset,
        "num_clients": num_clients,
        "partitioner": {
            "name": cfg.partitioner,
            "dirichlet_alpha": cfg.dirichlet_alpha,
            "classes_per_client": cfg.classes_per_client,
            "shards_per_client": cfg.shards_per_client,
        },
        "rounds": phase_rounds[0],
        "retrain_rounds": sum(phase_rounds[1:]),
    }


def privacy_fields(cfg: RunConfig, acc: PrivacyAccountant | None, final_clipping_norm: float | None) -> dict[str, Any]:
    """The privacy spent (docs/privacy.md): epsilon at dp-delta from dp-accounting's RDP accountant,
    and the clipping norm the last round used (adaptive clipping moves it)."""
    if acc is None:
        return {"dp": {"mode": "none"}, "dp_epsilon": None}
    return {
        "dp": {
            "mode": cfg.dp,
            "noise_multiplier": cfg.dp_noise_multiplier,
            "effective_noise_multiplier": acc.noise_multiplier,
            "clipping_norm": cfg.dp_clipping_norm,
            "final_clipping_norm": final_clipping_norm,
            "delta": acc.delta,
            "epsilon": acc.epsilon(),
            "releases": acc.releases,
            "population": acc.population,
            "sampled_clients": acc.sample_size,
            "sampling_rate": acc.sampling_rate,
            "amplification": acc.amplified and acc.sampling_rate < 1,
            "accountant": "dp-accounting RdpAccountant (client-level, add-or-remove-one)",
            "clipped_together": "weights and architecture logits, one L2 norm",
            "strategy_is_mean": cfg.strategy in MEAN_STRATEGIES or cfg.dp == "local",
        },
        "dp_epsilon": acc.epsilon(),
    }


def accuracy_fields(
    final_eval: dict[str, float], carried: Handoff, clients: list[dict[str, Any]], cfg: RunConfig
) -> dict[str, Any]:
    """The deployed network on the global test set and, personalized, on every client's own."""
    before = [c["accuracy-before"] for c in clients]
    after = [c["accuracy-after"] for c in clients]
    return {
        "final_test_accuracy": final_eval["accuracy"],
        "final_test_loss": final_eval["loss"],
        "supernet_test_accuracy": carried.results.get("supernet_test_accuracy"),
        "personalized_accuracy": float(np.mean(after)) if after else None,
        "personalized_accuracy_before": float(np.mean(before)) if before else None,
        "personalized_accuracy_std": float(np.std(after)) if after else None,
        "personalized_per_client": clients,
        "personalize_protocol": {"network": "deployed", "steps": cfg.personalize_steps, "lr": cfg.personalize_lr},
        "eval_split": cfg.eval_split,
    }


def communication_fields(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Bytes of arrays to and from clients over all training rounds (personalization not counted)."""
    return {
        "bytes_sent": int(sum(r.get("bytes-sent") or 0 for r in rows)),
        "bytes_received": int(sum(r.get("bytes-received") or 0 for r in rows)),
    }


def time_fields(carried: Handoff, t0: float, train_end: float) -> dict[str, float]:
    """The first phase's time (the search, or FedAvg's training), the later phases' (retraining),
    training in all, and wall time with personalization."""
    times = carried.phase_times
    return {
        "search_time_s": times[0] if times else 0.0,
        "retrain_time_s": float(sum(times[1:])),
        "total_time_s": train_end - t0,
        "wall_time_s": time.time() - t0,
    }

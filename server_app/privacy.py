"""The run's strategy wrapped in Flower's differential-privacy strategies (``dp`` run-config key).

``SearchStrategy(dp_wrapper(base))``: the screen runs first (a faulty reply never reaches the
clipping), then Flower clips (server-side modes), the base strategy averages, and Flower adds the
Gaussian noise. Weights and architecture logits travel in one ArrayRecord, so they are clipped to
one L2 norm and noised alike (docs/privacy.md says why). The maths (which config works, epsilon)
lives in ``fedmetanas_core.threats.privacy``.
"""

from __future__ import annotations

import math

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedmetanas_core.run.config import RunConfig
from fedmetanas_core.threats.privacy import clipped_count_stddev, num_sampled_clients


class _AndrewGeometricUpdate:
    """Flower 1.42's adaptive wrappers update the norm with ``C *= exp(-lr * (clipped - gamma))``
    from the share of *clipped* updates, so C shrinks when most updates are clipped and runs away
    to 0 (or grows without bound). Andrew et al. (2021) use the share of *unclipped* updates, b:
    ``C *= exp(-lr * (b - gamma))``, which converges to the gamma-quantile of the update norms.
    (tests/test_privacy.py shows both.)"""

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _geometric_update(self, clipped_fraction: float) -> None:
        unclipped = 1.0 - clipped_fraction
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (unclipped - self.target_clipped_quantile))


class ServerSideAdaptiveClipping(_AndrewGeometricUpdate, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with Andrew et al.'s norm update."""


class ClientSideAdaptiveClipping(_AndrewGeometricUpdate, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping (with ``adaptiveclipping_mod``) with Andrew et al.'s norm update."""


DP_WRAPPERS = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": ServerSideAdaptiveClipping,
    "client-adaptive": ClientSideAdaptiveClipping,
}


def wrap_dp(base: Strategy, cfg: RunConfig, population: int) -> Strategy:
    """``base`` inside the DP wrapper the run asks for; ``local`` (and ``none``) leave it as it is:
    LocalDpMod works on the clients alone."""
    cls = DP_WRAPPERS.get(cfg.dp)
    if cls is None:
        return base
    m = num_sampled_clients(population, cfg.fraction_train, cfg.min_train_nodes)
    if cfg.dp in ("server-fixed", "client-fixed"):
        return cls(base, cfg.dp_noise_multiplier, cfg.dp_clipping_norm, m)
    return cls(
        base,
        cfg.dp_noise_multiplier,
        m,
        initial_clipping_norm=cfg.dp_clipping_norm,
        target_clipped_quantile=cfg.dp_target_quantile,
        clip_norm_lr=cfg.dp_clip_lr,
        clipped_count_stddev=clipped_count_stddev(cfg, m),
    )


def is_dp_wrapper(strategy: Strategy) -> bool:
    return isinstance(strategy, tuple(DP_WRAPPERS.values()))


def current_clipping_norm(strategy: Strategy) -> float | None:
    """The clipping norm in force (adaptive modes change it every round)."""
    return float(strategy.clipping_norm) if is_dp_wrapper(strategy) else None

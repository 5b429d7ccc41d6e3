"""Differential privacy: what the run-config keys mean, which configs can work, and the privacy spent.

Flower-free. The mechanisms themselves are Flower's (``server_app.privacy`` wraps the strategy,
``client_app.privacy`` picks the client mod); this module only decides whether a DP config can run
(before anything starts) and accounts for it with Google's ``dp-accounting`` RDP accountant, a
maintained library, never a hand-written epsilon formula. See docs/privacy.md.

Accounting model (client-level DP, add-or-remove-one-client neighbours): each aggregated round is
one Gaussian release with noise multiplier ``z`` (noise std / the clipped update's L2 bound); when
only ``m`` of the ``N`` clients are sampled, Poisson subsampling at rate ``q = m / N`` (the standard
DP-FedAvg accounting; Flower samples exactly ``m`` without replacement). ``q = 1``: no amplification.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

DP_MODES = ("none", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive", "local")
CLIENT_SIDE = ("client-fixed", "client-adaptive", "local")  # modes with a ClientApp mod
ADAPTIVE = ("server-adaptive", "client-adaptive")
# aggregate = the uniform mean of the clipped replies (noise std z*C/m is calibrated for that mean);
# FedProx's server side is FedAvg's (its proximal term is a client-side loss)
MEAN_STRATEGIES = ("FedAvg", "FedProx")


class DPConfigError(ValueError):
    """A DP setting that cannot work; ``key`` names the run-config key to change."""

    def __init__(self, key: str, value: Any, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(reason)


def num_sampled_clients(population: int, fraction_train: float, min_train_nodes: int) -> int:
    """Clients Flower's FedAvg family samples each round: ``max(int(N * fraction), min_train_nodes)``."""
    return max(int(population * fraction_train), min_train_nodes)


def clipped_count_stddev(cfg: Mapping[str, Any], sample_size: int) -> float:
    """Noise std on the adaptive clipping's count of clipped updates; 0 in the config means
    Andrew et al.'s default ``m / 20`` (Flower's default too)."""
    if cfg["dp-noise-multiplier"] == 0:
        return float(cfg["dp-clipped-count-stddev"])
    return float(cfg["dp-clipped-count-stddev"]) or sample_size / 20


def update_noise_multiplier(z: float, count_stddev: float) -> float:
    """The noise multiplier Flower's adaptive wrappers put on the updates for a target ``z``
    (Andrew et al. 2021, Sec. 3.1, as ``flwr.supercore.differential_privacy.compute_adaptive_noise_params``):
    part of the budget goes to the clipped-count estimate, so the updates get more noise."""
    if z == 0:
        return 0.0
    return (z ** (-2) - (2 * count_stddev) ** (-2)) ** -0.5


def local_reply_epsilon(z: float, delta: float) -> float:
    """The ``epsilon`` given to Flower's ``LocalDpMod`` so that its per-reply Gaussian noise
    (std = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon, sensitivity = the clipping norm) is
    exactly ``z`` x the clipping norm: one noise knob, ``dp-noise-multiplier``, for every mode."""
    return math.inf if z == 0 else math.sqrt(2 * math.log(1.25 / delta)) / z


def check_dp(cfg: Mapping[str, Any], population: int | None) -> None:
    """Raise ``DPConfigError`` for a DP config that cannot work with ``population`` clients
    (None: not known yet; the population-dependent checks then wait for the ServerApp)."""
    mode = cfg["dp"]
    if mode == "none":
        return
    if cfg["alpha-aggregation"] == "log-softmax":
        raise DPConfigError(
            "alpha-aggregation",
            "log-softmax",
            "log-softmax is not a contraction, so a clipped update can grow past dp-clipping-norm; "
            "use logits or centered with dp",
        )
    if population is None:
        return
    m = num_sampled_clients(population, cfg["fraction-train"], cfg["min-train-nodes"])
    if m > population:
        raise DPConfigError(
            "min-train-nodes",
            cfg["min-train-nodes"],
            f"dp = {mode} samples {m} clients a round (min-train-nodes) but the federation has {population}: "
            "rounds would wait forever and the noise is calibrated for that sample size",
        )
    if mode in ADAPTIVE and cfg["dp-noise-multiplier"] > 0:
        sb = clipped_count_stddev(cfg, m)
        if not cfg["dp-noise-multiplier"] < 2 * sb:
            raise DPConfigError(
                "dp-noise-multiplier",
                cfg["dp-noise-multiplier"],
                f"adaptive clipping needs dp-noise-multiplier < 2 x dp-clipped-count-stddev = {2 * sb:g} "
                f"({f'm/20 with m = {m} sampled clients' if not cfg['dp-clipped-count-stddev'] else 'as set'}); "
                "raise dp-clipped-count-stddev or lower the noise",
            )


@dataclass
class PrivacyAccountant:
    """The epsilon spent so far at ``delta``, by dp-accounting's RDP accountant, one event per release.

    ``noise_multiplier`` is the effective multiplier of one release (``effective_noise_multiplier``).
    ``amplified``: False for local DP, where the server sees who took part (no subsampling gain).
    """

    noise_multiplier: float
    delta: float
    population: int
    sample_size: int
    amplified: bool = True
    releases: int = 0

    @property
    def sampling_rate(self) -> float:
        return min(1.0, self.sample_size / self.population)

    def event(self):
        from dp_accounting import dp_event

        gaussian = dp_event.GaussianDpEvent(self.noise_multiplier)
        if self.amplified and self.sampling_rate < 1:
            return dp_event.PoissonSampledDpEvent(self.sampling_rate, gaussian)
        return gaussian

    def release(self) -> None:
        self.releases += 1

    def epsilon(self) -> float | None:
        """None when nothing bounds it (no noise); 0 before the first release."""
        if self.releases == 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return None
        from dp_accounting import dp_event
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant()
        accountant.compose(dp_event.SelfComposedDpEvent(self.event(), self.releases))
        eps = float(accountant.get_epsilon(self.delta))
        return eps if math.isfinite(eps) else None


def effective_noise_multiplier(cfg: Mapping[str, Any], sample_size: int) -> float:
    """One release's noise multiplier, as the accountant must see it.

    Fixed clipping and local DP: ``dp-noise-multiplier``. Adaptive clipping releases two Gaussians on
    the same sample: the update sum (multiplier ``update_noise_multiplier``, sensitivity C) and the
    count of clipped updates (std ``sigma_b``; Flower counts 0/1 bits, so sensitivity 1, not the 1/2
    of Andrew et al.'s centred bits). Two Gaussians on one sample are one Gaussian with
    ``(z1^-2 + z2^-2)^-1/2``: slightly less than the configured z (docs/privacy.md).
    """
    z = float(cfg["dp-noise-multiplier"])
    if cfg["dp"] not in ADAPTIVE or z == 0:
        return z
    sb = clipped_count_stddev(cfg, sample_size)
    return (update_noise_multiplier(z, sb) ** -2 + sb**-2) ** -0.5


def make_accountant(cfg: Mapping[str, Any], population: int) -> PrivacyAccountant | None:
    if cfg["dp"] == "none":
        return None
    m = num_sampled_clients(population, cfg["fraction-train"], cfg["min-train-nodes"])
    return PrivacyAccountant(
        noise_multiplier=effective_noise_multiplier(cfg, m),
        delta=cfg["dp-delta"],
        population=population,
        sample_size=m,
        amplified=cfg["dp"] != "local",
    )


def update_norms(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], is_arch) -> tuple[float, float]:
    """L2 norms of a reply's update (reply - global) over all its arrays and over the architecture
    logits alone: the numbers a clipping norm is chosen from (logged in rounds.jsonl)."""
    total = arch = 0.0
    for key, value in state.items():
        sq = float(np.sum((value.astype(np.float64) - reference[key].astype(np.float64)) ** 2))
        total += sq
        if is_arch(key):
            arch += sq
    return math.sqrt(total), math.sqrt(arch)

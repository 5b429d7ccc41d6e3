"""Gumbel-Softmax relaxation of architecture logits, and the server-owned temperature schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RELAX_MODES = ("gumbel-soft", "softmax", "gumbel-hard")


def gumbel_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """-log(E), E ~ Exp(1), is Gumbel(0, 1); drawn from our own generator (F.gumbel_softmax takes none).

    Drawn on the generator's device (CPU generators for CPU models) and clamped so log never sees 0.
    """
    gen_device = generator.device if generator is not None else device
    e = torch.empty(shape, dtype=torch.float32, device=gen_device).exponential_(generator=generator)
    return -e.clamp_min(1e-10).log().to(device)


def relax(
    logits: torch.Tensor,
    tau: float,
    mode: str = "gumbel-soft",
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: bool = True,
) -> torch.Tensor:
    """Relaxed weights over the last dim: softmax((logits + g) / tau), masked entries exactly 0.

    ``noise=False`` (evaluation) drops the Gumbel term. ``gumbel-hard`` returns a one-hot forward value
    with the soft sample's gradient (straight-through), so only the sampled entry is executed.
    """
    z = logits.float()
    if mode != "softmax" and noise:
        z = z + gumbel_noise(z.shape, generator, z.device)
    if mask is not None:  # the server keeps masks on the CPU; the model may be on a GPU
        z = z.masked_fill(~mask.to(z.device), float("-inf"))
    soft = torch.softmax(z / tau, dim=-1)
    if mode != "gumbel-hard":
        return soft
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


def probabilities(logits: torch.Tensor, mask: torch.Tensor | None = None, tau: float = 1.0) -> torch.Tensor:
    """Noise-free softmax probabilities (genotype derivation, masks, entropy)."""
    return relax(logits.detach(), tau, "softmax", mask, noise=False)


def entropy(probs: torch.Tensor) -> float:
    """Mean row entropy in nats; 0 means every row is one-hot."""
    p = probs.clamp_min(1e-12)
    return float(-(probs * p.log()).sum(-1).mean())


@dataclass(frozen=True)
class TemperatureSchedule:
    """tau as a pure function of the round, computed by the server and sent with each round.

    Round 1 uses tau_max, round ``num_rounds`` uses tau_min; warm-up rounds stay at tau_max.
    """

    tau_max: float
    tau_min: float
    num_rounds: int
    kind: str = "linear"
    warmup_rounds: int = 0

    def __call__(self, server_round: int) -> float:
        if server_round <= self.warmup_rounds:
            return self.tau_max
        span = self.num_rounds - self.warmup_rounds  # annealing rounds; a single one goes straight to tau_min
        t = 1.0 if span <= 1 else min(max((server_round - self.warmup_rounds - 1) / (span - 1), 0.0), 1.0)
        if self.kind == "linear":
            return self.tau_max - t * (self.tau_max - self.tau_min)
        if self.kind == "exponential":
            return self.tau_max * (self.tau_min / self.tau_max) ** t
        if self.kind == "cosine":
            return self.tau_min + 0.5 * (self.tau_max - self.tau_min) * (1 + math.cos(math.pi * t))
        raise ValueError(f"unknown temperature schedule {self.kind!r}")

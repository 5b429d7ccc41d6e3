"""Seeds derived per (run seed, stream, node, round): reproducible without sharing global RNG state."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *stream: object) -> int:
    text = ":".join(str(s) for s in (seed, *stream))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)


def make_generator(seed: int, *stream: object) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *stream))
    return g

"""Seeding: derived seeds are deterministic and differ by stream, round and node."""

from __future__ import annotations

import pytest
import torch

from fedmetanas_core.util.seeding import derive_seed, make_generator

pytestmark = pytest.mark.usefixtures("single_thread", "torch_seed")


def test_derive_seed_deterministic_and_stream_sensitive():
    a = derive_seed(0, "gumbel", 3, 7)
    assert a == derive_seed(0, "gumbel", 3, 7)
    others = {
        derive_seed(1, "gumbel", 3, 7),
        derive_seed(0, "task", 3, 7),
        derive_seed(0, "gumbel", 4, 7),
        derive_seed(0, "gumbel", 3, 8),
        derive_seed(0, "gumbel", 7, 3),
        derive_seed(0, "gumbel", 3),
    }
    assert a not in others and len(others) == 6
    assert 0 <= a < 2**63
    x = torch.rand(5, generator=make_generator(0, "x"))
    assert torch.equal(x, torch.rand(5, generator=make_generator(0, "x")))
    assert not torch.equal(x, torch.rand(5, generator=make_generator(0, "y")))

"""Minibatches: endless shuffled streams over one ImageData."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .images import DataError, ImageData


class BatchStream:
    """Endless shuffled minibatches over one ImageData.

    Persistent (unlike `next(iter(loader))` per step): every example is seen once per epoch, the
    order is reshuffled each epoch from `generator`, so runs are reproducible. The last batch of an
    epoch may be smaller. A batch size >= the data size yields the whole data every time.
    """

    def __init__(self, data: ImageData, batch_size: int, generator: torch.Generator | None = None):
        if batch_size < 1:
            raise DataError(f"batch-size must be >= 1; got {batch_size}")
        if len(data) == 0:
            raise DataError("cannot draw batches from an empty dataset")
        self.data = data
        self.batch_size = batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.epoch = 0  # epochs started so far
        self._order: torch.Tensor | None = None
        self._pos = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.data)
        if self.batch_size >= n:
            self.epoch += 1
            return self.data.x, self.data.y
        if self._order is None or self._pos >= n:
            self._order = torch.randperm(n, generator=self.generator)
            self._pos = 0
            self.epoch += 1
        idx = self._order[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.data.x[idx], self.data.y[idx]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()


def batches(data: ImageData, batch_size: int, generator: torch.Generator | None = None) -> BatchStream:
    """Shorthand for BatchStream(data, batch_size, generator)."""
    return BatchStream(data, batch_size, generator)

"""A bounded least-recently-used cache, for what a long-lived process keeps between calls.

A Ray actor or a SuperNode outlives its runs and may serve thousands of simulated clients: what it
caches per run or per client (validated run configs, loaded client data) must be bounded, or its
memory grows with every run and client it ever served.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """At most ``capacity`` values; the least recently used goes first when a new one arrives."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The cached value of ``key``, else ``make()`` cached (evicting the least recently used)."""
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = make()
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return value

    def __iter__(self) -> Iterator[K]:
        """Keys, least recently used first."""
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        self.items.clear()

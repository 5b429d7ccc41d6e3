"""A node's data, loaded once per ``DataSpec`` and kept in a bounded cache.

The key is everything that decides the data (never stale: two runs that differ in any data setting
get their own splits); least recently used first out, so an actor serving a population of thousands
of simulated clients holds at most ``NODE_DATA.capacity`` of them.
"""

from __future__ import annotations

from typing import Any

from ..run.config import RunConfig
from ..util.lru import LruCache
from . import clients
from .clients import ClientData
from .spec import DataSpec

NODE_DATA: LruCache[DataSpec, ClientData] = LruCache(128)


def node_data(cfg: RunConfig, node_config: dict[str, Any], node_id: int = 0) -> ClientData:
    """The node's data; a node with its own data (no ``partition-id``) is identified by ``node_id``."""
    spec = DataSpec.from_config(cfg, node_config, node_id)
    return NODE_DATA.get(spec, lambda: clients.load_client_data(spec))

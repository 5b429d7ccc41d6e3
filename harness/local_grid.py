"""A Grid that delivers every message to the real ClientApp in this process: no Ray, no SuperLink.

For tests and long benchmark grids on small machines: the ServerApp's loop (``run_experiment``) and
the ClientApp (``client_app.app.app``, so its mods, e.g. the DP clipping, run too) are the ones
``flwr run`` uses; only the transport is skipped. Node ``i`` (id ``i + 1``) holds partition ``i``.
Outside a Flower runtime a ``Message`` needs a task identity: ``task_identity()`` sets Flower's
(an internal API, pinned with flwr==1.42.0).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode


@contextmanager
def task_identity() -> Iterator[None]:
    from flwr.supercore.task_identity import TaskIdentity

    attrs = ("_task_id", "_run_id", "_node_id")
    saved = {a: getattr(TaskIdentity, a, None) for a in attrs}
    for a in attrs:
        setattr(TaskIdentity, a, 1)
    try:
        yield
    finally:
        for a, v in saved.items():
            setattr(TaskIdentity, a, v)


class LocalGrid:
    """``num_nodes`` virtual SuperNodes, each with its own persistent ``context.state``."""

    def __init__(
        self,
        run_id: int,
        run_config: dict[str, Any],
        num_nodes: int,
        node_configs: dict[int, dict[str, Any]] | None = None,
        errors_as_replies: bool = False,
    ):
        """``node_configs``: extra node-config entries by node id (e.g. a device's ``budget-macs``);
        ``errors_as_replies``: a raising ClientApp answers with an error reply, as under a SuperNode
        (off: the exception reaches the caller, so a client bug fails the test that meets it)."""
        from client_app.app import app as client_app

        self.client_app, self.run_id, self.run_config, self.num_nodes = client_app, run_id, run_config, num_nodes
        self.states = {i + 1: RecordDict() for i in range(num_nodes)}
        self.node_configs = node_configs or {}
        self.errors_as_replies = errors_as_replies

    def get_node_ids(self) -> list[int]:
        return list(self.states)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = Context(
                run_id=self.run_id,
                node_id=node,
                node_config={
                    "partition-id": node - 1,
                    "num-partitions": self.num_nodes,
                    **self.node_configs.get(node, {}),
                },
                state=self.states[node],
                run_config=self.run_config,
            )
            try:
                replies.append(self.client_app(msg, ctx))
            except Exception as exc:  # as a SuperNode does: the server gets an error reply
                if not self.errors_as_replies:
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                replies.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg))
        return replies

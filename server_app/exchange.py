"""Sending a round's messages and collecting the replies, without Flower's 3-second poll.

Flower 1.42's ``HttpGrid.send_and_receive`` (the grid a ServerApp gets under ``flwr run``, in
simulation and deployment alike) sleeps 3 s between pulls, so a round whose clients are done in
0.5 s still waits 3 s, and every round's time is rounded up to the next 3 s. Here the pulls start
at 20 ms apart and back off to 0.1 s: a round ends within about 0.1 s of its last reply, and a long
round costs ten small requests a second to the SuperLink. (With a 0.5 s cap a discrete round of the
default run waited 0.12 s on average from its last client's end to the server having the reply, with
0.1 s 0.03 s: rounds.jsonl's ``replies-in-s`` against ``last-client-end-s``, docs/speed.md.)
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message

FIRST_POLL_S = 0.02
MAX_POLL_S = 0.1
BACKOFF = 1.5


def send_and_receive(grid, messages: Iterable[Message], timeout: float | None) -> list[Message]:
    """Push ``messages``, then pull until every one has a reply or ``timeout`` seconds passed."""
    messages = list(messages)
    if not hasattr(grid, "push_messages"):  # an in-process grid answers at once
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    poll = FIRST_POLL_S
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if not pending:
            break
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        time.sleep(poll if left is None else min(poll, left))
        poll = min(poll * BACKOFF, MAX_POLL_S)
    return replies


def connected_nodes(grid, minimum: int, wait_s: float, settle_s: float = 2.0, limit_s: float = 30.0) -> list[int]:
    """The connected nodes once at least ``minimum`` are there and they stopped changing for
    ``settle_s``, or ``limit_s`` after there were enough (nodes register one by one); after
    ``wait_s`` with fewer, the ones there are (the caller says whether that is enough)."""
    start = time.time()
    nodes, stable_since, enough_since = None, start, None
    while True:
        now, t = sorted(grid.get_node_ids()), time.time()
        if now != nodes:
            nodes, stable_since = now, t
        if len(nodes) >= minimum:
            enough_since = t if enough_since is None else enough_since
            if t - stable_since >= settle_s or t - enough_since >= limit_s:
                return nodes
        elif t - start >= wait_s:
            return nodes
        else:
            enough_since = None
        time.sleep(0.2)

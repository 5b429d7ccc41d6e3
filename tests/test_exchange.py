"""The round's message exchange: every reply collected, the timeout kept, no fixed 3-second poll."""

import time
from types import SimpleNamespace

from server_app.exchange import send_and_receive


class SlowGrid:
    """Replies to message i become available ``delays[i]`` seconds after the push."""

    def __init__(self, delays):
        self.delays, self.pulls = delays, 0

    def push_messages(self, messages):
        self.t0 = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        now = time.monotonic() - self.t0
        ready = [i for i in ids if self.delays[int(i[1:])] <= now]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]


def test_collects_every_reply_soon_after_the_last_one_lands():
    grid = SlowGrid([0.0, 0.1, 0.3])
    t0 = time.monotonic()
    replies = send_and_receive(grid, ["a", "b", "c"], timeout=10)
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert 0.3 <= took < 1.0  # Flower's HttpGrid would take 3 s here (one sleep of 3 s)


def test_a_late_reply_is_collected_within_a_short_poll():
    """Backing off to 0.5 s made a reply landing at 1.5 s wait until 1.99 s; the 0.1 s cap keeps it
    within about 0.1 s (a default-run round is ~1.5 s: the wait was a sixth of it)."""
    grid = SlowGrid([1.5])
    t0 = time.monotonic()
    replies = send_and_receive(grid, ["a"], timeout=10)
    assert len(replies) == 1
    assert time.monotonic() - t0 < 1.5 + 0.3


def test_stops_at_the_timeout_with_what_arrived():
    grid = SlowGrid([0.0, 60.0])
    t0 = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - t0 < 1.0


def test_a_grid_without_push_and_pull_answers_in_one_call():
    class InProcess:
        def send_and_receive(self, messages, timeout=None):
            return [m.upper() for m in messages]

    assert send_and_receive(InProcess(), ["a", "b"], timeout=None) == ["A", "B"]

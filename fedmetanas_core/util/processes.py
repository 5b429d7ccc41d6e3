"""Processes by PID, read from /proc: the CLI, the benchmarks and the real-process tests stop
exactly the processes they started (never by name: other jobs share the machine)."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcessInfo:
    state: str  # R, S, Z (zombie), X (dead), ...
    ppid: int
    session: int
    start_ticks: str  # start time since boot: with the PID, names one process even after PID reuse


def process_info(pid: int) -> ProcessInfo | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces
    return ProcessInfo(fields[0], int(fields[1]), int(fields[3]), fields[19])


def process_table() -> dict[int, ProcessInfo]:
    """Every process this user can read."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := process_info(int(entry))) is not None:
            table[int(entry)] = info
    return table


def descendants(pids: list[int], table: dict[int, ProcessInfo] | None = None) -> list[int]:
    """Children, grandchildren, ... of ``pids`` (not the pids themselves)."""
    children: dict[int, list[int]] = {}
    for pid, info in (table or process_table()).items():
        children.setdefault(info.ppid, []).append(pid)
    found, todo, seen = [], list(pids), set(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in seen:
                seen.add(child)
                found.append(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running (a zombie is dead for our purpose)."""
    info = process_info(pid)
    if info is None:
        try:  # /proc unreadable: ask the kernel
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return info.state not in ("Z", "X")


def stop_pids(pids: list[int], grace_s: float) -> None:
    """SIGTERM these processes (and only these), then SIGKILL the ones still alive after ``grace_s``;
    returns once they are gone (or a few seconds after the SIGKILL)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + grace_s
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for pid in filter(alive, pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 5
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)

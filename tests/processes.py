"""What /proc says about processes: states, parents, descendants (Linux)."""

from __future__ import annotations

import os
import select
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the parenthesised command name
    return fields[0], int(fields[1])


def all_processes() -> dict[int, tuple[str, int]]:
    """Every visible pid -> (state, parent pid)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                found[int(entry.name)] = stat
    return found


def descendants(root: int | None = None) -> dict[int, str]:
    """Every process below ``root`` (default: this one) -> its state (``Z`` for a zombie)."""
    root = os.getpid() if root is None else root
    table = all_processes()
    children: dict[int, list[int]] = {}
    for pid, (_, parent) in table.items():
        children.setdefault(parent, []).append(pid)
    found: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found[pid] = table[pid][0]
        stack.extend(children.get(pid, []))
    return found


def zombies(root: int | None = None) -> list[int]:
    """Zombies whose parent is ``root`` (default: this process) or one of its descendants."""
    return sorted(pid for pid, state in descendants(root).items() if state == "Z")


def gone(pid: int) -> bool:
    """True once ``pid`` is neither running nor a zombie (it exited and was reaped)."""
    return _stat(pid) is None


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def wait_exited(pid: int, timeout_s: float) -> bool:
    """Wait until process ``pid`` (any, not only a child) has exited: every thread of it, not only
    its main one, which /proc already shows as a zombie while the others still tear down. True
    once it has (or was gone already), False after ``timeout_s``."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)

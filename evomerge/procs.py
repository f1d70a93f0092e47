"""Which process is which: a process's start time tells it apart from a later one with its pid."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Optional

HOST = os.environ.get("EVOMERGE_HOST") or socket.gethostname()


def _machine_key(host: str) -> str:
    """The host name, boot id and pid namespace: equal for processes that see each other's pids."""
    parts = [host]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    except OSError:
        pass
    try:
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "|".join(parts)


MACHINE = _machine_key(HOST)


def process_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ended(pid: int, started: Optional[int]) -> bool:
    """Whether the process ``pid`` that started at ``started`` (None: unknown) has ended."""
    return process_start(pid) != started if started is not None else not pid_exists(pid)


def this_process_tag() -> str:
    """HOST-PID-START, unique to this process among every process that ever ran on this host."""
    return f"{HOST}-{os.getpid()}-{process_start(os.getpid()) or 0}"

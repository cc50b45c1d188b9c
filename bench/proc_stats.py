"""CPU time of processes from Linux /proc, for the benches that say where CPU goes (bench_ledger.py,
bench_scale.py). Not a bench itself."""

from __future__ import annotations

import os
import pathlib

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # after the ")" that ends the command name, which may hold spaces
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used; 0.0 once it is gone."""
    try:
        fields = _stat_fields(pid)
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


def children() -> dict[int, list[int]]:
    """parent pid -> the pids of its live children, read once for the whole machine."""
    found: dict[int, list[int]] = {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    return found


def cpu_seconds_below(pid: int, below: dict[int, list[int]] | None = None) -> float:
    """cpu_seconds of pid and every live process below it (`below`: children(), read once)."""
    below = children() if below is None else below
    return cpu_seconds(pid) + sum(cpu_seconds_below(child, below) for child in below.get(pid, ()))

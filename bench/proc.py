"""CPU used by processes, from Linux's /proc, for the benchmarks' per-process figures."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process and its children (PostgreSQL's
    backends are children of the postmaster)."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    totals = dict.fromkeys(pids, 0.0)
    owner = {pid: name for name, pid in pids.items()}
    for pid, seconds in used.items():
        name = owner.get(pid) or owner.get(parents.get(pid, -1))
        if name is not None:
            totals[name] += seconds
    return totals

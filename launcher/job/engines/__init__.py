"""Engines: how an actor process is started on a host that is not this one.

One interface, `Engine`, with one implementation per way of reaching a host: ssh.py (a hostfile's hosts,
over ssh) and slurm.py (the nodes of a Slurm allocation, as `srun` steps). A host names its engine
(`Host.engine`); the launcher plans and places processes the same way whatever the engine (plan.py,
hosts.py) and asks the host's engine only to wrap a command, to check its hosts before the job starts
and to say where a failed process ran. A third engine is one more module here and one line in ENGINES.
"""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Protocol

from launcher.job.engines import slurm, ssh

ENGINES = {"ssh": ssh.ENGINE, "slurm": slurm.ENGINE}
# the first line a remote process prints (engines that can name what ran it): "[engine] NAME: WHERE"
WHERE = re.compile(rf"^\[({'|'.join(ENGINES)})\] (\S+): (.+)$")


class Engine(Protocol):
    name: str

    def command(self, host, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
        """The command line that runs `argv` with `env` in `cwd` on `host` (what --dry-run prints)."""

    async def check(self, hosts: list) -> None:
        """Reach every host once before anything starts; HostsError names each that fails."""


def engine_for(host) -> Engine:
    try:
        return ENGINES[host.engine]
    except KeyError:
        raise ValueError(f"host {host.name}: unknown engine {host.engine!r} (known: {', '.join(ENGINES)})") from None


async def check_hosts(hosts: list) -> None:
    """Each engine checks its own hosts, all at once."""
    by_engine: dict[str, list] = {}
    for h in hosts:
        by_engine.setdefault(h.engine, []).append(h)
    await asyncio.gather(*(engine_for(hs[0]).check(hs) for hs in by_engine.values()))


def where(log_path: Path) -> str:
    """Where a remote process ran, from the line its engine's wrapper printed first ('' if none)."""
    last = ""
    try:
        with open(log_path, errors="replace") as f:  # streamed: a long run's log may be large
            for line in f:
                if line.startswith("[") and (m := WHERE.match(line.rstrip("\n"))):
                    last = f" ({m.group(3)})"
    except OSError:
        return ""
    return last

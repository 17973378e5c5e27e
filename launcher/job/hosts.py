"""Hostfiles and placement: which actor runs on which machine.

A hostfile lists one machine per line, MPI style::

    # head node first: the control actors run there
    localhost slots=1
    alice@node-1 slots=8     # slots = how many generators the host takes (e.g. its GPUs)
    node-2 gpus=8            # its GPUs, for the GPU placement (launcher.job.placement); default: detected
                             # on this machine, the slots on a remote host of a GPU job

`place` turns role counts into (role, index, host) triples: a role pinned in the config
(`actors.<role>.hosts`) goes round-robin over its pinned hosts; unpinned generators are spread over
all hosts in proportion to their slots; every other unpinned role runs on the first (head) host.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from actors.protocol import ROLES
from launcher.config.yaml_io import read_text

_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")
_KEYS = ("slots", "gpus")


class HostsError(ValueError):
    """A bad hostfile line or an impossible placement; the message names file:line or the config key."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int = 1
    user: str | None = None
    ssh_config: str | None = None  # `ssh -F FILE` (launcher --ssh-config): keys, known hosts, jump hosts
    gpus: int | None = None  # hostfile gpus=N; None = not said (launcher.job.placement.inventory decides)
    engine: str = "ssh"  # how a process starts there when it is not this machine (launcher.job.engines)

    @property
    def is_local(self) -> bool:
        """True when processes for this host start here, without ssh: a loopback name, this machine's
        hostname, or an address of one of its interfaces (e.g. the head node's own cluster address)."""
        n = self.name.lower()
        if n in ("localhost", "::1", "ip6-localhost") or n.startswith("127."):
            return True
        me = socket.gethostname().lower()
        return n == me or n == me.split(".")[0] or _is_own_address(n)

    @property
    def ssh_target(self) -> str:
        return f"{self.user}@{self.name}" if self.user else self.name

    def __str__(self) -> str:
        return self.ssh_target


LOCALHOST = Host("localhost")


@functools.lru_cache(maxsize=256)
def _is_own_address(name: str) -> bool:
    """Whether `name` is a literal address of this machine (only a local address can be bound)."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
                return True
        except OSError:
            continue
    return False


def parse_hosts_text(text: str, source: str = "<hosts>") -> list[Host]:
    """Parse hostfile text; every bad line is a `HostsError` naming source:line."""
    hosts: list[Host] = []
    first_line: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        target, *rest = line.split()
        user, at, name = target.rpartition("@")
        if at and not _USER.fullmatch(user):
            raise HostsError(f"{where}: bad user name {user!r} in {target!r}")
        if not _NAME.fullmatch(name):
            raise HostsError(f"{where}: bad host name {name!r}")
        opts: dict[str, str] = {}
        for tok in rest:
            key, eq, value = tok.partition("=")
            if not eq:
                raise HostsError(f"{where}: expected key=value after the host name, got {tok!r}")
            if key not in _KEYS:
                raise HostsError(f"{where}: unknown key {key!r} (known: {', '.join(_KEYS)})")
            if key in opts:
                raise HostsError(f"{where}: {key} given twice")
            opts[key] = value
        slots = 1
        if "slots" in opts:
            v = opts["slots"]
            if not re.fullmatch(r"[0-9]+", v) or int(v) < 1:
                raise HostsError(f"{where}: bad slots value {v!r}: expected an integer >= 1")
            slots = int(v)
        gpus = None
        if "gpus" in opts:
            v = opts["gpus"]
            if not re.fullmatch(r"[0-9]+", v):
                raise HostsError(f"{where}: bad gpus value {v!r}: expected an integer >= 0")
            gpus = int(v)
        key = name.lower()
        if key in first_line:
            raise HostsError(f"{where}: duplicate host {name!r} (first listed at line {first_line[key]})")
        first_line[key] = lineno
        hosts.append(Host(name, slots, user or None, gpus=gpus))
    if not hosts:
        raise HostsError(f"{source}: no hosts listed")
    return hosts


def parse_hosts(path: str | Path, ssh_config: str | None = None) -> list[Host]:
    hosts = parse_hosts_text(read_text(path, "hostfile", HostsError), str(path))
    if ssh_config is not None:
        if not Path(ssh_config).is_file():
            raise HostsError(f"--ssh-config: no such file {ssh_config!r}")
        hosts = [dataclasses.replace(h, ssh_config=str(Path(ssh_config).resolve())) for h in hosts]
    return hosts


def slot_env(host: Host, slot: int) -> dict[str, str]:
    """The environment of the `slot`-th generator on `host`: its own device. On a GPU host GPU
    `slot` (counted among the launcher's CUDA_VISIBLE_DEVICES for a local host); on a CPU host the
    variable is inert and BOBA_SLOTS gives it 1/slots of the cores (`launcher.job.compute.torch_threads`)."""
    index = slot % host.slots
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if host.is_local else ""
    ids = [d for d in visible.split(",") if d.strip()]
    return {"CUDA_VISIBLE_DEVICES": ids[index % len(ids)] if ids else str(index),
            "BOBA_SLOT": str(index), "BOBA_SLOTS": str(host.slots)}


def place(counts: dict[str, int], hosts: list[Host] | None = None,
          pinned: dict[str, list[str] | None] | None = None) -> list[tuple[str, int, Host]]:
    """Assign every actor instance a host; returns (role, index, host) in role order."""
    hosts = list(hosts) if hosts else [LOCALHOST]
    pinned = {r: h for r, h in (pinned or {}).items() if h}
    by_name = {h.name.lower(): h for h in hosts}
    for role in pinned:
        if role not in counts:
            raise HostsError(f"actors.{role}.hosts: pinned hosts for a role that is not placed "
                             f"(roles: {', '.join(counts)})")
    for role, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise HostsError(f"actors.{role}.count: expected an integer >= 0, got {n!r}")

    def resolve(role: str, name: str) -> Host:
        h = by_name.get(name.lower())
        if h is None:
            if Host(name).is_local:
                return Host(name)     # localhost needs no hostfile entry
            raise HostsError(f"actors.{role}.hosts: unknown host {name!r} "
                             f"(hostfile lists: {', '.join(x.name for x in hosts)})")
        return h

    roles = [r for r in ROLES if r in counts] + [r for r in counts if r not in ROLES]
    load = {h: 0 for h in hosts}   # generators per host, to spread them by slots
    out: list[tuple[str, int, Host]] = []
    for role in roles:
        targets = [resolve(role, n) for n in pinned[role]] if role in pinned else None
        for i in range(counts[role]):
            if targets is not None:
                h = targets[i % len(targets)]
            elif role == "generator":
                # least loaded relative to slots; ties go to the earlier host
                h = min(hosts, key=lambda x: ((load[x] + 1) / x.slots, hosts.index(x)))
            else:
                h = hosts[0]
            if role == "generator":
                load[h] = load.get(h, 0) + 1
            out.append((role, i, h))
    return out

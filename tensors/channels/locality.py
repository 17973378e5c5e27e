"""Which channel reaches a peer, decided in one place for every actor.

A process is known to its peers by the address of its host (`TensorOptions.host`: the hostfile's
name for the host, or the address this host uses to reach the bus). Every actor registers on the bus
with that address and its pid, so for any peer it can tell

    same process -> local      same host -> shm      other host -> zmq

and a zmq outbox binds on that address (or `bind`) and advertises it, so a peer on another host can
dial it. Two simulated hosts (network namespaces) share one /dev/shm but not an address: they talk
zmq, as two machines do.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from tensors.channels.base import Channel, Descriptor, Payload
from tensors.channels.outbox import DEFAULT_MAX_FRAME_BYTES, Curve

log = logging.getLogger("tensors.channels")

class Peer(Protocol):
    host: str
    pid: int


def choose_kind(same_process: bool, same_host: bool) -> str:
    """The cheapest channel for a peer: by reference, shared memory, or zmq (GPU bytes: tensors.channels)."""
    if same_process:
        return "local"
    return "shm" if same_host else "zmq"


def route_address(peer_host: str) -> str:
    """This host's address on the route to `peer_host` (no packet is sent: a UDP connect only
    picks the interface). Loopback for a loopback peer; the hostname where there is no route."""
    try:
        family = socket.AF_INET6 if ":" in peer_host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((peer_host, 9))
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def bus_host(bus_address: str) -> str:
    """The host part of tcp://HOST:PORT (brackets of an IPv6 address removed)."""
    rest = bus_address.split("://", 1)[-1]
    return rest.rpartition(":")[0].strip("[]") or rest


@dataclass(frozen=True)
class TensorOptions:
    """Where this process's tensor sockets live and how they are secured."""

    host: str  # the address peers know this host by; the registry's `host` for every actor here
    bind: str | None = None  # the interface the zmq outbox binds; None = `host`
    curve: Curve | None = None
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    pid: int = field(default_factory=os.getpid)

    @classmethod
    def for_bus(cls, bus_address: str, **kw) -> TensorOptions:
        """Options for a process that knows only the bus: its host is the address that reaches it."""
        return cls(host=route_address(bus_host(bus_address)), **kw)

    def zmq_opts(self) -> dict:
        bind = self.bind or self.host
        bind_host = f"[{bind}]" if ":" in bind else bind
        return {"bind": f"tcp://{bind_host}:0", "advertise": self.host, "curve": self.curve,
                "max_frame_bytes": self.max_frame_bytes}


class Channels:
    """An actor's tensor channels: one per kind, opened on first use, chosen per peer, closed together."""

    def __init__(self, options: TensorOptions):
        self.options = options
        self._open: dict[str, Channel] = {}
        self._said: set[tuple[str, str]] = set()  # (kind, peer host) pairs already logged

    @property
    def host(self) -> str:
        return self.options.host

    def kind_for(self, peers: Iterable[Peer]) -> str:
        """One kind that reaches every peer (the most general one any of them needs)."""
        kinds = {choose_kind(p.host == self.host and p.pid == self.options.pid, p.host == self.host) for p in peers}
        for kind in ("zmq", "shm", "local"):
            if kind in kinds:
                return kind
        raise ValueError("no peer to choose a channel for")

    def channel(self, kind: str) -> Channel:
        if kind not in self._open:
            from tensors.channels.kinds import open_channel

            self._open[kind] = open_channel(kind, **(self.options.zmq_opts() if kind == "zmq" else {}))
        return self._open[kind]

    async def send(self, payload: Payload, peers: list[Peer], *, timeout: float, reads: int = 1) -> Descriptor:
        """Offer `payload` to `peers` (each may read it `reads` times) for `timeout` seconds."""
        kind = self.kind_for(peers)
        desc = await self.channel(kind).send(payload, timeout=timeout, readers=len(peers) * reads)
        for host in sorted({p.host for p in peers} - {h for k, h in self._said if k == kind}):
            self._said.add((kind, host))
            log.info("tensors from %s to host %s travel over %s%s", self.host, host, kind,
                     f" (served at {desc['endpoint']})" if "endpoint" in desc else "")
        return desc

    def moved(self, descriptor: Descriptor) -> int | None:
        """Bytes of a zmq offer sent on their way to its reader so far (None: not pulled yet, or a kind
        without progress to tell), so a slow transfer is told from a stuck one."""
        ch = self._open.get("zmq") if isinstance(descriptor, dict) and descriptor.get("kind") == "zmq" else None
        return ch.moved(descriptor["id"]) if ch is not None else None

    async def recv(self, descriptor: Descriptor, *, timeout: float) -> Payload:
        """The payload a descriptor names, through a channel of its kind."""
        from tensors.channels.kinds import KINDS

        kind = descriptor.get("kind") if isinstance(descriptor, dict) else None
        if kind not in KINDS:
            raise ValueError(f"descriptor has channel kind {kind!r}; receivable here: " + ", ".join(KINDS))
        return await self.channel(kind).recv(descriptor, timeout=timeout)

    async def close(self) -> None:
        for channel in self._open.values():
            await channel.close()
        self._open.clear()

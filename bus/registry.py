"""The broker's table of live actors and their topic subscriptions (pure data, no sockets).

An actor is keyed by name; its ROUTER identity (the transport address) may change when it
reconnects, so a per-client session id decides whether a second registration of a name is the
same actor coming back (allowed: the identity is updated) or a different one (NameTaken).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from bus.errors import NameTaken, ProtocolError


@dataclass
class ActorInfo:
    name: str
    role: str
    host: str
    pid: int
    capabilities: dict = field(default_factory=dict)
    last_heartbeat: float = 0.0  # wall-clock time.time() of the last heartbeat the broker saw

    def to_wire(self) -> dict:
        return asdict(self)

    def membership(self) -> dict:
        """Body of the `joined` / `left` events."""
        return {"name": self.name, "role": self.role, "host": self.host, "pid": self.pid,
                "capabilities": self.capabilities}

    @classmethod
    def from_wire(cls, d: object) -> "ActorInfo":
        """Validate a registration body (or a listing entry) coming off the wire."""
        if not isinstance(d, dict):
            raise ProtocolError(f"actor info must be a map, got {type(d).__name__}")
        name, role, host, pid = d.get("name"), d.get("role"), d.get("host", ""), d.get("pid", 0)
        caps = d.get("capabilities", {})
        if type(name) is not str or not name or name.startswith("_") or len(name) > 256:
            raise ProtocolError(f"actor name must be a non-empty string not starting with '_', got {name!r:.80}")
        if type(role) is not str:
            raise ProtocolError(f"role of {name!r} must be a string, got {role!r:.80}")
        if type(host) is not str or type(pid) is not int:
            raise ProtocolError(f"host/pid of {name!r} must be str/int, got {host!r:.80}/{pid!r:.40}")
        if not isinstance(caps, dict):
            raise ProtocolError(f"capabilities of {name!r} must be a map, got {type(caps).__name__}")
        hb = d.get("last_heartbeat", 0.0)
        return cls(name, role, host, pid, caps, float(hb) if isinstance(hb, (int, float)) else 0.0)


@dataclass(eq=False)
class Entry:
    info: ActorInfo
    ident: bytes
    session: str
    ttl: float  # seconds of silence after which the actor counts as dead
    last_seen: float  # time.monotonic() of the last frame from it
    topics: set[str] = field(default_factory=set)


class Registry:
    def __init__(self) -> None:
        self.by_name: dict[str, Entry] = {}
        self.by_ident: dict[bytes, Entry] = {}
        self.subscribers: dict[str, dict[bytes, None]] = {}  # topic -> idents (ordered set)
        # role -> name -> entry: a listing by role (every generator asks for the packer and the verifiers,
        # per group) costs the role's members, not every actor's
        self.by_role: dict[str, dict[str, Entry]] = {}

    def register(self, ident: bytes, info: ActorInfo, session: str, ttl: float,
                 topics: list[str], now: float) -> tuple[Entry, bool]:
        """Add or refresh an actor; returns (entry, is_new). Raises NameTaken for a foreign session."""
        held = self.by_ident.get(ident)
        if held is not None and held.info.name != info.name:
            raise ProtocolError(f"connection already registered as {held.info.name!r}, cannot also be {info.name!r}")
        old = self.by_name.get(info.name)
        if old is not None and old.session != session:
            age = now - old.last_seen
            raise NameTaken(info.name, f"held by pid {old.info.pid} on host {old.info.host!r}, "
                                       f"heard from {age:.1f}s ago")
        if old is not None:
            self._drop(old)
        info.last_heartbeat = time.time()
        entry = Entry(info, ident, session, ttl, now)
        self.by_name[info.name] = entry
        self.by_ident[ident] = entry
        self.by_role.setdefault(info.role, {})[info.name] = entry
        for t in topics:
            self.subscribe(entry, t)
        return entry, old is None

    def subscribe(self, entry: Entry, topic: str) -> None:
        entry.topics.add(topic)
        self.subscribers.setdefault(topic, {})[entry.ident] = None

    def unsubscribe(self, entry: Entry, topic: str) -> None:
        entry.topics.discard(topic)
        subs = self.subscribers.get(topic)
        if subs is not None:
            subs.pop(entry.ident, None)
            if not subs:
                del self.subscribers[topic]

    def remove(self, entry: Entry) -> None:
        if self.by_name.get(entry.info.name) is entry:
            self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        del self.by_name[entry.info.name]
        if self.by_ident.get(entry.ident) is entry:
            del self.by_ident[entry.ident]
        members = self.by_role.get(entry.info.role)
        if members is not None and members.get(entry.info.name) is entry:
            del members[entry.info.name]
            if not members:
                del self.by_role[entry.info.role]
        for t in list(entry.topics):
            self.unsubscribe(entry, t)
        entry.topics = set()

    def expire(self, now: float) -> list[Entry]:
        """Remove and return every actor silent for longer than its ttl."""
        dead = [e for e in self.by_name.values() if now - e.last_seen > e.ttl]
        for e in dead:
            self._drop(e)
        return dead

    def actors(self, role: str | None = None) -> list[ActorInfo]:
        if role is None:
            return [e.info for e in self.by_name.values()]
        return [e.info for e in self.by_role.get(role, {}).values()]

"""The bus broker: one ROUTER socket, a registry of live actors, routing, pub/sub, heartbeats.

The routing loop is a tight synchronous poll loop (ZeroMQ guide, Paranoid Pirate broker) in a
thread of its own: it forwards application frames with one key added (the sender's registered role,
see `bus.envelope.stamp_role`), so the hot path is one decode, two dict lookups, one copy and one
send. `await start()` runs it beside an asyncio program; `python -m bus.broker --bind
tcp://127.0.0.1:5555` runs it as its own process.

The control plane cannot be impersonated: `joined` / `left` are published by the broker alone, and
each topic of `topic_owners` only by members registered with one of its roles; the messages of
`senders` are routed only from their sender roles; a name that is a role is taken only with that role;
with keys, a member registers only a role its CurveZMQ key's class allows (the table: bus/trust.py).
A refused message is dropped and its sender told (NotAllowed). Receivers check the stamped role too.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import socket
import threading
import time
import uuid

import zmq

from bus import envelope as E
from bus.envelope import Codec, decode
from bus.errors import (BusError, BusTimeout, MessageTooLarge, NameTaken, NotAllowed, PeerGone, ProtocolError,
                        error_body)
from bus.keys import CurveKeys, load_keys
from bus.registry import ActorInfo, Entry, Registry
from bus.trust import NAMED_ROLES, SENDERS, TOPIC_OWNERS

log = logging.getLogger("bus.broker")
MiB = 1 << 20
# plain ints: pyzmq's enum flags cost an enum operation per use on the hot path
NOBLOCK, SNDMORE_NOBLOCK = int(zmq.NOBLOCK), int(zmq.SNDMORE | zmq.NOBLOCK)
_send = zmq.backend.Socket.send  # the Cython send, skipping pyzmq's Python wrapper (~0.4 us a call)
LOOPBACK_HOSTS = {"localhost", "::1", "[::1]", "lo", "ip6-localhost"}
BROKER_TOPICS = ("joined", "left")  # membership events: published by the broker itself, never by a member


def is_loopback(endpoint: str) -> bool:
    """Whether `endpoint` only listens on this machine (ipc/inproc count as local)."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0]
    if ";" in host:  # "src;dst" form: the bind interface is the last part
        host = host.rsplit(";", 1)[1]
    return is_loopback_host(host)


def is_loopback_host(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (what needs no keys)."""
    return host.lower() in LOOPBACK_HOSTS or host.startswith("127.")


class _KeyCheck:
    """ZAP credentials provider: lets in only the authorised client public keys."""

    def __init__(self, allowed: frozenset[bytes]):
        self.allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.allowed
        if not ok:
            log.warning("refused a CURVE client with an unknown public key %s", key.decode(errors="replace"))
        return ok


class _RateLimitedLog:
    """Logs dropped frames without letting a flood of garbage flood the log."""

    def __init__(self, per_second: float = 20.0):
        self.rate, self.budget, self.stamp, self.suppressed = per_second, per_second, time.monotonic(), 0

    def __call__(self, msg: str, *args) -> None:
        now = time.monotonic()
        self.budget = min(self.rate, self.budget + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.budget >= 1.0:
            self.budget -= 1.0
            if self.suppressed:
                log.warning("(%d more dropped frames not logged)", self.suppressed)
                self.suppressed = 0
            log.warning(msg, *args)
        else:
            self.suppressed += 1


class Broker:
    def __init__(
        self,
        bind: str = "tcp://127.0.0.1:0",
        *,
        heartbeat_interval: float = 1.0,
        heartbeat_liveness: int = 3,
        max_message_bytes: int = 16 * MiB,
        curve: CurveKeys | None = None,
        insecure: bool = False,
        hwm: int = 100_000,
        topic_owners: dict[str, tuple[str, ...]] | None = None,
        senders: dict[str, tuple[str, ...]] | None = None,
        stats_every: float = 0.0,
    ):
        if heartbeat_interval <= 0 or heartbeat_liveness < 1:
            raise ValueError(f"heartbeat_interval must be > 0 and heartbeat_liveness >= 1, got "
                             f"{heartbeat_interval} / {heartbeat_liveness}")
        if max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {max_message_bytes}")
        if curve is None and not insecure and not is_loopback(bind):
            raise ValueError(
                f"refusing to bind the bus to {bind!r} without CurveZMQ keys: anyone on the network could "
                "join and send commands. Make keys with `python -m launcher keys DIR` and give them to the broker "
                "(curve=load_keys(DIR), or --keys DIR), or allow it on a trusted network (insecure=True, or --insecure)."
            )
        if curve is not None and curve.server_secret is None:
            raise ValueError("curve keys lack the broker's secret key (broker.key_secret) needed to serve")
        self.bind, self.curve, self.hwm = bind, curve, hwm
        self.heartbeat_interval, self.heartbeat_liveness = heartbeat_interval, heartbeat_liveness
        self.max_message_bytes = max_message_bytes
        # topic -> the roles that may publish it (none: the broker's own topics); other topics are free
        owners = TOPIC_OWNERS if topic_owners is None else topic_owners
        self.topic_owners = {t: frozenset(r) for t, r in owners.items()} | {t: frozenset() for t in BROKER_TOPICS}
        # message type -> the only roles it is routed from (other types: any member)
        self.senders = {t: frozenset(r) for t, r in (SENDERS if senders is None else senders).items()}
        self.session = uuid.uuid4().hex  # changes on every broker start; clients log it
        self.stats = {"received": 0, "routed": 0, "dropped": 0}
        self.stats_every = stats_every  # seconds between "stats" log lines (0 = none): load, for benches
        self._registry = Registry()
        self._codec = Codec()
        self._drop_log = _RateLimitedLog()
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._auth = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.address: str | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def open(self) -> str:
        """Bind the socket (errors surface here, in the caller's thread); returns the address."""
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sends to a vanished peer fail instead of vanishing
        sock.sndhwm = sock.rcvhwm = self.hwm
        # Hard guard: libzmq drops the connection of a peer sending more than this, unread.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_message_bytes + 65536)
        if self.curve is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("bus.broker.auth"))
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=_KeyCheck(self.curve.authorized))
            sock.curve_secretkey = self.curve.server_secret
            sock.curve_publickey = self.curve.server_public
            sock.curve_server = True
            if not self.curve.authorized:
                log.warning("curve keys authorise no client public key: no actor will be able to join")
        try:
            sock.bind(self.bind)
        except zmq.ZMQError as e:
            sock.close(0)
            self._close_context()
            raise BusError(f"broker cannot bind {self.bind!r}: {e}") from None
        self._sock = sock
        self.address = self._connectable(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        log.info("broker listening on %s (bind %s, curve %s, heartbeat %.3gs x %d)", self.address, self.bind,
                 "on" if self.curve else "off", self.heartbeat_interval, self.heartbeat_liveness)
        return self.address

    @staticmethod
    def _connectable(endpoint: str) -> str:
        scheme, _, rest = endpoint.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme == "tcp" and host in ("0.0.0.0", "*", "[::]", "::"):
            return f"tcp://{socket.gethostname()}:{port}"
        return endpoint

    async def start(self) -> str:
        """Bind and run the routing loop in a background thread; returns the address."""
        if self._thread is not None:
            raise RuntimeError("broker already started")
        self._stopping.clear()
        self.open()
        self._thread = threading.Thread(target=self.serve_forever, name="bus-broker", daemon=True)
        self._thread.start()
        return self.address

    async def stop(self, timeout: float = 5.0) -> None:
        import asyncio

        self._stopping.set()
        if self._thread is not None:
            deadline = time.monotonic() + timeout
            while self._thread.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if self._thread.is_alive():
                raise BusTimeout("broker loop", "stop", timeout)
            self._thread = None
        self._close_context()

    def _close_context(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    @property
    def registry(self) -> dict[str, ActorInfo]:
        """Snapshot, name -> ActorInfo, of the live actors."""
        entries = list(self._registry.by_name.values())  # atomic copy under the GIL
        return {e.info.name: dataclasses.replace(e.info) for e in entries}

    # ---- the routing loop ------------------------------------------------------------------
    def serve_forever(self) -> None:
        if self._sock is None:
            self.open()
        sock = self._sock
        # A blocking recv with a timeout instead of poll + non-blocking recv: no poll call per
        # message and no zmq.Again exception (costly in pyzmq) while messages keep coming.
        sock.rcvtimeo = max(1, int(min(50.0, self.heartbeat_interval * 250)))
        expire_every = self.heartbeat_interval / 4
        next_expiry = next_stats = time.monotonic() + expire_every
        recv, handle, monotonic, stopping, Again = sock.recv, self._handle, time.monotonic, self._stopping, zmq.Again
        stats = self.stats
        try:
            while not stopping.is_set():
                try:
                    ident = recv()
                except Again:
                    ident = None
                now = monotonic()
                if ident is not None:
                    stats["received"] += 1
                    frame = recv(0, copy=False)  # the rest of a multipart message is already here
                    try:
                        if frame.more:
                            self._drop_rest(ident)
                        else:
                            handle(ident, frame, now)
                    except Exception:  # a bug handling one message must not stop the bus
                        self.stats["dropped"] += 1
                        log.exception("broker failed handling a frame from %s; dropped it", ident.hex())
                if now >= next_expiry:
                    next_expiry = now + expire_every
                    self._expire(now)
                    if self.stats_every and now >= next_stats:
                        next_stats = now + self.stats_every
                        log.info("stats at %.3f: received %d routed %d dropped %d actors %d", time.time(),
                                 stats["received"], stats["routed"], stats["dropped"], len(self._registry.by_name))
        except Exception:
            log.exception("broker loop crashed")
            raise
        finally:
            log.info("broker on %s stopped", self.address)

    def _drop_rest(self, ident: bytes) -> None:
        n = 2
        while self._sock.recv(0, copy=False).more:
            n += 1
        self._drop(ident, f"{n} frames, expected 1")

    def _handle(self, ident: bytes, frame: zmq.Frame, now: float) -> None:
        if len(frame) > self.max_message_bytes:
            return self._too_large(ident, frame)
        try:
            env = decode(frame)
        except ProtocolError as e:
            return self._drop(ident, e.reason)
        entry = self._registry.by_ident.get(ident)
        t = env.type
        if entry is None:
            if t == E.REGISTER:
                return self._register(ident, env, now, frame)
            if t in (E.REPLY, E.ERROR):
                return self._drop(ident, f"{t} from an unregistered connection")
            # Not registered (or the broker restarted): tell the client, which then re-registers.
            return self._reply(ident, env.cid, E.ERROR, {"kind": "UnknownSender", "message":
                               "this connection is not registered with the broker (did the broker restart?)"})
        entry.last_seen = now
        if env.src != entry.info.name:
            return self._drop(ident, f"src {env.src!r} does not match the registered name {entry.info.name!r}")
        if t[0] != "_":
            allowed = self.senders.get(t)
            if allowed is not None and entry.info.role not in allowed:
                return self._refuse(entry, env.cid, f"{t!r} to {env.dst!r}", allowed, "send")
            return self._route(entry, env, frame)
        if t == E.REPLY or t == E.ERROR:
            return self._route(entry, env, frame)
        if t == E.PUBLISH:
            owners = self.topic_owners.get(env.dst)
            if owners is not None and entry.info.role not in owners:
                return self._refuse(entry, 0, f"a publication on {env.dst!r}", owners, "publish")
            subs = self._registry.subscribers.get(env.dst)
            if subs:
                for sub in list(subs):
                    self._send(sub, frame)
            return
        if t == E.HEARTBEAT:
            entry.info.last_heartbeat = time.time()
            return self._reply(ident, env.cid, E.HEARTBEAT_ACK, None)
        if env.dst != E.BROKER or t not in E.BROKER_TYPES:
            exc = ProtocolError(f"unknown message type {t!r} for {env.dst!r}")
            self._drop(ident, exc.reason)
            return self._error(ident, env.cid, exc)
        try:
            self._command(entry, env)
        except BusError as e:
            if isinstance(e, ProtocolError):
                self._drop(ident, e.reason)
            self._error(ident, env.cid, e)

    def _route(self, entry: Entry, env: E.Envelope, frame: zmq.Frame) -> None:
        target = self._registry.by_name.get(env.dst)
        if target is None:
            if env.type == E.REPLY or env.type == E.ERROR:
                log.debug("reply from %s to departed %s dropped", entry.info.name, env.dst)
                return
            return self._error(entry.ident, env.cid, PeerGone(env.dst))
        if env.type[0] != "_":  # the receiver decides whom it serves by the role we registered, not a claim
            frame = E.stamp_role(frame, env, entry.info.role)
        problem = self._send(target.ident, frame)
        if problem and env.type[0] != "_":
            self._error(entry.ident, env.cid, PeerGone(env.dst) if problem == "gone" else
                        BusError(f"peer {env.dst!r} is not keeping up (its queue of {self.hwm} messages is full)"))
        else:
            self.stats["routed"] += 1

    def _send(self, ident: bytes, frame: bytes | zmq.Frame) -> str | None:
        """Send one frame; returns None, 'gone' (no such connection) or 'full' (peer's queue full)."""
        try:
            # With ROUTER_MANDATORY the identity part fails (nothing queued) if the peer is gone/full.
            _send(self._sock, ident, SNDMORE_NOBLOCK)
            _send(self._sock, frame, NOBLOCK)
            return None
        except zmq.Again:
            return "full"
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                return "gone"
            raise

    def _refuse(self, entry: Entry, cid: int, what: str, roles: frozenset, verb: str) -> None:
        who = f"members of role {', '.join(sorted(roles))}" if roles else "the broker"
        exc = NotAllowed(entry.info.name, what,
                         f"it is registered with role {entry.info.role!r}; only {who} may {verb} it")
        self._drop(entry.ident, str(exc))
        self._error(entry.ident, cid, exc)

    def _may_register(self, info: ActorInfo, frame: zmq.Frame) -> None:
        """Raise NotAllowed unless the connection's key (ZAP's User-Id: its z85 public key) may
        register `info.role`, and a name that is a role is taken with that role."""
        if info.name in NAMED_ROLES and info.role != info.name:
            raise NotAllowed(info.name, f"registration as role {info.role!r}",
                             f"the name {info.name!r} is reserved for the member of role {info.name!r}")
        if self.curve is not None:
            key = frame.get("User-Id")
            roles = self.curve.roles_of(key)
            if info.role not in roles:
                raise NotAllowed(info.name, f"registration as role {info.role!r}",
                                 f"its CurveZMQ key {key[:8]}... may register only {', '.join(sorted(roles)) or 'nothing'}"
                                 f" (each role needs its own key: bus/trust.py KEY_ROLES)")

    def _reply(self, ident: bytes, cid: int, type: str, body) -> None:
        self._send(ident, self._codec.pack(type, E.BROKER, "", cid, body))

    def _error(self, ident: bytes, cid: int, exc: BusError) -> None:
        self._reply(ident, cid, E.ERROR, error_body(exc))

    def _drop(self, ident: bytes, reason: str) -> None:
        self.stats["dropped"] += 1
        entry = self._registry.by_ident.get(ident)
        who = repr(entry.info.name) if entry else f"connection {ident.hex()}"
        self._drop_log("dropped a frame from %s: %s", who, reason)

    def _too_large(self, ident: bytes, frame: zmq.Frame) -> None:
        exc = MessageTooLarge(len(frame), self.max_message_bytes)
        self._drop(ident, str(exc))
        entry = self._registry.by_ident.get(ident)
        if entry is not None:
            try:
                cid = decode(frame).cid
            except ProtocolError:
                cid = 0
            self._error(ident, cid, exc)

    # ---- broker commands -------------------------------------------------------------------
    def _register(self, ident: bytes, env: E.Envelope, now: float, frame: zmq.Frame) -> None:
        body = env.body
        try:
            if not isinstance(body, dict):
                raise ProtocolError(f"register body must be a map, got {type(body).__name__}")
            info = ActorInfo.from_wire(body.get("info"))
            session, hb, topics = body.get("session"), body.get("heartbeat_interval"), body.get("topics", [])
            if type(session) is not str or not session:
                raise ProtocolError(f"register of {info.name!r} lacks a session id")
            if not isinstance(hb, (int, float)) or not 0 < hb <= 3600:
                raise ProtocolError(f"register of {info.name!r}: heartbeat_interval {hb!r:.40} not in (0, 3600]")
            if not isinstance(topics, list) or not all(type(t) is str for t in topics):
                raise ProtocolError(f"register of {info.name!r}: topics must be a list of strings")
            if env.src != info.name:
                raise ProtocolError(f"register src {env.src!r} differs from the name {info.name!r}")
            self._may_register(info, frame)
            ttl = self.heartbeat_liveness * max(self.heartbeat_interval, float(hb))
            entry, is_new = self._registry.register(ident, info, session, ttl, topics, now)
        except ProtocolError as e:
            self._drop(ident, e.reason)
            return self._error(ident, env.cid, e)
        except (NameTaken, NotAllowed) as e:
            log.warning("refused registration: %s", e)
            return self._error(ident, env.cid, e)
        self._reply(ident, env.cid, E.REPLY, {
            "broker_session": self.session, "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_liveness": self.heartbeat_liveness, "max_message_bytes": self.max_message_bytes,
        })
        if is_new:
            log.info("joined: %s (role %s, host %s, pid %d)", info.name, info.role, info.host, info.pid)
            self.publish("joined", info.membership())
        else:
            log.info("re-registered: %s (new connection)", info.name)

    def _command(self, entry: Entry, env: E.Envelope) -> None:
        t, body, ident = env.type, env.body, entry.ident
        if t == E.SUBSCRIBE or t == E.UNSUBSCRIBE:
            topic = body.get("topic") if isinstance(body, dict) else None
            if type(topic) is not str or not topic:
                raise ProtocolError(f"{t} needs a body {{topic: str}}, got {body!r:.80}")
            (self._registry.subscribe if t == E.SUBSCRIBE else self._registry.unsubscribe)(entry, topic)
            return self._reply(ident, env.cid, E.REPLY, None)
        if t == E.ACTORS:
            role = body.get("role") if isinstance(body, dict) else None
            if role is not None and type(role) is not str:
                raise ProtocolError(f"actors query role must be a string, got {role!r:.80}")
            return self._reply(ident, env.cid, E.REPLY, [i.to_wire() for i in self._registry.actors(role)])
        if t == E.BYE:
            self._registry.remove(entry)
            self._reply(ident, env.cid, E.REPLY, None)
            log.info("left: %s (said goodbye)", entry.info.name)
            return self.publish("left", {**entry.info.membership(), "reason": "bye"})
        if t == E.REGISTER:
            raise ProtocolError(f"connection already registered as {entry.info.name!r}")

    def publish(self, topic: str, body) -> None:
        """Publish from the broker itself (only from the broker thread, or before start)."""
        subs = self._registry.subscribers.get(topic)
        if subs:
            frame = self._codec.pack(E.PUBLISH, E.BROKER, topic, 0, body)
            for sub in list(subs):
                self._send(sub, frame)

    def _expire(self, now: float) -> None:
        for e in self._registry.expire(now):
            log.warning("left: %s (no heartbeat for %.2fs)", e.info.name, now - e.last_seen)
            self.publish("left", {**e.info.membership(), "reason": "expired"})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bus.broker", description="Run the bus broker.")
    p.add_argument("--bind", default="tcp://127.0.0.1:5555")
    p.add_argument("--heartbeat-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-liveness", type=int, default=3)
    p.add_argument("--max-message-bytes", type=int, default=16 * MiB)
    p.add_argument("--keys", help="CurveZMQ key directory (from `python -m launcher keys DIR`)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without keys")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--stats-every", type=float, default=0.0, help="seconds between stats log lines (0 = none)")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        broker = Broker(a.bind, heartbeat_interval=a.heartbeat_interval, heartbeat_liveness=a.heartbeat_liveness,
                        max_message_bytes=a.max_message_bytes, curve=load_keys(a.keys) if a.keys else None,
                        insecure=a.insecure, stats_every=a.stats_every)
        broker.open()
    except (ValueError, BusError, OSError) as e:
        raise SystemExit(f"bus.broker: {e}") from None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker._stopping.set())
    print(f"BROKER {broker.address}", flush=True)  # machine-readable line for launchers and tests
    try:
        broker.serve_forever()
    finally:
        broker._close_context()


if __name__ == "__main__":
    main()

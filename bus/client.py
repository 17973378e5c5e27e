"""The asyncio bus client (one DEALER socket to the broker) that every actor uses.

The socket is a plain pyzmq DEALER watched with `loop.add_reader` on its FD and drained in
batches with non-blocking receives: this is what `zmq.asyncio` does underneath, minus a Future
per message, which measured ~1.5x faster round trips (see bench/bus.py). ZeroMQ's FD is
edge-like, so after every send we re-check ZMQ_EVENTS and drain anything the send uncovered.

Liveness follows the Paranoid Pirate pattern: a heartbeat every `heartbeat_interval`; if the
broker stays silent for `heartbeat_liveness` intervals the socket is rebuilt and the client
registers again; an "unknown sender" answer (broker restarted) triggers the same at once. Only
the broker can give that answer: the same words from a peer (whose frames carry its own name as
`src`, checked by the broker) are an ordinary error of that peer's reply.

A handler may be limited to senders of some roles (`on(type, handler, from_roles=...)`): the role
is the one the broker registered for the sender and stamped on the message, not anything it claims.

Over 500 lines on purpose: sending, receiving, liveness and dispatch all work on the one socket and
its pending-request table; they are one class, and a split would only pass that state between files.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket as _socket
import time
import types
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import zmq

from bus import envelope as E
from bus.deadlines import Deadlines
from bus.envelope import Codec, decode_trusted
from bus.errors import BusError, BusTimeout, MessageTooLarge, NameTaken, PeerGone, ProtocolError, RemoteError
from bus.errors import error_body, error_from_body
from bus.registry import ActorInfo

log = logging.getLogger("bus.client")

# Contexts of clients not yet closed. A client dropped without close() would otherwise have its
# context collected before its socket (the garbage collector clears the context's weak list of
# sockets first), and zmq's term() would then wait forever for that socket inside the collector.
_OPEN_CONTEXTS: set[zmq.Context] = set()
MiB = 1 << 20
# plain ints: pyzmq's enum flags cost an enum operation per use on the hot path
NOBLOCK, EVENTS, POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
_send = zmq.backend.Socket.send  # the Cython send, skipping pyzmq's Python wrapper (~0.4 us a call)
Handler = Callable[[Any, str], Any]  # (body, src) -> reply body | None, or an awaitable of it
Callback = Callable[[str, Any, str], Any]  # (topic, body, src)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future
    dst: str
    type: str
    timeout: float
    deadline: float  # loop.time()
    frame: bytes


class BusClient:
    def __init__(
        self,
        address: str,
        name: str,
        role: str,
        *,
        host: str | None = None,
        pid: int | None = None,
        capabilities: dict | None = None,
        heartbeat_interval: float = 1.0,
        heartbeat_liveness: int = 3,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        max_message_bytes: int = 16 * MiB,
        curve_server_key: bytes | None = None,
        curve_client_keys: tuple[bytes, bytes] | None = None,
        hwm: int = 100_000,
    ):
        if not isinstance(name, str) or not name or name.startswith("_"):
            raise ValueError(f"actor name must be a non-empty string not starting with '_', got {name!r}")
        if heartbeat_interval <= 0 or heartbeat_liveness < 1:
            raise ValueError(f"heartbeat_interval must be > 0 and heartbeat_liveness >= 1, got "
                             f"{heartbeat_interval} / {heartbeat_liveness}")
        if (curve_server_key is None) != (curve_client_keys is None):
            raise ValueError("CurveZMQ needs both curve_server_key and curve_client_keys (or neither)")
        self.address, self.name, self.role = address, name, role
        self.info = ActorInfo(name, role, host or _socket.gethostname(), os.getpid() if pid is None else pid,
                              dict(capabilities or {}))
        self.heartbeat_interval, self.heartbeat_liveness = heartbeat_interval, heartbeat_liveness
        self.request_timeout, self.connect_timeout = request_timeout, connect_timeout
        self.max_message_bytes = max_message_bytes
        self.curve_server_key, self.curve_client_keys, self.hwm = curve_server_key, curve_client_keys, hwm
        self.session = uuid.uuid4().hex  # tells the broker a re-registration is this same client
        self.broker_session: str | None = None
        self._codec = Codec()
        self._cids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._parked: list[int] = []  # requests the broker bounced as "unknown sender": resent on re-register
        self._handlers: dict[str, Handler] = {}
        self._from_roles: dict[str, frozenset[str]] = {}  # type -> the only sender roles served
        self._subs: dict[str, list[Callback]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ctx: zmq.Context | None = None
        self._sock: zmq.Socket | None = None
        self._fd: int | None = None
        self._registered: asyncio.Event | None = None
        self._deadlines: Deadlines | None = None
        self._heartbeat_task: asyncio.Task | None = None
        self._rereg_task: asyncio.Task | None = None
        self._last_heard = 0.0
        self._closing = False
        self._recheck = False

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def registered(self) -> bool:
        return self._registered is not None and self._registered.is_set()

    async def connect(self, timeout: float | None = None) -> None:
        """Connect and register; raises NameTaken, or BusTimeout if the broker never answers."""
        if self._loop is not None:
            raise RuntimeError(f"bus client {self.name!r} already connected")
        self._loop = asyncio.get_running_loop()
        self._registered = asyncio.Event()
        self._deadlines = Deadlines(self._loop, self._pending, self._expire)
        self._ctx = zmq.Context()
        _OPEN_CONTEXTS.add(self._ctx)
        self._open_socket()
        try:
            await self._register(self.connect_timeout if timeout is None else timeout)
        except BaseException:
            await self.close()
            raise
        self._heartbeat_task = self._loop.create_task(self._heartbeat_loop(), name=f"bus-heartbeat-{self.name}")

    async def close(self, timeout: float = 1.0) -> None:
        """Say goodbye to the broker (so `left` is published at once) and release the socket."""
        if self._closing or self._loop is None:
            return
        self._closing = True
        for t in (self._heartbeat_task, self._rereg_task):
            if t is not None:
                t.cancel()
        if self.registered:
            try:
                await self._call(E.BROKER, E.BYE, None, timeout, "goodbye ack")
            except BusError as e:
                log.debug("%s: goodbye to broker not acknowledged: %s", self.name, e)
        self._registered.clear()
        if self._deadlines is not None:
            self._deadlines.close()
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.set_exception(BusError(f"bus client {self.name!r} closed before {p.dst!r} replied"))
        self._pending.clear()
        tasks = [t for t in (*self._tasks, self._heartbeat_task, self._rereg_task) if t is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self._close_socket()
        if self._ctx is not None:
            self._ctx.term()
            _OPEN_CONTEXTS.discard(self._ctx)
            self._ctx = None

    async def __aenter__(self) -> "BusClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _open_socket(self) -> None:
        s = self._ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndhwm = s.rcvhwm = self.hwm
        if self.curve_server_key is not None:
            s.curve_serverkey = self.curve_server_key
            s.curve_publickey, s.curve_secretkey = self.curve_client_keys
        s.connect(self.address)
        self._sock, self._fd = s, s.getsockopt(zmq.FD)
        self._loop.add_reader(self._fd, self._on_readable)
        self._last_heard = time.monotonic()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._loop.remove_reader(self._fd)
            self._sock.close(0)
            self._sock = self._fd = None

    # ---- sending ---------------------------------------------------------------------------
    def _send_frame(self, frame: bytes) -> None:
        if not self._try_send(frame):
            raise BusError(f"send queue of {self.name!r} to the broker at {self.address} is full "
                           f"({self.hwm} messages): is the broker reachable?")

    def _try_send(self, frame: bytes) -> bool:
        """False when zmq would block: a full queue, or no pipe at all while the connection is
        re-made (after a refused CurveZMQ handshake there is none for a moment)."""
        sock = self._sock
        if sock is None:
            raise BusError(f"bus client {self.name!r} is not connected")
        try:
            _send(sock, frame, NOBLOCK)
        except zmq.Again:
            return False
        if not self._recheck:  # the send may have swallowed the FD's edge: look once this loop turn
            self._recheck = True
            self._loop.call_soon(self._on_readable)
        return True

    def _pack(self, type: str, dst: str, cid: int, body: Any) -> bytes:
        frame = self._codec.pack(type, self.name, dst, cid, body)
        if len(frame) > self.max_message_bytes:
            raise MessageTooLarge(len(frame), self.max_message_bytes)
        return frame

    async def request(self, dst: str, type: str, body: Any = None, timeout: float | None = None) -> Any:
        """Send `type` to `dst` and return its reply body (BusTimeout / PeerGone / RemoteError)."""
        _check_user_type(type)
        if not dst:
            raise ValueError("request needs a destination actor name")
        return await self._call(dst, type, body, self.request_timeout if timeout is None else timeout)

    async def _call(self, dst: str, type: str, body: Any, timeout: float, phase: str | None = None) -> Any:
        if self._loop is None or self._closing and type != E.BYE:
            raise BusError(f"bus client {self.name!r} is not connected")
        deadline = self._loop.time() + timeout
        if type != E.REGISTER and not self._registered.is_set():
            try:
                await asyncio.wait_for(self._registered.wait(), timeout)
            except asyncio.TimeoutError:
                raise BusTimeout(_peer_label(dst, self.address), phase or f"reply to {type!r}", timeout,
                                 "this client is not registered with the broker: is the broker up?") from None
        cid = next(self._cids)
        frame = self._pack(type, dst, cid, body)
        fut = self._loop.create_future()
        self._pending[cid] = _Pending(fut, dst, phase or f"reply to {type!r}", timeout, deadline, frame)
        self._deadlines.add(cid, deadline)
        try:
            while not self._try_send(frame):  # a request waits for a pipe until its own deadline
                await asyncio.wait([fut], timeout=0.02)
                if fut.done():
                    break
            return await fut
        finally:
            self._pending.pop(cid, None)

    def _expire(self, cid: int) -> None:
        p = self._pending.pop(cid, None)
        if p is not None and not p.future.done():
            hint = ""
            if p.dst == E.BROKER:
                hint = "is the broker running there? with CurveZMQ, does this client hold the right keys?"
            p.future.set_exception(BusTimeout(_peer_label(p.dst, self.address), p.type, p.timeout, hint))

    async def send(self, dst: str, type: str, body: Any = None) -> None:
        """One-way message; a missing destination is logged when the broker reports it."""
        _check_user_type(type)
        if not dst:
            raise ValueError("send needs a destination actor name")
        self._send_frame(self._pack(type, dst, 0, body))

    async def publish(self, topic: str, body: Any = None) -> None:
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic must be a non-empty string, got {topic!r}")
        self._send_frame(self._pack(E.PUBLISH, topic, 0, body))

    def subscribe(self, topic: str, callback: Callback) -> Awaitable[None]:
        """Call `callback(topic, body, src)` for every publication on `topic`.

        Returns a future that completes once the broker has recorded the subscription; awaiting
        it is optional (before connect() the topics travel with the registration)."""
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic must be a non-empty string, got {topic!r}")
        first = topic not in self._subs
        self._subs.setdefault(topic, []).append(callback)
        return self._topic_command(E.SUBSCRIBE, topic) if first else self._done()

    def unsubscribe(self, topic: str) -> Awaitable[None]:
        if self._subs.pop(topic, None) is None or topic == "left":  # the client itself needs `left`
            return self._done()
        return self._topic_command(E.UNSUBSCRIBE, topic)

    def _topic_command(self, type: str, topic: str) -> Awaitable[None]:
        if not self.registered:
            return self._done()
        fut = asyncio.ensure_future(self._call(E.BROKER, type, {"topic": topic}, self.connect_timeout))
        fut.add_done_callback(_log_failure)
        return fut

    def _done(self) -> "Awaitable[None]":
        return _READY

    def on(self, type: str, handler: Handler, *, from_roles: tuple[str, ...] | None = None) -> None:
        """Serve messages of `type` with `handler(body, src)`; its return value is the reply.

        With `from_roles`, a sender registered with another role is refused (a RemoteError to a
        request). It stays in force when `type` gets another handler without `from_roles` (a wrapper)."""
        _check_user_type(type)
        if isinstance(from_roles, str):
            raise ValueError(f"from_roles of {type!r} must be a tuple of role names, got the string {from_roles!r}")
        self._handlers[type] = handler
        if from_roles is not None:
            self._from_roles[type] = frozenset(from_roles)

    async def actors(self, role: str | None = None, timeout: float | None = None) -> list[ActorInfo]:
        t = self.connect_timeout if timeout is None else timeout
        listing = await self._call(E.BROKER, E.ACTORS, {"role": role}, t, "actors listing")
        return [ActorInfo.from_wire(d) for d in listing]

    # ---- registration and liveness ---------------------------------------------------------
    async def _register(self, timeout: float) -> None:
        body = {"info": self.info.to_wire(), "session": self.session,
                "heartbeat_interval": self.heartbeat_interval, "topics": sorted({*self._subs, "left"})}
        reply = await self._call(E.BROKER, E.REGISTER, body, timeout, "registration reply")
        if not isinstance(reply, dict):
            raise ProtocolError(f"broker answered register with {reply!r:.80}")
        limit = reply.get("max_message_bytes")
        if isinstance(limit, int) and limit > 0:
            self.max_message_bytes = min(self.max_message_bytes, limit)
        if self.broker_session is not None and reply.get("broker_session") != self.broker_session:
            log.info("%s: broker at %s restarted; registered again", self.name, self.address)
        self.broker_session = reply.get("broker_session")
        self._registered.set()
        parked, self._parked = self._parked, []
        for cid in parked:  # requests the restarted broker bounced before we re-registered
            p = self._pending.get(cid)
            if p is not None:
                self._send_frame(p.frame)

    def _need_register(self) -> None:
        self._registered.clear()
        if not self._closing and (self._rereg_task is None or self._rereg_task.done()):
            self._rereg_task = self._loop.create_task(self._reregister(), name=f"bus-reregister-{self.name}")

    async def _reregister(self) -> None:
        window = self.heartbeat_interval * self.heartbeat_liveness
        started, attempts = time.monotonic(), 0
        while not self._closing:
            attempts += 1
            level = logging.WARNING if attempts == 1 or attempts % 20 == 0 else logging.DEBUG
            try:
                await self._register(window)
                log.info("%s: registered again with the broker after %.2fs", self.name, time.monotonic() - started)
                return
            except NameTaken as e:
                log.log(level, "%s: cannot re-register: %s; retrying", self.name, e)
                await asyncio.sleep(self.heartbeat_interval)
            except BusTimeout:
                log.log(level, "%s: broker at %s does not answer (%.1fs so far); rebuilding the socket",
                        self.name, self.address, time.monotonic() - started)
                self._close_socket()
                self._open_socket()
            except BusError as e:
                log.log(level, "%s: re-registration failed: %s", self.name, e)
                await asyncio.sleep(self.heartbeat_interval)

    async def _heartbeat_loop(self) -> None:
        interval, window = self.heartbeat_interval, self.heartbeat_interval * self.heartbeat_liveness
        while not self._closing:
            await asyncio.sleep(interval)
            if not self._registered.is_set():
                continue  # _reregister owns the socket meanwhile
            silent = time.monotonic() - self._last_heard
            if silent > window:
                log.warning("%s: broker at %s silent for %.2fs; reconnecting", self.name, self.address, silent)
                self._close_socket()
                self._open_socket()
                self._need_register()
                continue
            try:
                self._send_frame(self._codec.pack(E.HEARTBEAT, self.name, E.BROKER, 0, None))
            except BusError as e:
                log.warning("%s: heartbeat not sent: %s", self.name, e)

    # ---- receiving -------------------------------------------------------------------------
    def _on_readable(self) -> None:
        # Drain while ZMQ_EVENTS says POLLIN (cheaper than running into zmq.Again, which costs
        # an exception); reading EVENTS also re-arms the FD for the next wake-up. Replies sent by
        # handlers during the drain need no extra check: the next EVENTS read covers them.
        sock = self._sock
        if sock is None:
            return
        recv, dispatch, events = sock.recv, self._dispatch, sock.getsockopt
        self._recheck = True
        try:
            for _ in range(1024):  # bounded, so a flood cannot starve the rest of the loop
                if not events(EVENTS) & POLLIN:
                    return
                dispatch(recv(NOBLOCK))
                if self._sock is not sock:
                    return
            self._loop.call_soon(self._on_readable)
        except zmq.ZMQError as e:
            log.debug("%s: recv failed: %s", self.name, e)
        finally:
            self._recheck = False

    def _dispatch(self, frame: bytes) -> None:
        self._last_heard = time.monotonic()
        try:
            env = decode_trusted(frame)
        except ProtocolError as e:
            log.warning("%s: dropped a bad frame from the broker: %s", self.name, e.reason)
            return
        t = env.type
        if t == E.REPLY:
            p = self._pending.get(env.cid)
            if p is not None and p.dst == env.src and not p.future.done():
                p.future.set_result(env.body)
        elif t == E.ERROR:
            self._on_error(env)
        elif t == E.PUBLISH:
            self._on_publish(env)
        elif t == E.HEARTBEAT_ACK:
            pass
        else:
            self._on_message(env)

    def _on_error(self, env: E.Envelope) -> None:
        body = env.body
        if env.src == E.BROKER and isinstance(body, dict) and body.get("kind") == "UnknownSender":
            p = self._pending.get(env.cid)
            if p is not None and p.type == "registration reply":
                p.future.set_exception(BusError("broker refused registration as unknown sender"))
                return
            if p is not None and p.type == "goodbye ack":  # the broker forgot us already: done
                p.future.set_result(None)
                return
            if p is not None:
                self._parked.append(env.cid)
            if self._registered.is_set() or p is None:
                log.warning("%s: broker at %s does not know this client (restarted?); registering again",
                            self.name, self.address)
            self._need_register()
            return
        exc = error_from_body(body, env.src or "broker")
        p = self._pending.get(env.cid) if env.cid else None
        if p is not None and env.src in (p.dst, E.BROKER) and not p.future.done():
            p.future.set_exception(exc)
        else:
            log.warning("%s: %s", self.name, exc)

    def _on_publish(self, env: E.Envelope) -> None:
        topic = env.dst
        if topic == "left" and env.src == E.BROKER and isinstance(env.body, dict):
            gone = env.body.get("name")
            for p in list(self._pending.values()):  # nobody will answer these: fail them now
                if p.dst == gone and not p.future.done():
                    p.future.set_exception(PeerGone(gone))
        for cb in self._subs.get(topic, ()):
            try:
                r = cb(topic, env.body, env.src)
                if asyncio.iscoroutine(r):
                    self._spawn(_guard(r, f"{self.name}: subscriber of {topic!r}"))
            except Exception:
                log.exception("%s: subscriber of %r failed", self.name, topic)

    def _on_message(self, env: E.Envelope) -> None:
        h = self._handlers.get(env.type)
        if h is None:
            if env.cid:
                self._reply_error(env, RemoteError(self.name, env.type, f"no handler for {env.type!r}"))
            else:
                log.warning("%s: no handler for one-way %r from %r", self.name, env.type, env.src)
            return
        roles = self._from_roles.get(env.type)
        if roles is not None and env.role not in roles:
            exc = RemoteError(self.name, env.type, f"refused {env.type!r} from {env.src!r}: its registered role "
                              f"is {env.role!r}, and only role {' or '.join(sorted(roles))} may send it")
            log.warning("%s: %s", self.name, exc.message)
            if env.cid:
                self._reply_error(env, exc)
            return
        try:
            r = h(env.body, env.src)
        except Exception as e:
            return self._handler_failed(env, e)
        if asyncio.iscoroutine(r):
            # Run the handler eagerly up to its first real suspension (as Python 3.12's eager
            # tasks do): a handler that never waits is answered without creating a Task.
            try:
                yielded = r.send(None)
            except StopIteration as stop:
                r = stop.value
            except Exception as e:
                return self._handler_failed(env, e)
            else:
                return self._spawn(self._finish(env, _resume(r, yielded)))
        if env.cid:
            self._reply(env, r)

    async def _finish(self, env: E.Envelope, coro: Awaitable) -> None:
        try:
            r = await coro
        except Exception as e:
            return self._handler_failed(env, e)
        if env.cid:
            self._reply(env, r)

    def _handler_failed(self, env: E.Envelope, e: Exception) -> None:
        log.error("%s: handler for %r from %r raised %s: %s", self.name, env.type, env.src,
                  type(e).__name__, e, exc_info=e)
        if env.cid:
            self._reply_error(env, RemoteError(self.name, env.type, f"{type(e).__name__}: {e}"))

    def _reply(self, env: E.Envelope, body: Any) -> None:
        try:
            self._send_frame(self._pack(E.REPLY, env.src, env.cid, body))
        except (MessageTooLarge, ProtocolError) as e:
            self._reply_error(env, RemoteError(self.name, env.type, f"reply could not be sent: {e}"))
        except BusError as e:
            log.warning("%s: reply to %r for %r lost: %s", self.name, env.src, env.type, e)

    def _reply_error(self, env: E.Envelope, exc: BusError) -> None:
        try:
            self._send_frame(self._pack(E.ERROR, env.src, env.cid, error_body(exc)))
        except BusError as e:
            log.warning("%s: error reply to %r lost: %s", self.name, env.src, e)

    def _spawn(self, coro) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def in_flight(self) -> int:
        """Handler tasks still running (the Actor waits for these on a graceful stop)."""
        return len(self._tasks)

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` for running handlers to finish; True if they all did."""
        tasks = set(self._tasks)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        return all(t.done() for t in tasks)


@types.coroutine
def _resume(coro, yielded):
    """Continue driving `coro`, already started and suspended on `yielded` (yield from, by hand)."""
    while True:
        try:
            sent = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:
            try:
                yielded = coro.throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as stop:
                return stop.value


class _Ready:
    """An awaitable that is already done (usable before any event loop runs)."""

    def __await__(self):
        return None
        yield


_READY = _Ready()


def _check_user_type(type: str) -> None:
    if not isinstance(type, str) or not type or type.startswith("_") or len(type) > E.MAX_NAME:
        raise ValueError(f"message type must be a non-empty string not starting with '_', got {type!r}")


def _peer_label(dst: str, address: str) -> str:
    return f"broker at {address}" if dst == E.BROKER else dst


async def _guard(coro: Awaitable, what: str) -> None:
    try:
        await coro
    except Exception:
        log.exception("%s failed", what)


def _log_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("bus topic command failed: %s", fut.exception())

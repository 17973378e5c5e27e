"""The sender's outbox served over ZeroMQ, and the receiver's pull.

Sender: a ROUTER socket served by its own thread (so a busy event loop, e.g. a training step, never
stalls a transfer).  It holds frames per transfer id, answers ``GET <id>`` with
``OK, *frames`` sent zero-copy, drops an entry after its readers pulled it or its time to live
passed, and (for channels whose readers must say they are done, like CUDA IPC) waits for
``DONE <id>`` before releasing.

Receiver: DEALER connections (kept per endpoint between pulls) with a socket monitor, so a sender
that dies mid-transfer is noticed from the disconnect rather than by waiting out the timeout.
ZeroMQ delivers a multipart message whole or not at all, so a cut transfer never yields a
half-filled payload.

Limits, so that no peer can grow our memory: the outbox takes requests of at most
``MAX_REQUEST_BYTES`` and queues at most ``REQUEST_HWM`` of them; a puller takes frames of at most
``max_frame_bytes`` (a larger one drops the connection: TransferError, never an allocation).
With a `Curve` both sides speak CurveZMQ: the outbox serves with its key pair and lets in only the
authorised client keys (ZAP), the puller dials with its pair and the server key the descriptor names.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
import zmq.utils.z85
from zmq.utils.monitor import parse_monitor_message

from tensors.errors import TransferError

log = logging.getLogger(__name__)
_POLL_MS = 100
MAX_REQUEST_BYTES = 4096  # a request is ``verb, transfer id``
REQUEST_HWM = 1024
_TRACKED = 64  # replies whose progress is kept (Outbox.moved)
DEFAULT_MAX_FRAME_BYTES = 4 << 30  # the largest tensor of a 7B model is ~1.1 GB


@dataclass(frozen=True)
class Curve:
    """CurveZMQ identity of a process's tensor sockets (z85 or raw 32-byte keys)."""

    public: bytes
    secret: bytes
    authorized: frozenset[bytes]  # client public keys an outbox lets in


class _KeyCheck:
    """ZAP credentials provider: only the authorised client keys get in."""

    def __init__(self, authorized: frozenset[bytes]):
        self.authorized = {_z85(k) for k in authorized}

    def callback(self, domain: str, key: bytes) -> bool:
        return _z85(key) in self.authorized


def _z85(key: bytes) -> bytes:
    return zmq.utils.z85.encode(key) if len(key) == 32 else key


@dataclass
class _Entry:
    frames: list[Any]
    deadline: float
    ttl: float
    readers_left: int
    needs_done: bool
    on_release: Callable[[], None] | None
    outstanding: int = 0  # pulled, DONE not yet received


class Outbox:
    """Frames waiting to be pulled, served by a background thread."""

    def __init__(self, bind: str = "tcp://127.0.0.1:0", advertise: str | None = None, curve: Curve | None = None):
        self._ctx = zmq.Context()
        self._auth = None
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        # replies are zero-copy references to payloads the outbox holds anyway: never drop one under load;
        # what a peer can make us queue is its requests, bounded in size and number
        self._sock.sndhwm = 0
        self._sock.rcvhwm = REQUEST_HWM
        self._sock.maxmsgsize = MAX_REQUEST_BYTES
        self.server_key = None
        try:
            if curve is not None:
                from zmq.auth.thread import ThreadAuthenticator

                self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger(__name__ + ".auth"))
                self._auth.start()
                self._auth.configure_curve_callback("*", credentials_provider=_KeyCheck(curve.authorized))
                self._sock.curve_secretkey, self._sock.curve_publickey = curve.secret, curve.public
                self._sock.curve_server = True
                self.server_key = _z85(curve.public).decode()
            self._sock.bind(bind[:-2] + ":*" if bind.startswith("tcp://") and bind.endswith(":0") else bind)
        except zmq.ZMQError:
            self._sock.close()
            if self._auth is not None:
                self._auth.stop()
            self._ctx.term()
            raise
        self.endpoint = _connectable(self._sock.getsockopt_string(zmq.LAST_ENDPOINT), advertise)
        self._entries: dict[str, _Entry] = {}
        # tid -> (frame sizes, their trackers) of the last replies: how far a pull's bytes have gone
        self._sent: collections.OrderedDict[str, tuple[list[int], list[Any]]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"outbox {self.endpoint}", daemon=True)
        self._thread.start()

    def put(
        self,
        tid: str,
        frames: list[Any],
        *,
        ttl: float,
        readers: int,
        needs_done: bool = False,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        with self._lock:
            self._entries[tid] = _Entry(frames, time.monotonic() + ttl, ttl, readers, needs_done, on_release)

    def moved(self, tid: str) -> int | None:
        """Bytes of the last reply for ``tid`` that zmq has handed to the kernel (frame by frame), or None
        when none was sent: a slow pull is alive while this grows."""
        with self._lock:
            sent = self._sent.get(tid)
        if sent is None:
            return None
        return sum(n for n, t in zip(*sent) if t is None or t.done)

    def delivered(self, tid: str) -> bool:
        """Whether the last reply for ``tid`` was sent and zmq has passed all of its bytes on."""
        with self._lock:
            sent = self._sent.get(tid)
        return sent is not None and all(t is None or t.done for t in sent[1])

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        for e in entries:
            _release(e)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    # ---- the serving thread ----
    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if poller.poll(_POLL_MS):
                    while True:
                        try:
                            msg = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(msg)
                self._expire()
        except Exception:  # keep the reason in the log; pulls then time out with a clear error
            log.exception("outbox %s stopped", self.endpoint)
        finally:
            self._sock.close(linger=0)

    def _handle(self, msg: list[bytes]) -> None:
        if len(msg) != 3:
            return
        ident, verb, raw_tid = msg
        tid = raw_tid.decode(errors="replace")
        released = None
        with self._lock:
            e = self._entries.get(tid)
            if e is None:
                reply = [b"ERR", b"unknown transfer id: expired, already pulled by all readers, or never sent"]
            elif verb == b"GET" and e.readers_left > 0:
                e.readers_left -= 1
                e.outstanding += e.needs_done
                e.deadline = max(e.deadline, time.monotonic() + e.ttl)  # room to finish and say DONE
                reply = [b"OK", *e.frames]
            elif verb == b"DONE" and e.outstanding > 0:
                e.outstanding -= 1
                reply = [b"OK"]
            else:
                reply = [b"ERR", b"bad request " + verb + b" for this transfer"]
            if e is not None and e.readers_left == 0 and e.outstanding == 0:
                released = self._entries.pop(tid)
        self._track(tid, self.send_reply(ident, reply), reply)
        if released is not None:
            _release(released)

    def send_reply(self, ident: bytes, frames: list[Any]) -> list[Any] | None:
        """Send [ident, *frames], payload buffers zero-copy (a seam for fault-injection tests) -> a tracker
        per frame (None for one zmq copied), done once zmq has passed its bytes on."""
        self._sock.send(ident, zmq.SNDMORE)
        trackers = []
        for i, f in enumerate(frames):
            t = self._sock.send(f, zmq.SNDMORE if i < len(frames) - 1 else 0, copy=False, track=True)
            trackers.append(t if isinstance(t, zmq.MessageTracker) else None)
        return trackers

    def _track(self, tid: str, trackers: list[Any] | None, frames: list[Any]) -> None:
        if not trackers or frames[0] != b"OK":
            return
        sizes = [len(f) if isinstance(f, zmq.Frame) else memoryview(f).nbytes for f in frames]
        with self._lock:
            self._sent[tid] = (sizes, trackers)
            while len(self._sent) > _TRACKED:
                self._sent.popitem(last=False)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            gone = [t for t, e in self._entries.items() if e.deadline < now]
            expired = [self._entries.pop(t) for t in gone]
        for e in expired:
            _release(e)


def _release(e: _Entry) -> None:
    e.frames = []
    if e.on_release is not None:
        try:
            e.on_release()
        except Exception:
            log.exception("releasing an outbox entry failed")


def _connectable(endpoint: str, advertise: str | None) -> str:
    """Replace a wildcard bind address by one that peers can connect to."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if advertise:
        host = advertise
    elif host in ("0.0.0.0", "*", "[::]"):
        host = socket.gethostbyname(socket.gethostname())
    return f"tcp://{host}:{port}"


class _Conn:
    """One DEALER to one outbox, with a monitor telling whether the link is up."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, max_frame_bytes: int,
                 curve: Curve | None, server_key: str | None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.maxmsgsize = max_frame_bytes
        if server_key is not None:
            assert curve is not None
            self.sock.curve_serverkey = server_key.encode()
            self.sock.curve_publickey, self.sock.curve_secretkey = curve.public, curve.secret
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self.connected = self.dropped = False
        self.refused: str | None = None  # why the outbox's CurveZMQ handshake turned us away
        self.sock.connect(endpoint)

    def drain_events(self) -> None:
        """Apply monitor events that arrived while the connection was idle."""
        while True:
            try:
                msg = _resolved(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            self._apply(parse_monitor_message(msg)["event"])

    def _apply(self, event: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            self.refused = "the outbox refused this process's CurveZMQ key"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self.refused = "the security handshake failed (CurveZMQ on one side only, or the wrong server key?)"
        elif event == zmq.EVENT_CONNECTED:
            self.connected = True
        elif event == zmq.EVENT_DISCONNECTED:
            self.connected, self.dropped = False, True

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


def _resolved(msg: Any) -> Any:
    """zmq.asyncio's NOBLOCK recv returns a finished future; plain sockets return the frames."""
    return msg.result() if hasattr(msg, "result") else msg


class Puller:
    """Pulls from outboxes, keeping idle connections per endpoint (a fresh connect costs ~0.5 ms).

    A connection goes back to the pool only after a complete reply; after a timeout or error it is
    closed, so a late reply can never be taken for the next transfer's.  Use from one event loop.
    """

    def __init__(self, max_endpoints: int = 32, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 curve: Curve | None = None):
        self._ctx: zmq.asyncio.Context | None = None
        self._idle: collections.OrderedDict[tuple, list[_Conn]] = collections.OrderedDict()
        self._max_endpoints = max_endpoints
        self.max_frame_bytes, self.curve = max_frame_bytes, curve

    def _take(self, endpoint: str, server_key: str | None) -> _Conn:
        if self._ctx is None:
            self._ctx = zmq.asyncio.Context()
        pool = self._idle.get((endpoint, server_key))
        while pool:
            conn = pool.pop()
            conn.drain_events()
            if not conn.dropped:
                return conn
            conn.close()  # the peer went away while idle: start afresh
        return _Conn(self._ctx, endpoint, self.max_frame_bytes, self.curve, server_key)

    def _give_back(self, endpoint: tuple, conn: _Conn) -> None:
        pool = self._idle.setdefault(endpoint, [])
        self._idle.move_to_end(endpoint)
        if len(pool) >= 4:
            conn.close()
        else:
            pool.append(conn)
        while len(self._idle) > self._max_endpoints:
            for old in self._idle.popitem(last=False)[1]:
                old.close()

    async def request(self, endpoint: str, verb: bytes, tid: str, *, peer: str, timeout: float,
                      server_key: str | None = None) -> list[zmq.Frame]:
        """Send ``verb tid`` to an outbox and return the reply frames after ``OK``.

        Raises TransferError naming the phase: "connect" (nobody answered; with CurveZMQ also a
        handshake the outbox refused), "pull" (the peer went away or did not answer in time),
        "refused" (the outbox does not have the transfer) or "keys" (a Curve outbox, and we have none).
        """
        if server_key is not None and self.curve is None:
            raise TransferError(peer, tid, "keys", f"{endpoint} serves CurveZMQ and this process has no keys")
        deadline = time.monotonic() + timeout
        conn = self._take(endpoint, server_key)
        try:
            frames = await self._exchange(conn, endpoint, verb, tid, peer, timeout, deadline)
        except BaseException:
            conn.close()
            raise
        self._give_back((endpoint, server_key), conn)
        status = frames[0].bytes
        if status != b"OK":
            reason = frames[1].bytes.decode(errors="replace") if len(frames) > 1 else "no reason given"
            raise TransferError(peer, tid, "refused", reason)
        return frames[1:]

    @staticmethod
    async def _exchange(
        conn: _Conn, endpoint: str, verb: bytes, tid: str, peer: str, timeout: float, deadline: float
    ) -> list[zmq.Frame]:
        conn.dropped = False
        await conn.sock.send_multipart([verb, tid.encode()])
        poller = zmq.asyncio.Poller()
        poller.register(conn.sock, zmq.POLLIN)
        poller.register(conn.monitor, zmq.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                phase = "pull" if conn.connected else "connect"
                raise TransferError(peer, tid, phase, f"no reply from {endpoint} within {timeout}s")
            events = dict(await poller.poll(max(1, int(remaining * 1000))))
            if conn.sock in events:
                return await conn.sock.recv_multipart(copy=False)
            if conn.monitor in events:
                conn._apply(parse_monitor_message(await conn.monitor.recv_multipart())["event"])
                if conn.refused:
                    raise TransferError(peer, tid, "auth", f"{endpoint}: {conn.refused}")
                if conn.dropped:
                    if await conn.sock.poll(50):  # the reply may have landed just before the close
                        return await conn.sock.recv_multipart(copy=False)
                    raise TransferError(
                        peer, tid, "pull", f"{endpoint} disconnected before the reply was complete (sender died?)"
                    )

    def close(self) -> None:
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

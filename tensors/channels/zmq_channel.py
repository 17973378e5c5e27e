"""Any-host channel over ZeroMQ: the sender serves payloads from an outbox, the receiver pulls them.

Frames go out with copy=False straight from the tensors' memory and are decoded in place on the
receiving side, so the only copies are the kernel's.  The header carries every buffer's size, so a
cut or tampered transfer raises TransferError instead of producing a wrong payload; `checksum=True`
adds a crc32 per buffer for links you do not trust, and a `Curve` encrypts and authenticates
both ends (see outbox.py).
"""

from __future__ import annotations

from tensors import wire
from tensors.channels.base import (Channel, Descriptor, Payload,
                                    check_descriptor, check_payload, check_send_args, new_transfer_id)
from tensors.channels.outbox import DEFAULT_MAX_FRAME_BYTES, Curve, Outbox, Puller
from tensors.errors import TransferError, WireError


class ZmqChannel(Channel):
    kind = "zmq"

    def __init__(
        self,
        *,
        name: str | None = None,
        bind: str = "tcp://127.0.0.1:0",
        advertise: str | None = None,
        checksum: bool = False,
        curve: Curve | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ):
        """`bind`: where the outbox listens (e.g. tcp://0.0.0.0:0 for other hosts, with `advertise` the
        address peers should dial); it is bound on the first send."""
        super().__init__(name)
        self.bind, self.advertise, self.checksum, self.curve = bind, advertise, checksum, curve
        self._outbox: Outbox | None = None
        self._puller = Puller(max_frame_bytes=max_frame_bytes, curve=curve)

    @property
    def endpoint(self) -> str | None:
        return self._outbox.endpoint if self._outbox else None

    async def send(self, payload: Payload, *, timeout: float, readers: int = 1) -> Descriptor:
        check_payload(payload)
        check_send_args(timeout, readers)
        header, buffers = wire.encode(payload, checksum=self.checksum)
        if self._outbox is None:
            self._outbox = Outbox(self.bind, self.advertise, self.curve)
        tid = new_transfer_id()
        self._outbox.put(tid, [header, *buffers], ttl=timeout, readers=readers)
        nbytes = len(header) + sum(b.nbytes for b in buffers)
        desc = {"kind": self.kind, "id": tid, "src": self.name, "endpoint": self._outbox.endpoint, "nbytes": nbytes}
        if self._outbox.server_key is not None:
            desc["server_key"] = self._outbox.server_key
        return desc

    def moved(self, tid: str) -> int | None:
        """Bytes of the offer ``tid`` handed to the kernel so far (Outbox.moved); None before a pull."""
        return self._outbox.moved(tid) if self._outbox is not None else None

    async def recv(self, descriptor: Descriptor, *, timeout: float) -> Payload:
        peer, tid = check_descriptor(descriptor, self.kind, ("endpoint",), timeout)
        server_key = descriptor.get("server_key")
        if server_key is not None and not isinstance(server_key, str):
            raise TransferError(peer, tid, "descriptor", f"server_key must be a z85 string, got {server_key!r:.40}")
        frames = await self._puller.request(descriptor["endpoint"], b"GET", tid, peer=peer, timeout=timeout,
                                            server_key=server_key)
        if not frames:
            raise TransferError(peer, tid, "pull", "reply had no header frame")
        try:
            return wire.decode(frames[0].buffer, [f.buffer for f in frames[1:]])
        except WireError as e:
            raise TransferError(peer, tid, "decode", str(e)) from e

    def close_now(self) -> None:
        if self._outbox is not None:
            self._outbox.close()
            self._outbox = None
        self._puller.close()

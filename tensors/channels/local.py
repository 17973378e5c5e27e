"""Same-process channel: the payload is handed over by reference (no bytes move at all).

Actors living in one process share a LocalHub (by default the process-wide `DEFAULT_HUB`); the
descriptor only names the entry.  The receiver gets the very objects the sender sent.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from tensors.channels.base import (Channel, Descriptor, Payload,
                                    check_descriptor, check_payload, check_send_args, new_transfer_id)
from tensors.errors import TransferError


@dataclass
class _Entry:
    payload: Payload
    deadline: float
    readers_left: int


class LocalHub:
    """Payloads waiting for their readers in this process, dropped after their time to live."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def put(self, payload: Payload, ttl: float, readers: int) -> str:
        tid = new_transfer_id()
        with self._lock:
            self._expire()
            self._entries[tid] = _Entry(payload, time.monotonic() + ttl, readers)
        return tid

    def take(self, tid: str) -> Payload | None:
        with self._lock:
            self._expire()
            entry = self._entries.get(tid)
            if entry is None:
                return None
            entry.readers_left -= 1
            if entry.readers_left == 0:
                del self._entries[tid]
            return entry.payload

    def discard(self, tids: list[str]) -> None:
        with self._lock:
            for tid in tids:
                self._entries.pop(tid, None)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._entries)

    def _expire(self) -> None:
        now = time.monotonic()
        for tid in [t for t, e in self._entries.items() if e.deadline < now]:
            del self._entries[tid]


DEFAULT_HUB = LocalHub()


class LocalChannel(Channel):
    kind = "local"

    def __init__(self, *, hub: LocalHub | None = None, name: str | None = None):
        super().__init__(name)
        self.hub = hub if hub is not None else DEFAULT_HUB
        self._sent: list[str] = []

    async def send(self, payload: Payload, *, timeout: float, readers: int = 1) -> Descriptor:
        check_payload(payload)
        check_send_args(timeout, readers)
        tid = self.hub.put(payload, timeout, readers)
        self._sent.append(tid)
        if len(self._sent) > 4096:
            self._sent = self._sent[-1024:]
        return {"kind": self.kind, "id": tid, "src": self.name, "pid": os.getpid()}

    async def recv(self, descriptor: Descriptor, *, timeout: float) -> Payload:
        peer, tid = check_descriptor(descriptor, self.kind, ("pid",), timeout)
        if descriptor["pid"] != os.getpid():
            raise TransferError(
                peer, tid, "descriptor", f"was made in process {descriptor['pid']}, cannot be read in {os.getpid()}"
            )
        payload = self.hub.take(tid)
        if payload is None:
            raise TransferError(peer, tid, "take", "unknown transfer: expired, already taken, or another hub")
        return payload

    def close_now(self) -> None:
        self.hub.discard(self._sent)
        self._sent.clear()

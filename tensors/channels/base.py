"""The channel interface: the bytes of a payload travel over a channel, a small descriptor over the bus.

    descriptor = await channel.send(payload, timeout=60)     # returns at once; payload kept <= 60 s
    ... ship `descriptor` (a msgpack-able dict) over the bus ...
    payload = await channel.recv(descriptor, timeout=30)     # on the other side

`send`'s timeout is how long the payload stays available to its readers (its time to live); after
it a late `recv` gets TransferError("expired").  `recv`'s timeout bounds the whole receive.  A payload
is a PackedBatch or a dict of named tensors (e.g. a bucket of weights).  Zero-copy channels share
memory with the sender's tensors: do not modify a payload's tensors after sending it.
"""

from __future__ import annotations

import abc
import math
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Union

import torch

from tensors.errors import TransferError
from tensors.packed import PackedBatch

Payload = Union[PackedBatch, dict[str, torch.Tensor]]
Descriptor = dict[str, Any]


class Channel(abc.ABC):
    kind: ClassVar[str]

    def __init__(self, name: str | None = None):
        self.name = name or default_name()

    @abc.abstractmethod
    async def send(self, payload: Payload, *, timeout: float, readers: int = 1) -> Descriptor:
        """Make `payload` available to `readers` receivers for `timeout` seconds; return its descriptor."""

    @abc.abstractmethod
    async def recv(self, descriptor: Descriptor, *, timeout: float) -> Payload:
        """The payload a descriptor names; TransferError (never a hang) when it cannot be had in time."""

    async def close(self) -> None:
        """Release what the channel holds (sockets, segments); pending payloads become unavailable."""
        self.close_now()

    def close_now(self) -> None:
        """The synchronous part of close(), also safe from a finalizer."""

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def default_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def new_transfer_id() -> str:
    return uuid.uuid4().hex[:16]


def check_payload(payload: Any) -> None:
    if isinstance(payload, PackedBatch):
        return
    if isinstance(payload, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()
    ):
        return
    raise TypeError(f"a channel payload is a PackedBatch or a dict[str, Tensor], got {type(payload).__name__}")


def check_send_args(timeout: float, readers: int) -> None:
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if isinstance(readers, bool) or not isinstance(readers, int) or readers < 1:
        raise ValueError(f"readers must be a positive integer, got {readers!r}")


def check_descriptor(descriptor: Any, kind: str, required: tuple[str, ...], timeout: float) -> tuple[str, str]:
    """(peer, transfer id) of a well-formed descriptor of this kind; TransferError naming what is wrong."""
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(descriptor, Mapping):
        raise TransferError("?", "?", "descriptor", f"expected a dict, got {type(descriptor).__name__}")
    peer, tid = str(descriptor.get("src", "?")), str(descriptor.get("id", "?"))
    if descriptor.get("kind") != kind:
        raise TransferError(peer, tid, "descriptor", f"is for channel kind {descriptor.get('kind')!r}, not {kind!r}")
    missing = [k for k in ("id", "src", *required) if k not in descriptor]
    if missing:
        raise TransferError(peer, tid, "descriptor", f"lacks {missing}")
    return peer, tid

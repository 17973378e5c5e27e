"""NCCL through CuPy: a communicator with a watchdog, and broadcast from one rank to all as a Channel.

NCCL calls block forever when a peer dies.  Here every NCCL call is issued from its own thread and
watched from the event loop: completion is polled through a CUDA event, the communicator's async
error is checked, and on the deadline the communicator is aborted (ncclCommAbort), which fails the
pending work instead of hanging; the group is then unusable and must be created again with a fresh
unique id.  The unique id is plain bytes so the caller can ship it in a bus message:

    uid = nccl_unique_id()                                   # on rank 0; send it over the bus
    group = await NcclGroup.create(uid, world_size, rank, device=0, timeout=60)
    chan = NcclChannel(group=group)
    desc = await chan.send(weights_bucket, timeout=60, readers=world_size - 1)   # rank 0
    bucket = await chan.recv(desc, timeout=60)                                   # every other rank

Broadcasts are collective: every rank must issue them in the same order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tensors import wire
from tensors.channels.base import (Channel, Descriptor, Payload,
                                    check_descriptor, check_payload, check_send_args, new_transfer_id)
from tensors.channels.cuda_ipc import cuda_device, import_cupy, pack_layout
from tensors.errors import TransferError, WireError

log = logging.getLogger(__name__)
UNIQUE_ID_BYTES = 128
_NCCL_UINT8 = 1  # ncclUint8


def import_nccl() -> tuple[Any, Any]:
    cupy = import_cupy()
    try:
        from cupy.cuda import nccl
    except ImportError as e:
        raise RuntimeError("CuPy has no NCCL support here: pip install nvidia-nccl-cu12") from e
    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy was built without NCCL")
    return cupy, nccl


def nccl_unique_id() -> bytes:
    """A fresh NCCL unique id as 128 bytes (made by the rank that creates the group)."""
    _, nccl = import_nccl()
    return encode_unique_id(nccl.get_unique_id())


def encode_unique_id(uid: tuple[int, ...]) -> bytes:
    """CuPy's id (a tuple of 128 signed chars) as bytes."""
    if len(uid) != UNIQUE_ID_BYTES:
        raise ValueError(f"an NCCL unique id has {UNIQUE_ID_BYTES} entries, got {len(uid)}")
    return bytes(b & 0xFF for b in uid)


def decode_unique_id(data: bytes) -> tuple[int, ...]:
    """Bytes back into the tuple of signed chars NcclCommunicator expects."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != UNIQUE_ID_BYTES:
        got = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise ValueError(f"an NCCL unique id is {UNIQUE_ID_BYTES} bytes, got {got}")
    return tuple(b - 256 if b > 127 else b for b in data)


def _in_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """Run `fn` in a fresh daemon thread: an NCCL call that never returns must not hold a pool worker."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(result)

    def target() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:  # handed to the awaiting side
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop is gone; nobody is waiting any more
            pass

    threading.Thread(target=target, name="nccl-call", daemon=True).start()
    return fut


def _abort_late(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().abort()


class NcclGroup:
    """One NCCL communicator (this process's rank) whose every operation has a deadline."""

    def __init__(self, comm: Any, *, world_size: int, rank: int, device: torch.device, name: str):
        self._cupy, self._nccl = import_nccl()
        self._comm = comm
        self.world_size, self.rank, self.device, self.name = world_size, rank, device, name
        self._stream = torch.cuda.Stream(device)

    @classmethod
    async def create(
        cls,
        unique_id: bytes,
        world_size: int,
        rank: int,
        *,
        device: int | str | torch.device | None = None,
        timeout: float,
        name: str = "nccl",
    ) -> NcclGroup:
        """Join the group; TransferError("init") if not every rank joined within `timeout`."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a group of {world_size}")
        cupy, nccl = import_nccl()
        dev = cuda_device(device)
        uid = decode_unique_id(unique_id)

        def init() -> Any:
            with cupy.cuda.Device(dev.index):
                return nccl.NcclCommunicator(world_size, uid, rank)

        fut = _in_thread(init)
        try:
            comm = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            fut.add_done_callback(_abort_late)  # an init that completes later must not linger
            raise TransferError(
                name, "-", "init", f"rank {rank}: not all {world_size} ranks joined within {timeout}s"
            ) from None
        except Exception as e:
            raise TransferError(name, "-", "init", f"rank {rank}: {e}") from e
        return cls(comm, world_size=world_size, rank=rank, device=dev, name=name)

    @property
    def aborted(self) -> bool:
        return self._comm is None

    async def broadcast(self, buf: torch.Tensor, *, root: int, timeout: float, tid: str = "-") -> None:
        """Broadcast a contiguous uint8 CUDA tensor in place from `root` to every rank."""
        if buf.dtype != torch.uint8 or not buf.is_contiguous() or buf.device != self.device:
            raise ValueError(f"broadcast needs a contiguous uint8 tensor on {self.device}")
        if not 0 <= root < self.world_size:
            raise ValueError(f"root {root} is not in a group of {self.world_size}")
        count = buf.numel()
        buf.record_stream(self._stream)

        def enqueue(comm: Any, stream: int) -> None:
            comm.bcast(buf.data_ptr(), count, getattr(self._nccl, "NCCL_UINT8", _NCCL_UINT8), root, stream)

        await self._run(enqueue, f"broadcast from rank {root}", tid, timeout)

    async def _run(self, enqueue: Callable[[Any, int], None], phase: str, tid: str, timeout: float) -> None:
        comm = self._comm
        if comm is None:
            raise TransferError(self.name, tid, phase, "the communicator was aborted earlier; create a new group")
        deadline = time.monotonic() + timeout
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs made on the caller's stream
        event = torch.cuda.Event()

        def work() -> None:
            with self._cupy.cuda.Device(self.device.index):
                enqueue(comm, stream.cuda_stream)
            event.record(stream)

        try:
            await asyncio.wait_for(asyncio.shield(_in_thread(work)), max(0.0, deadline - time.monotonic()))
            delay = 0.0005
            while not event.query():
                comm.check_async_error()
                if time.monotonic() > deadline:
                    raise asyncio.TimeoutError
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.02)
        except asyncio.TimeoutError:
            self.abort()
            raise TransferError(
                self.name, tid, phase, f"not finished within {timeout}s on rank {self.rank}; communicator aborted"
            ) from None
        except Exception as e:
            self.abort()
            raise TransferError(self.name, tid, phase, f"NCCL failed on rank {self.rank}: {e}") from e

    def abort(self) -> None:
        """Abort the communicator: pending and blocked NCCL work fails instead of hanging."""
        comm, self._comm = self._comm, None
        if comm is not None:
            try:
                comm.abort()
            except Exception:
                log.exception("ncclCommAbort failed on rank %d", self.rank)

    def close(self) -> None:
        comm, self._comm = self._comm, None
        if comm is not None:
            comm.destroy()


class NcclChannel(Channel):
    """Broadcast channel: the sending rank is the root, every other rank of the group receives."""

    kind = "nccl"

    def __init__(self, *, group: NcclGroup, name: str | None = None):
        super().__init__(name or f"{group.name}:rank{group.rank}")
        self.group = group
        self._pending: asyncio.Future | None = None

    async def send(self, payload: Payload, *, timeout: float, readers: int = 1) -> Descriptor:
        """Start the broadcast and return its descriptor at once; `flush()` waits for it to finish."""
        check_payload(payload)
        check_send_args(timeout, readers)
        if readers != self.group.world_size - 1:
            raise ValueError(
                f"an NCCL broadcast reaches all {self.group.world_size - 1} other ranks; pass readers="
                f"{self.group.world_size - 1}, not {readers}"
            )
        await self.flush()
        header, tensors = wire.encode_tensors(payload)
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = pack_layout(sizes)
        flat = torch.empty(total, dtype=torch.uint8, device=self.group.device)
        for t, off, n in zip(tensors, offsets, sizes):
            if n:
                flat[off : off + n].copy_(t.reshape(-1).view(torch.uint8))
        tid = new_transfer_id()
        self._pending = asyncio.ensure_future(
            self.group.broadcast(flat, root=self.group.rank, timeout=timeout, tid=tid)
        )
        return {
            "kind": self.kind, "id": tid, "src": self.name, "root": self.group.rank,
            "header": header, "offsets": offsets, "nbytes": total,
        }  # fmt: skip

    async def recv(self, descriptor: Descriptor, *, timeout: float) -> Payload:
        peer, tid = check_descriptor(descriptor, self.kind, ("root", "header", "offsets", "nbytes"), timeout)
        await self.flush()
        try:
            header = wire.parse_header(descriptor["header"])
        except WireError as e:
            raise TransferError(peer, tid, "decode", str(e)) from e
        if len(descriptor["offsets"]) != len(header.entries):
            raise TransferError(peer, tid, "decode", "descriptor offsets do not match its header")
        flat = torch.empty(int(descriptor["nbytes"]), dtype=torch.uint8, device=self.group.device)
        await self.group.broadcast(flat, root=int(descriptor["root"]), timeout=timeout, tid=tid)
        try:
            return wire.decode(header, [flat[o : o + e.nbytes] for o, e in zip(descriptor["offsets"], header.entries)])
        except WireError as e:
            raise TransferError(peer, tid, "decode", str(e)) from e

    async def flush(self) -> None:
        """Wait for this rank's last broadcast (bounded by its own deadline); raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    async def close(self) -> None:
        """Wait for the last broadcast; the group itself belongs to its creator."""
        try:
            await self.flush()
        except TransferError as e:
            log.warning("last broadcast failed: %s", e)

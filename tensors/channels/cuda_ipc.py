"""Same-node GPU channel over CUDA IPC (via CuPy): the bytes never leave the GPUs.

The sender packs the payload into one block from cudaMalloc (an IPC handle names a whole
allocation, so a sub-block of torch's caching allocator cannot be shared safely), and serves the
block's IPC handle with the wire header from a zmq outbox.  The receiver opens the handle, copies
the block once into its own memory on its device, closes the handle and says DONE; the sender
frees the block after every reader said DONE, or after the time to live if a reader never came.
CuPy is imported when a channel is created, so the package imports without it.  Two channels of
one process cannot use this kind (CUDA refuses to open a handle in its own process): use "local".
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Any

import msgpack
import torch
from tensors import wire
from tensors.channels.base import (Channel, Descriptor, Payload,
                                    check_descriptor, check_payload, check_send_args, new_transfer_id)
from tensors.channels.outbox import Outbox, Puller
from tensors.errors import TransferError, WireError

log = logging.getLogger(__name__)
_ALIGN = 256
_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: unified addressing picks the direction


def import_cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("GPU channels need CuPy: pip install cupy-cuda12x (or cupy-cuda13x)") from e
    return cupy


def cuda_device(device: int | str | torch.device | None) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError("GPU channels need CUDA, and torch sees no CUDA device")
    if device is None:
        return torch.device("cuda", torch.cuda.current_device())
    dev = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if dev.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {dev}")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def pack_layout(sizes: list[int]) -> tuple[list[int], int]:
    offsets, off = [], 0
    for n in sizes:
        offsets.append(off)
        off = -(-(off + n) // _ALIGN) * _ALIGN
    return offsets, off


def _free(cupy: Any, device: int, ptr: int) -> None:
    with cupy.cuda.Device(device):
        cupy.cuda.runtime.free(ptr)


class CudaIpcChannel(Channel):
    kind = "cuda_ipc"

    def __init__(
        self,
        *,
        name: str | None = None,
        device: int | str | torch.device | None = None,
        bind: str = "tcp://127.0.0.1:0",
    ):
        super().__init__(name)
        self._cupy = import_cupy()
        self.device = cuda_device(device)
        self.bind = bind
        self._outbox: Outbox | None = None
        self._puller = Puller()

    async def send(self, payload: Payload, *, timeout: float, readers: int = 1) -> Descriptor:
        check_payload(payload)
        check_send_args(timeout, readers)
        header, tensors = wire.encode_tensors(payload)
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = pack_layout(sizes)
        rt, idx = self._cupy.cuda.runtime, self.device.index
        for dev in {t.device for t in tensors if t.is_cuda}:
            torch.cuda.current_stream(dev).synchronize()  # the producers' kernels have finished
        with self._cupy.cuda.Device(idx):
            ptr = rt.malloc(max(total, 1))
            try:
                stream = torch.cuda.current_stream(self.device).cuda_stream
                for t, off, n in zip(tensors, offsets, sizes):
                    if n:
                        rt.memcpyAsync(ptr + off, t.data_ptr(), n, _MEMCPY_DEFAULT, stream)
                rt.streamSynchronize(stream)
                handle = rt.ipcGetMemHandle(ptr)
            except BaseException:
                rt.free(ptr)
                raise
        if self._outbox is None:
            self._outbox = Outbox(self.bind)
        tid = new_transfer_id()
        info = msgpack.packb({"offsets": offsets, "total": total, "pid": os.getpid()})
        self._outbox.put(
            tid,
            [header, handle, info],
            ttl=timeout,
            readers=readers,
            needs_done=True,
            on_release=functools.partial(_free, self._cupy, idx, ptr),
        )
        return {"kind": self.kind, "id": tid, "src": self.name, "endpoint": self._outbox.endpoint, "nbytes": total}

    async def recv(self, descriptor: Descriptor, *, timeout: float) -> Payload:
        peer, tid = check_descriptor(descriptor, self.kind, ("endpoint",), timeout)
        deadline = time.monotonic() + timeout
        endpoint = descriptor["endpoint"]
        frames = await self._puller.request(endpoint, b"GET", tid, peer=peer, timeout=timeout)
        try:
            header = wire.parse_header(frames[0].bytes)
            handle, info = frames[1].bytes, msgpack.unpackb(frames[2].bytes)
            offsets, total = info["offsets"], info["total"]
        except (WireError, IndexError, KeyError, ValueError) as e:
            raise TransferError(peer, tid, "decode", f"malformed CUDA IPC reply: {e}") from e
        if info.get("pid") == os.getpid():
            raise TransferError(peer, tid, "open", "sender is this process: use the 'local' channel")
        out = torch.empty(total, dtype=torch.uint8, device=self.device)
        copy = asyncio.to_thread(self._copy_from_handle, handle, out, total)
        try:
            await asyncio.wait_for(copy, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise TransferError(peer, tid, "copy", f"device copy not finished within {timeout}s") from None
        except Exception as e:
            raise TransferError(peer, tid, "copy", f"CUDA IPC failed: {e}") from e
        try:  # the copy is ours now; a lost DONE only delays the sender's free until its time to live
            await self._puller.request(endpoint, b"DONE", tid, peer=peer, timeout=max(1.0, deadline - time.monotonic()))
        except TransferError as e:
            log.warning("could not tell %s that transfer %s is done: %s", peer, tid, e)
        try:
            return wire.decode(header, [out[o : o + e.nbytes] for o, e in zip(offsets, header.entries)])
        except WireError as e:
            raise TransferError(peer, tid, "decode", str(e)) from e

    def _copy_from_handle(self, handle: bytes, out: torch.Tensor, total: int) -> None:
        rt = self._cupy.cuda.runtime
        with self._cupy.cuda.Device(self.device.index):
            src = rt.ipcOpenMemHandle(handle)
            try:
                stream = torch.cuda.current_stream(self.device).cuda_stream
                if total:
                    rt.memcpyAsync(out.data_ptr(), src, total, _MEMCPY_DEFAULT, stream)
                rt.streamSynchronize(stream)
            finally:
                rt.ipcCloseMemHandle(src)

    def close_now(self) -> None:
        if self._outbox is not None:
            self._outbox.close()  # frees the blocks still waiting for readers
            self._outbox = None
        self._puller.close()

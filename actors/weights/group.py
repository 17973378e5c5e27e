"""Rank 0 of the weight-update group that SGLang servers join: a torch.distributed group of its own.

SGLang's servers join with ``sglang.srt.utils.init_custom_process_group(backend, init_method=
"tcp://MASTER:PORT", world_size, rank=rank_offset + tp_rank, group_name)``: a TCP rendezvous whose
store rank 0 hosts, a PrefixStore named after the group, and ``_new_process_group_helper``. The
trainer joins the same rendezvous the same way, so the group is never the process's default group
(a data-parallel learner group can own that) and the learner process needs no
``init_process_group``. ``nccl`` on GPUs, ``gloo`` on CPUs: the same calls.

Collectives block, so they run on one worker thread per group, in order, while the event loop
keeps serving the HTTP calls that make the servers receive. Every collective has the group's
timeout (torch raises when it runs out), and every wait here has a deadline that names the phase.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import logging
import socket

import torch
import torch.distributed as dist

log = logging.getLogger("actors.weights.group")


class GroupError(RuntimeError):
    """A rendezvous or collective of the weight-update group failed or ran out of time."""

    def __init__(self, group: str, phase: str, detail: str):
        self.group, self.phase = group, phase
        super().__init__(f"weight-update group {group!r}: {phase}: {detail}")


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def custom_process_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                         timeout: datetime.timedelta):
    """What sglang.srt.utils.common.init_custom_process_group does (0.5.23), for any rank."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore, _new_process_group_helper,
                                                    _world, rendezvous)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                      backend_options=None, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class TrainerGroup:
    """The trainer's side (rank 0) of one weight-update group: join, broadcast tensors in order, destroy."""

    def __init__(self, *, backend: str, master_address: str, master_port: int, world_size: int,
                 group_name: str, timeout: float):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight-update group backend {backend!r} must be nccl or gloo")
        self.backend, self.master_address, self.master_port = backend, master_address, master_port
        self.world_size, self.group_name, self.timeout = world_size, group_name, timeout
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        self._pg = None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"wgroup-{group_name}")

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_address}:{self.master_port}"

    async def _run(self, phase: str, deadline: float, fn, *args):
        fut = asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), deadline)
        except asyncio.TimeoutError:
            raise GroupError(self.group_name, phase, f"timed out after {deadline:g} s") from None
        except GroupError:
            raise
        except Exception as exc:
            raise GroupError(self.group_name, phase, f"{type(exc).__name__}: {exc}") from exc

    async def join(self) -> None:
        """Host the rendezvous as rank 0; returns once all world_size ranks joined (or raises)."""
        def join():
            self._pg = custom_process_group(self.backend, self.init_method, self.world_size, 0, self.group_name,
                                            datetime.timedelta(seconds=self.timeout))
        await self._run(f"rendezvous at {self.init_method} (world_size {self.world_size})",
                        self.timeout + 5.0, join)

    async def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """One broadcast from rank 0 per tensor, in list order, unpadded (what each server receives)."""
        def send():
            for t in tensors:
                dist.broadcast(t.detach().to(self.device).contiguous(), src=0, group=self._pg)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        if self._pg is None:
            raise GroupError(self.group_name, "broadcast", "the group was not joined")
        await self._run(f"broadcast of {len(tensors)} tensors", self.timeout + 5.0, send)

    async def destroy(self) -> None:
        """Leave the group: the peers' sockets close, so a server blocked receiving from us fails
        at once (gloo) instead of waiting out its timeout. Waits for a collective in flight first."""
        def destroy():
            pg, self._pg = self._pg, None
            if pg is not None:
                try:
                    dist.destroy_process_group(pg)
                except Exception as exc:  # already broken: it goes with its last reference
                    log.debug("destroying %s: %s", self.group_name, exc)
        try:
            await self._run("destroy", self.timeout + 5.0, destroy)
        except GroupError as exc:
            log.warning("%s", exc)
        self._thread.shutdown(wait=False)

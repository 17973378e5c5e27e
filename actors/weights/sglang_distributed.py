"""The weight-update session: the learner's new weights into every SGLang server over torch.distributed.

The broadcaster hands its sglang generators (those whose servers take weights "distributed") to
one SGLangWeightSync; torch generators keep the tensor-channel path. Per update, in SGLang
0.5.23's order (SGLANG.md):

  once per membership: POST /init_weights_update_group on every server (server i: rank_offset
      1 + sum of the tp sizes before it, world_size 1 + all server GPUs) concurrently with the
      trainer's own join as rank 0 (`TrainerGroup`, below);
  pause_generation -> begin_weight_update -> per bucket: POST /update_weights_from_distributed
      {names, dtypes, shapes, group_name, flush_cache: false, weight_version} while the trainer
      broadcasts each tensor from rank 0 in list order -> flush_cache (400 while busy: retried)
      -> end_weight_update -> continue_generation.

Failures: every call has a deadline. An attempt that fails anywhere is cleaned up on every
server (end, continue: none is left paused); a collective that failed leaves the group broken,
so the trainer destroys it (peers blocked on it fail at once with gloo) and the next attempt
forms a new one. A server that fails ``attempts`` times in a row, or stops answering /health, is
dropped from this update with a log line naming it, and the others go on without it.

The group (`TrainerGroup`): a torch.distributed group of its own.

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
import time
import urllib.parse
from dataclasses import dataclass

import torch
import torch.distributed as dist

from actors.generator.sglang.client import SGLangClient
from actors.generator.sglang.protocol import DEFAULT_GROUP, SGLangError, bucket_tensors, check_tensor_meta
from tensors.channels.locality import route_address

log = logging.getLogger("actors.weights.sglang_distributed")


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


@dataclass(frozen=True)
class Server:
    """One SGLang server in the group: the generator that owns it, its URL and its GPUs (tp size)."""
    name: str
    url: str
    tp_size: int = 1


class _Failed(Exception):
    def __init__(self, errors: dict[str, BaseException], broken: bool):
        self.errors, self.broken = errors, broken


def tensor_meta(weights: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in weights.items()]


class SGLangWeightSync:
    """One weight-update group over a changing set of SGLang servers, driven from the learner."""

    def __init__(self, *, backend: str = "gloo", group_name: str = DEFAULT_GROUP,
                 master_address: str | None = None, bucket_bytes: int = 1 << 30, pause_mode: str = "abort",
                 call_timeout: float = 60.0, collective_timeout: float = 120.0, attempts: int = 2):
        self.backend, self.group_name, self.master_address = backend, group_name, master_address
        self.bucket_bytes, self.pause_mode = bucket_bytes, pause_mode
        self.call_timeout, self.collective_timeout, self.attempts = call_timeout, collective_timeout, attempts
        self._clients: dict[Server, SGLangClient] = {}
        self._group: TrainerGroup | None = None
        self._members: tuple[Server, ...] = ()
        self._lock = asyncio.Lock()
        self._forms = 0  # groups formed so far (each gets a new name suffix and port)

    # ---- clients and the group

    async def _client(self, s: Server) -> SGLangClient:
        c = self._clients.get(s)
        if c is None:
            c = SGLangClient(s.url, control_timeout=self.call_timeout, update_timeout=self.collective_timeout,
                              health_timeout=self.call_timeout)
            await c.start(wait=False)
            self._clients[s] = c
        return c

    async def _teardown(self, servers: tuple[Server, ...] = ()) -> None:
        """Leave the group on our side first (unblocks its peers), then ask the servers to forget it."""
        group, self._group, members = self._group, None, self._members
        self._members = ()
        if group is None:
            return
        await group.destroy()
        await asyncio.gather(*(self._best_effort(s, "destroy_weights_group", group.group_name)
                               for s in members), return_exceptions=True)

    async def _form(self, members: tuple[Server, ...]) -> dict[str, BaseException]:
        """A new group of exactly `members`; returns the servers that could not join."""
        await self._teardown()
        self._forms += 1
        name = self.group_name if self._forms == 1 else f"{self.group_name}_{self._forms}"
        master = self.master_address or route_address(urllib.parse.urlsplit(members[0].url).hostname)
        world = 1 + sum(s.tp_size for s in members)
        group = TrainerGroup(backend=self.backend, master_address=master, master_port=free_port(),
                             world_size=world, group_name=name, timeout=self.collective_timeout)
        offsets, nxt = [], 1
        for s in members:
            offsets.append(nxt)
            nxt += s.tp_size
        log.info("forming weight-update group %s at %s: world_size %d, %s", name, group.init_method, world,
                 ", ".join(f"{s.name} ({s.url}) ranks {o}..{o + s.tp_size - 1}" for s, o in zip(members, offsets)))

        async def init(s: Server, offset: int):
            c = await self._client(s)
            await c.init_weights_group(master, group.master_port, offset, world, name, backend=self.backend,
                                       timeout=self.collective_timeout)
        results = await asyncio.gather(group.join(), *(init(s, o) for s, o in zip(members, offsets)),
                                       return_exceptions=True)
        errors = {s.name: r for s, r in zip(members, results[1:]) if isinstance(r, BaseException)}
        if isinstance(results[0], BaseException) or errors:
            self._group, self._members = group, members
            await self._teardown()
            if not errors:
                errors = {s.name: results[0] for s in members}
            return errors
        self._group, self._members = group, members
        return {}

    # ---- one update

    async def _best_effort(self, s: Server, call: str, *args) -> None:
        """A clean-up call with a short deadline; a failure is only logged (the server may be gone)."""
        try:
            client = await self._client(s)
            await getattr(client, call)(*args, timeout=min(10.0, self.call_timeout))
        except SGLangError as exc:
            log.warning("%s: %s", s.name, exc)

    async def _attempt(self, members: tuple[Server, ...], weights: dict[str, torch.Tensor], version: int) -> None:
        clients = {s: await self._client(s) for s in members}
        begun: set[Server] = set()

        async def start(s: Server):
            await clients[s].pause(self.pause_mode)
            await clients[s].begin_weight_update()
            begun.add(s)

        async def finish(s: Server):
            await clients[s].flush_cache()
            await clients[s].end_weight_update()
            begun.discard(s)
            await clients[s].resume()

        try:
            errors = _errors(members, await asyncio.gather(*(start(s) for s in members), return_exceptions=True))
            if errors:
                raise _Failed(errors, broken=False)
            buckets = bucket_tensors(tensor_meta(weights), self.bucket_bytes)
            for k, bucket in enumerate(buckets):
                log.info("weights v%d bucket %d/%d (%d tensors) to %d server(s)", version, k + 1, len(buckets),
                         len(bucket), len(members))
                await self._bucket(members, clients, bucket, weights, version)
            errors = _errors(members, await asyncio.gather(*(finish(s) for s in members), return_exceptions=True))
            if errors:
                raise _Failed(errors, broken=False)
        except BaseException:
            await asyncio.gather(*(self._cleanup(s, s in begun) for s in members), return_exceptions=True)
            raise
        for c in clients.values():
            c.version = version

    async def _bucket(self, members, clients, bucket, weights, version) -> None:
        """The servers' requests and the trainer's broadcasts of one bucket, at the same time."""
        group = self._group
        posts = {asyncio.ensure_future(clients[s].update_bucket(bucket, version, group.group_name,
                                                                timeout=self.collective_timeout)): s
                 for s in members}
        send = asyncio.ensure_future(group.broadcast([weights[m.name] for m in bucket]))
        done, _ = await asyncio.wait([send, *posts], return_when=asyncio.FIRST_EXCEPTION)
        failed = any(t.exception() is not None for t in done)
        if failed:
            # the collective is lost: wait out our side, leave the group (so blocked peers fail now)
            await asyncio.wait([send])
            await self._teardown()
            await asyncio.wait(list(posts), timeout=min(10.0, self.call_timeout))
        errors = {}
        for t, s in posts.items():
            if not t.done():
                t.cancel()
                errors[s.name] = GroupError(group.group_name, "update_weights_from_distributed",
                                            f"{s.url} did not answer after the group broke")
            elif t.cancelled() or t.exception() is not None:
                errors[s.name] = t.exception() if not t.cancelled() else asyncio.CancelledError()
        if send.exception() is not None and not errors:
            errors = {s.name: send.exception() for s in members}
        if errors or failed:
            raise _Failed(errors, broken=True)

    async def _cleanup(self, s: Server, begun: bool) -> None:
        """After a failed attempt: never leave a server paused or inside a session."""
        if begun:
            await self._best_effort(s, "end_weight_update")
        await self._best_effort(s, "resume")

    async def _healthy(self, s: Server) -> bool:
        try:
            return await (await self._client(s)).health(timeout=min(5.0, self.call_timeout))
        except SGLangError:
            return False

    async def update(self, servers: list[Server], weights: dict[str, torch.Tensor], version: int) -> set[str]:
        """Bring `servers` to `weights` as `version`; returns the names that have it.

        Weights are full, unsharded HF names in state-dict order (the broadcast order)."""
        check_tensor_meta(tensor_meta(weights))
        async with self._lock:
            t0 = time.monotonic()
            members = tuple(sorted(set(servers), key=lambda s: s.name))
            fails: dict[str, int] = {}
            while members:
                if members != self._members or self._group is None:
                    errors = await self._form(members)
                else:
                    try:
                        await self._attempt(members, weights, version)
                        log.info("weights v%d reached %d sglang server(s) over %s in %.2f s: %s", version,
                                 len(members), self.backend, time.monotonic() - t0,
                                 ", ".join(s.name for s in members))
                        return {s.name for s in members}
                    except _Failed as f:
                        errors = f.errors
                        if f.broken:
                            await self._teardown()
                keep = []
                for s in members:
                    if s.name in errors:
                        fails[s.name] = fails.get(s.name, 0) + 1
                        healthy = await self._healthy(s)
                        if fails[s.name] >= self.attempts or not healthy:
                            why = "it does not answer /health" if not healthy else f"{fails[s.name]} failed attempts"
                            log.error("sglang server of %s (%s) dropped from weight update v%d (%s): %s", s.name,
                                      s.url, version, why, errors[s.name])
                            continue
                        log.warning("weight update v%d to %s (%s) failed, trying again: %s", version, s.name,
                                    s.url, errors[s.name])
                    keep.append(s)
                members = tuple(keep)
            return set()

    async def close(self) -> None:
        async with self._lock:
            await self._teardown()
            for c in self._clients.values():
                await c.close()
            self._clients.clear()


def _errors(members, results) -> dict[str, BaseException]:
    return {s.name: r for s, r in zip(members, results) if isinstance(r, BaseException)}

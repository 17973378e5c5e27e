"""The weight-update session: the learner's new weights into every SGLang server over torch.distributed.

The broadcaster hands its sglang generators (those whose servers take weights "distributed") to
one SGLangWeightSync; torch generators keep the tensor-channel path. Per server and update, in
SGLang 0.5.23's order (SGLANG.md):

  once per server: POST /init_weights_update_group (rank_offset 1, world_size 1 + its tp size)
      concurrently with the trainer's own join as rank 0 (`TrainerGroup`, below);
  pause_generation -> begin_weight_update -> per bucket: POST /update_weights_from_distributed
      {names, dtypes, shapes, group_name, flush_cache: false, weight_version} while the trainer
      broadcasts each tensor from rank 0 in list order -> flush_cache (400 while busy: retried)
      -> end_weight_update -> continue_generation.

One group per server, not one group for all. A late joiner forms only its own group (the others'
groups and their updates are untouched), and a dead or hung member breaks only its own group: it
is aborted, that server retried or dropped, while the others' updates run on concurrently. The
price: the learner sends the model once per server (N broadcasts from rank 0, concurrent, so
its link carries N copies) where one group would pipeline one copy through NCCL's tree/ring.
One shared group would need re-forming at a version boundary on every membership change and
a broken member costs everybody that update; with the handful of servers per learner this
system runs, N copies over NVLink/InfiniBand cost less than one stalled step. Weights for a
late joiner come from a host (CPU) snapshot the broadcaster makes once per version, and each
broadcast copies one bucket at a time to the device: no whole-model clone on the learner's GPU.

Deadlines and faults: every collective is issued with ``async_op=True`` and waited by polling
``Work.is_completed()`` against a deadline from the event loop (no blocking wait, no
``torch.cuda.synchronize()``); on an error or a missed deadline the group is aborted (NCCL:
``_abort_process_group``, which ``ncclCommAbort``s and unblocks whatever waits on it; gloo: the
group destroyed, which closes its sockets so a peer blocked on us fails at once). The same code
runs on gloo and NCCL. ``TORCH_NCCL_ASYNC_ERROR_HANDLING=2`` (clean up, do not tear down) is set
before a group is built, so an NCCL error or timeout aborts the communicator instead of killing
the learner. Blocking calls (rendezvous, issuing) run on daemon threads awaited with a deadline,
so a wedged one never holds the event loop or the process's exit.

Who may join: only servers the broadcaster invites, i.e. registered generators (the broker admits
a generator only with a generator key, and a keyed attach is announced the same way). The
rendezvous (a TCPStore rank 0 hosts at the learner's address towards the server) authenticates
nothing, so the group is sized to exactly the invited ranks and weights move only after the
invited server confirmed its join over its own (API-key guarded) HTTP port: a stranger on the
rendezvous port can only take an invited rank's place, which makes that server's join fail, and
the group is aborted before a byte of weights is sent. Group names and ports are new and random
per formation. (Firewall the learner's ephemeral ports to the cluster: README Security.)
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from actors.generator.sglang.client import SGLangClient
from actors.generator.sglang.server import NCCL_ENV
from actors.generator.sglang.protocol import DEFAULT_GROUP, SGLangError, bucket_tensors, check_tensor_meta
from tensors.channels.locality import route_address

log = logging.getLogger("actors.weights.sglang_distributed")

# An NCCL error or timeout aborts the communicator and fails its work, without tearing the process
# down (torch's default, 3, kills the learner). Read by ProcessGroupNCCL when a group is built.


class GroupError(RuntimeError):
    """A rendezvous or collective of the weight-update group failed or ran out of time."""

    def __init__(self, group: str, phase: str, detail: str):
        self.group, self.phase = group, phase
        super().__init__(f"weight-update group {group!r}: {phase}: {detail}")


def free_port(host: str = "") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def set_nccl_env() -> None:
    """The servers' NCCL_ENV into this process's environment (one value per knob on both sides of the
    group), before any group is built; an error handling that tears the process down (1, 3) becomes 2."""
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    if os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] not in ("0", "2"):
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"


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


async def in_thread(fn, *args, deadline: float, what: str):
    """``fn(*args)`` on a daemon thread of its own, awaited for at most ``deadline`` seconds: a call
    that wedges (an NCCL init waiting for a dead peer) holds neither the event loop nor the exit."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def run():
        try:
            res, err = fn(*args), None
        except BaseException as exc:  # handed to the awaiting task
            res, err = None, exc
        try:
            loop.call_soon_threadsafe(lambda: fut.done() or (fut.set_exception(err) if err else fut.set_result(res)))
        except RuntimeError:  # the loop closed meanwhile: nobody waits any more
            pass
    threading.Thread(target=run, name=what, daemon=True).start()
    return await asyncio.wait_for(fut, deadline)


class TrainerGroup:
    """The trainer's side (rank 0) of one weight-update group: join, broadcast tensors in order, abort."""

    POLL = (0.001, 0.02)  # first and longest pause between completion checks, seconds

    def __init__(self, *, backend: str, master_address: str, master_port: int, world_size: int,
                 group_name: str, timeout: float):
        if backend not in ("nccl", "gloo"):
            raise ValueError(f"weight-update group backend {backend!r} must be nccl or gloo")
        self.backend, self.master_address, self.master_port = backend, master_address, master_port
        self.world_size, self.group_name, self.timeout = world_size, group_name, timeout
        self.device = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
        self._pg = None

    @property
    def init_method(self) -> str:
        return f"tcp://{self.master_address}:{self.master_port}"

    async def _run(self, phase: str, deadline: float, fn, *args):
        try:
            return await in_thread(fn, *args, deadline=deadline, what=f"wgroup-{self.group_name}")
        except asyncio.TimeoutError:
            raise GroupError(self.group_name, phase, f"timed out after {deadline:g} s") from None
        except Exception as exc:
            raise GroupError(self.group_name, phase, f"{type(exc).__name__}: {exc}") from exc

    async def join(self) -> None:
        """Host the rendezvous as rank 0; returns once all world_size ranks joined (or raises)."""
        def join():
            if self.backend == "nccl":
                set_nccl_env()
            self._pg = custom_process_group(self.backend, self.init_method, self.world_size, 0, self.group_name,
                                            datetime.timedelta(seconds=self.timeout))
        try:
            await self._run(f"rendezvous at {self.init_method} (world_size {self.world_size})",
                            self.timeout + 5.0, join)
        except GroupError:
            await self.abort()
            raise

    async def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """One broadcast from rank 0 per tensor, in list order, unpadded (what each server receives):
        issued async, then polled until done or the deadline; an error or a miss aborts the group."""
        if self._pg is None:
            raise GroupError(self.group_name, "broadcast", "the group was not joined")
        pg, phase = self._pg, f"broadcast of {len(tensors)} tensors"
        deadline = time.monotonic() + self.timeout

        def issue():
            sent = [t.detach().to(self.device).contiguous() for t in tensors]  # one bucket, alive until done
            return sent, [dist.broadcast(t, src=0, group=pg, async_op=True) for t in sent]
        try:
            _, works = await self._run(phase, self.timeout, issue)
            pause = self.POLL[0]
            while not all(w.is_completed() for w in works):
                if time.monotonic() > deadline:
                    raise GroupError(self.group_name, phase, f"not completed after {self.timeout:g} s")
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.POLL[1])
            for w in works:
                w.wait()  # completed: returns at once, or raises the collective's error
        except GroupError as exc:
            log.warning("%s; aborting the group", exc)
            await self.abort()
            raise
        except Exception as exc:
            log.warning("weight-update group %r: %s failed (%s: %s); aborting the group", self.group_name, phase,
                        type(exc).__name__, exc)
            await self.abort()
            raise GroupError(self.group_name, phase, f"{type(exc).__name__}: {exc}") from exc

    async def abort(self, grace: float = 10.0) -> None:
        """Leave the group now: NCCL aborts its communicator (peers and our own waits fail at once);
        gloo's group is destroyed, closing the sockets a blocked peer waits on. Never raises."""
        pg, self._pg = self._pg, None
        if pg is None:
            return

        def abort():
            try:
                if self.backend == "nccl":
                    dist.distributed_c10d._abort_process_group(pg)
                else:
                    dist.destroy_process_group(pg)
            except Exception as exc:  # already broken: it goes with its last reference
                log.debug("aborting %s: %s", self.group_name, exc)
        try:
            await in_thread(abort, deadline=grace, what=f"wgroup-abort-{self.group_name}")
        except asyncio.TimeoutError:
            log.warning("weight-update group %r: abort still running after %g s; going on without it",
                        self.group_name, grace)


@dataclass(frozen=True)
class Server:
    """One SGLang server: the generator that owns it, its URL and its GPUs (tp size)."""
    name: str
    url: str
    tp_size: int = 1


@dataclass
class _Link:
    """One server's client and its own group (None until formed, or after it broke)."""
    server: Server
    client: SGLangClient
    group: TrainerGroup | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def tensor_meta(weights: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in weights.items()]


class SGLangWeightSync:
    """One weight-update group per SGLang server, driven from the learner."""

    def __init__(self, *, backend: str = "gloo", group_name: str = DEFAULT_GROUP,
                 master_address: str | None = None, bucket_bytes: int = 1 << 30, pause_mode: str = "abort",
                 call_timeout: float = 60.0, collective_timeout: float = 120.0, attempts: int = 2,
                 api_key: str | None = None):
        self.backend, self.group_name, self.master_address = backend, group_name, master_address
        self.bucket_bytes, self.pause_mode, self.api_key = bucket_bytes, pause_mode, api_key
        self.call_timeout, self.collective_timeout, self.attempts = call_timeout, collective_timeout, attempts
        self._links: dict[str, _Link] = {}  # generator name -> its server's link; see retain() and forget()
        self._forms = 0  # groups formed so far
        if backend == "nccl":  # before any group of this process is built, not only ours
            set_nccl_env()

    # ---- links and their groups

    async def _link(self, s: Server) -> _Link:
        link = self._links.get(s.name)
        if link is not None and link.server != s:  # the generator came back with another server
            await self.forget(s.name)
            link = None
        if link is None:
            kw = {"api_key": self.api_key} if self.api_key else {}
            client = SGLangClient(s.url, control_timeout=self.call_timeout, update_timeout=self.collective_timeout,
                                  health_timeout=self.call_timeout, **kw)
            await client.start(wait=False)
            link = self._links[s.name] = _Link(s, client)
        return link

    async def _teardown(self, link: _Link) -> None:
        """Leave the server's group on our side first (unblocks it), then ask it to forget the group."""
        group, link.group = link.group, None
        if group is not None:
            await group.abort()
            await self._best_effort(link, "destroy_weights_group", group.group_name)

    async def _form(self, link: _Link) -> None:
        """A new group of the trainer and this server's tp ranks (raises if either side cannot join)."""
        await self._teardown(link)
        s = link.server
        self._forms += 1
        name = f"{self.group_name}_{self._forms}_{secrets.token_hex(4)}"
        master = self.master_address or route_address(urllib.parse.urlsplit(s.url).hostname)
        group = TrainerGroup(backend=self.backend, master_address=master, master_port=free_port(master),
                             world_size=1 + s.tp_size, group_name=name, timeout=self.collective_timeout)
        log.info("forming weight-update group %s at %s for %s (%s): world_size %d", name, group.init_method, s.name,
                 s.url, group.world_size)
        joined, init = await asyncio.gather(
            group.join(), link.client.init_weights_group(master, group.master_port, 1, group.world_size, name,
                                                         backend=self.backend, timeout=self.collective_timeout),
            return_exceptions=True)
        link.group = group
        if isinstance(joined, BaseException) or isinstance(init, BaseException):
            await self._teardown(link)
            raise init if isinstance(init, BaseException) else joined

    async def _best_effort(self, link: _Link, call: str, *args) -> None:
        """A clean-up call with a short deadline; a failure is only logged (the server may be gone)."""
        try:
            await getattr(link.client, call)(*args, timeout=min(10.0, self.call_timeout))
        except SGLangError as exc:
            log.warning("%s: %s", link.server.name, exc)

    async def forget(self, name: str) -> None:
        """The generator left: its group aborted, its client closed."""
        link = self._links.pop(name, None)
        if link is not None:
            async with link.lock:
                await self._teardown(link)
                await link.client.close()

    async def retain(self, names) -> None:
        """Forget every server whose generator is not among ``names`` (the registered ones)."""
        for name in [n for n in self._links if n not in set(names)]:
            await self.forget(name)

    # ---- one update of one server

    async def _attempt(self, link: _Link, weights: dict[str, torch.Tensor], version: int) -> None:
        c, begun = link.client, False
        try:
            await c.pause(self.pause_mode)
            await c.begin_weight_update()
            begun = True
            buckets = bucket_tensors(tensor_meta(weights), self.bucket_bytes)
            for k, bucket in enumerate(buckets):
                log.debug("weights v%d bucket %d/%d (%d tensors) to %s", version, k + 1, len(buckets), len(bucket),
                          link.server.name)
                await self._bucket(link, bucket, weights, version)
            await c.flush_cache()
            await c.end_weight_update()
            begun = False
            await c.resume()
        except BaseException:
            if begun:
                await self._best_effort(link, "end_weight_update")
            await self._best_effort(link, "resume")
            raise
        c.version = version

    async def _bucket(self, link: _Link, bucket, weights, version) -> None:
        """The server's request and the trainer's broadcasts of one bucket, at the same time."""
        group = link.group
        post = asyncio.ensure_future(link.client.update_bucket(bucket, version, group.group_name,
                                                               timeout=self.collective_timeout))
        send = asyncio.ensure_future(group.broadcast([weights[m.name] for m in bucket]))
        await asyncio.wait([send, post], return_when=asyncio.FIRST_EXCEPTION)
        if post.done() and post.exception() is not None and not send.done():
            await self._teardown(link)  # the server gave up: abort, so our broadcast fails now
        await asyncio.wait([send])
        if send.exception() is not None:
            await self._teardown(link)  # broadcast() aborted our side; the server is told to forget it
            await asyncio.wait([post], timeout=min(10.0, self.call_timeout))
            if not post.done():
                post.cancel()
            raise send.exception()
        await post  # raises the server's error, if any

    async def _healthy(self, link: _Link) -> bool:
        try:
            return await link.client.health(timeout=min(5.0, self.call_timeout))
        except SGLangError:
            return False

    async def _update_one(self, s: Server, weights: dict[str, torch.Tensor], version: int) -> bool:
        """Up to ``attempts`` tries (a new group after a broken one); False once dropped."""
        link = await self._link(s)
        async with link.lock:
            for attempt in range(1, self.attempts + 1):
                try:
                    if link.group is None:
                        await self._form(link)
                    await self._attempt(link, weights, version)
                    return True
                except Exception as exc:  # _form and _bucket abort a group that may be out of step
                    err = exc
                healthy = await self._healthy(link)
                if not healthy:
                    await self._teardown(link)
                if attempt >= self.attempts or not healthy:
                    why = "it does not answer /health" if not healthy else f"{attempt} failed attempts"
                    log.error("sglang server of %s (%s) dropped from weight update v%d (%s): %s", s.name, s.url,
                              version, why, err)
                    return False
                log.warning("weight update v%d to %s (%s) failed, trying again: %s", version, s.name, s.url, err)
        return False

    async def update(self, servers: list[Server], weights: dict[str, torch.Tensor], version: int) -> set[str]:
        """Bring `servers` to `weights` as `version`, each over its own group, concurrently; returns the
        names that have it. Weights are full, unsharded HF names in state-dict order (the broadcast order)."""
        check_tensor_meta(tensor_meta(weights))
        t0 = time.monotonic()
        members = sorted({s.name: s for s in servers}.values(), key=lambda s: s.name)
        ok = await asyncio.gather(*(self._update_one(s, weights, version) for s in members))
        got = {s.name for s, good in zip(members, ok) if good}
        if got:
            log.info("weights v%d reached %d sglang server(s) over %s in %.2f s (of %d): %s", version, len(got),
                     self.backend, time.monotonic() - t0, len(members), ", ".join(sorted(got)))
        return got

    async def close(self) -> None:
        for name in list(self._links):
            await self.forget(name)

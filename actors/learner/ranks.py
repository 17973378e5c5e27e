"""Learner ranks: N processes that train one model as one torch.distributed group.

The launcher starts every rank with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE and the launch's secret
(`join` reads them). Rank 0 is the bus's learner (`RankedLearner`); ranks > 0 are plain processes
(`serve`). The group's TCP store listens on rank 0's address only and carries torch's rendezvous, nothing
we read: every member proves the secret before anything else (actors.learner.rank_link), and rank 0's
commands reach the others over a CurveZMQ link keyed by that secret, each step's with the packed batch
(its tensors on that link on CPU, an NCCL broadcast inside the group on GPU). Every rank then trains its
own micro-batches on its FSDP2 shards (policies.train.ppo with a policies.train.data_parallel.World), and
the ranks gather the whole weights, one parameter at a time on their device, into rank 0's copy, which
the broadcaster, the periodic eval and the checkpoints read as before; a checkpoint gathers the
optimizer state to the CPU, tensor by tensor, for as long as it is written. Every collective has the
group's timeout (actors.learner.collective_timeout), the same wait on gloo and nccl, and a failed one is
a RankError naming the rank. Waiting for the next command is not a collective (it may last a whole
rollout): it polls rank 0's link, so it ends when rank 0 dies or stops answering.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.learner.learner import Learner, train_ppo_batch
from actors.learner.rank_link import (SECRET_ENV, CommandInbox, CommandOutbox, broadcast_batch, broadcast_bytes,
                                      prove_secret)
from policies.train.data_parallel import whole_optimizer_state
from policies.train.schedule import scheduled_lr
from tensors import wire
from tensors.channels.locality import route_address
from tensors.errors import TransferError

log = logging.getLogger("actors.learner.ranks")

ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", SECRET_ENV)


class RankError(RuntimeError):
    """A learner rank could not take part in the group: the message names the rank."""


def env_rank() -> int:
    """This process's learner rank from the launcher's environment (0 when there are no ranks)."""
    return int(os.environ.get("RANK", "0"))


class Ranks:
    """This process's membership of the learner group: commands from rank 0 and the batch it shares
    (actors.learner.rank_link: over the Curve-secured link, the batch over the group on GPU)."""

    def __init__(self, rank: int, size: int, timeout: float, device: torch.device, link, *, batch_over: str):
        self.rank, self.size, self.timeout, self.device, self.link = rank, size, timeout, device, link
        self.batch_over = batch_over  # "link" (CPU: the tensors travel with the command) or "group" (GPU: NCCL)

    def fail(self, what: str, exc: BaseException) -> RankError:
        return RankError(f"learner rank {self.rank} of {self.size}: {what} failed (a rank died, or did not join "
                         f"within actors.learner.collective_timeout={self.timeout:g} s): {exc}")

    def post(self, command: dict, batch=None) -> None:
        """Rank 0: the next command for every other rank, with the batch they train on (if any)."""
        frames: list = []
        tensors = None
        if batch is not None and self.batch_over == "group":
            header, tensors = wire.encode_tensors(batch)
            frames = [header]
        elif batch is not None:
            header, buffers = wire.encode(batch)
            frames = [header, *buffers]
        self.link.put({**command, "batch": self.batch_over if batch is not None else None}, frames)
        if tensors is not None:
            broadcast_batch(frames[0], tensors, self.device, self.timeout)

    def stop(self) -> None:
        """Rank 0: tell the other ranks to stop, and close the link once they pulled it (at most 10 s):
        a rank 0 that exits right after posting would close it under a rank still polling for the command."""
        self.post({"op": "stop"})
        self.link.close(drain=min(self.timeout, 10.0))

    def next_command(self) -> tuple[dict, object]:
        """Ranks > 0: rank 0's next command and its batch (None without one), however long rank 0 takes to
        post it; RankError once rank 0 is gone (dead, frozen past the timeout, or not holding the secret)."""
        try:
            command, frames = self.link.next()
        except TransferError as exc:
            raise RankError(f"learner rank {self.rank} of {self.size}: rank 0 is gone (its command link at "
                            f"{self.link.endpoint} does not answer): {exc}") from exc
        if command.get("batch") == "group":
            return command, broadcast_batch(bytes(frames[0]), None, self.device, self.timeout)
        if command.get("batch") == "link":
            return command, wire.decode(frames[0], frames[1:])
        return command, None


def interface_of(address: str) -> str | None:
    """The name of this host's network interface holding IPv4 `address` (None if none does)."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    return None


def _gloo_interface(master: str) -> None:
    """Gloo advertises the address its hostname resolves to, often 127.0.x.1: another host's rank would
    dial its own loopback. Use the interface on the route to rank 0 instead, unless GLOO_SOCKET_IFNAME is set."""
    if "GLOO_SOCKET_IFNAME" not in os.environ and (name := interface_of(route_address(master))):
        os.environ["GLOO_SOCKET_IFNAME"] = name


def _listening_socket(addr: str, port: int) -> socket.socket:
    """The store's socket, bound to rank 0's own address only (torch's TCPStore would listen on all)."""
    family, kind, proto, _, where = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(where)
    sock.listen(128)
    return sock


def join(device: str, timeout: float, *, batch_over: str | None = None) -> Ranks:
    """Join the learner group the launcher's environment describes (gloo on CPU, nccl on CUDA), check that
    every member holds the job's secret, and open the command link. `batch_over`: "group" or "link"
    (default: the group on CUDA, the link on CPU)."""
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise RankError(f"learner ranks: {', '.join(missing)} not set (the launcher sets them for "
                        f"actors.learner.ranks > 1)")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    secret = bytes.fromhex(os.environ[SECRET_ENV])
    limit = timedelta(seconds=timeout)
    on = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
    if device != "cuda":
        _gloo_interface(addr)
    try:
        listen = _listening_socket(addr, port) if rank == 0 else None
        store = dist.TCPStore(addr, port, size, is_master=rank == 0, timeout=limit,
                              master_listen_fd=listen.detach() if listen else None)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank,
                                world_size=size, timeout=limit)
        impostors = prove_secret(rank, size, secret, on, timeout)
    except (OSError, RuntimeError, dist.DistError) as exc:
        raise RankError(f"learner rank {rank} of {size}: could not join the group at {addr}:{port} within "
                        f"actors.learner.collective_timeout={timeout:g} s: {exc}") from exc
    if impostors:
        raise RankError(f"learner rank {rank} of {size}: rank(s) {impostors} in the group at {addr}:{port} do "
                        f"not hold this job's secret ({SECRET_ENV}): a process the launcher did not start joined")
    try:
        if rank == 0:
            link = CommandOutbox(secret, route_address(addr), readers=size - 1, ttl=max(60.0, 4 * timeout))
            broadcast_bytes(link.endpoint.encode(), on, timeout)
        else:
            link = CommandInbox(secret, broadcast_bytes(None, on, timeout).decode(), timeout)
    except (RuntimeError, dist.DistError) as exc:
        raise RankError(f"learner rank {rank} of {size}: opening the command link failed: {exc}") from exc
    log.info("learner rank %d of %d joined the group at %s:%d (%s); commands over %s", rank, size, addr, port,
             dist.get_backend(), link.endpoint)
    return Ranks(rank, size, timeout, on, link, batch_over=batch_over or ("group" if device == "cuda" else "link"))


class GatheredOptimizer:
    """The whole optimizer state gathered from the shards onto the CPU (`whole_optimizer_state`), in the
    place of rank 0's optimizer while a checkpoint writes it: it never goes to rank 0's GPU."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state


class RankedLearner(Learner):
    """Rank 0 of the learner group: the bus's learner, and the one that tells the others what to do.
    `model` is its whole copy (`optimizer` only its template: no state); the group trains `world.model`
    with `sharded_optimizer`."""

    def __init__(self, *args, ranks: Ranks, world, sharded_optimizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranks, self.world, self.sharded_optimizer = ranks, world, sharded_optimizer

    def train_batch(self, batch, step: int) -> dict:
        lr = scheduled_lr(self.ppo, step, self.total_steps)
        try:
            self.ranks.post({"op": "train", "step": step, "lr": lr}, batch)
            stats = train_ppo_batch(self.world.model, self.sharded_optimizer, batch, self.ppo, recompute=self.recompute,
                                    ref_model=self.ref_model, lr=lr, world=self.world)
            self.world.gather_weights(self.model)
        except (RuntimeError, dist.DistError) as exc:
            raise self.ranks.fail(f"step {step}", exc) from exc
        return stats

    async def _checkpoint(self):
        gathered = await asyncio.to_thread(self._gather_optimizer)
        template, self.optimizer = self.optimizer, gathered
        try:
            return await super()._checkpoint()
        finally:
            self.optimizer = template

    def _gather_optimizer(self) -> GatheredOptimizer:
        try:
            self.ranks.post({"op": "optimizer"})
            by_name = self.world.full_optimizer_state(self.sharded_optimizer)
        except (RuntimeError, dist.DistError) as exc:
            raise self.ranks.fail(f"gathering the optimizer state at step {self.step}", exc) from exc
        return GatheredOptimizer(whole_optimizer_state(self.model, self.optimizer, by_name))

    async def on_stop(self) -> None:
        await super().on_stop()
        try:
            await asyncio.to_thread(self.ranks.stop)
        except (RuntimeError, dist.DistError) as exc:  # the others are gone already
            log.info("could not tell the other learner ranks to stop: %s", exc)


def serve(ranks: Ranks, world, *, optimizer, ppo, recompute: bool, ref_model=None) -> None:
    """Ranks > 0: take part in rank 0's steps (our share of each) and gathers until it says stop."""
    while True:
        try:
            command, batch = ranks.next_command()
        except RankError:
            raise
        except (RuntimeError, dist.DistError) as exc:  # the batch's broadcast
            raise ranks.fail("receiving rank 0's batch", exc) from exc
        if command["op"] == "stop":
            break
        what = f"step {command['step']}" if command["op"] == "train" else "gathering the optimizer state"
        log.info("learner rank %d: %s", ranks.rank,
                 f"step {command['step']}: training its share" if command["op"] == "train" else what)
        try:
            if command["op"] == "optimizer":
                world.full_optimizer_state(optimizer)
                continue
            stats = train_ppo_batch(world.model, optimizer, batch, ppo, recompute=recompute, ref_model=ref_model,
                                    lr=command["lr"], world=world)
            world.gather_weights(None)
        except (RuntimeError, dist.DistError) as exc:
            raise ranks.fail(what, exc) from exc
        log.info("learner rank %d: %s done (loss %s)", ranks.rank, what, f"{stats.get('loss', 0.0):.4f}")
    log.info("learner rank %d: rank 0 says stop", ranks.rank)
    ranks.link.close()
    dist.destroy_process_group()

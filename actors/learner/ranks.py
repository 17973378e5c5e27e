"""Learner ranks: N processes that train one model as one torch.distributed group.

The launcher starts every rank with MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE (`join` reads them).
Rank 0 is the bus's learner (`RankedLearner`); ranks > 0 are plain processes (`serve`). For each step
rank 0 posts a command in the group's TCP store and broadcasts the whole packed batch over the group;
every rank then trains its own micro-batches on its FSDP2 shards (policies.train.ppo with a
policies.train.data_parallel.World), and the ranks gather the whole weights into rank 0's copy, which the
broadcaster, the periodic eval and the checkpoints read as before; a checkpoint also gathers the
optimizer state into that copy's optimizer for as long as it is written. Every collective has the
group's timeout (actors.learner.collective_timeout) and a failed one is a RankError naming the rank.
Waiting for the next command is not a collective (it may last a whole rollout): it polls the store,
which rank 0 hosts, so it ends when rank 0 dies.
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import json
import os
import socket
import struct
import time
from datetime import timedelta

import torch.distributed as dist

from actors.learner.learner import Learner, train_ppo_batch
from policies.train.data_parallel import load_optimizer_state_by_name
from policies.train.schedule import scheduled_lr
from tensors.channels.locality import route_address

log = logging.getLogger("actors.learner.ranks")

ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
POLL_S = 0.05  # how often a waiting rank looks for the next command


class RankError(RuntimeError):
    """A learner rank could not take part in the group: the message names the rank."""


def env_rank() -> int:
    """This process's learner rank from the launcher's environment (0 when there are no ranks)."""
    return int(os.environ.get("RANK", "0"))


class Ranks:
    """This process's membership of the learner group: commands from rank 0 and the batch it shares."""

    def __init__(self, rank: int, size: int, store: dist.Store, timeout: float):
        self.rank, self.size, self.store, self.timeout = rank, size, store, timeout
        self._seq = 0

    def fail(self, what: str, exc: BaseException) -> RankError:
        return RankError(f"learner rank {self.rank} of {self.size}: {what} failed (a rank died, or did not join "
                         f"within actors.learner.collective_timeout={self.timeout:g} s): {exc}")

    def post(self, command: dict) -> None:
        """Rank 0: the next command for every other rank."""
        self.store.set(f"cmd/{self._seq}", json.dumps(command))
        self._seq += 1

    def next_command(self) -> dict:
        """Ranks > 0: wait for rank 0's next command, however long; RankError once rank 0 is gone."""
        key = f"cmd/{self._seq}"
        try:
            while not self.store.check([key]):
                time.sleep(POLL_S)
            command = json.loads(self.store.get(key))
        except (RuntimeError, dist.DistError) as exc:
            raise RankError(f"learner rank {self.rank} of {self.size}: rank 0 is gone (its store at "
                            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} does not answer): "
                            f"{exc}") from exc
        self._seq += 1
        return command

    def share(self, batch):
        """Rank 0's batch on every rank (a collective under the timeout)."""
        box = [batch]
        dist.broadcast_object_list(box, src=0)
        return box[0]


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


def join(device: str, timeout: float) -> Ranks:
    """Join the learner group the launcher's environment describes: gloo on CPU, nccl on CUDA."""
    missing = [k for k in ENV if k not in os.environ]
    if missing:
        raise RankError(f"learner ranks: {', '.join(missing)} not set (the launcher sets them for "
                        f"actors.learner.ranks > 1)")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    limit = timedelta(seconds=timeout)
    if device != "cuda":
        _gloo_interface(addr)
    try:
        store = dist.TCPStore(addr, port, size, is_master=rank == 0, timeout=limit)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank,
                                world_size=size, timeout=limit)
    except (RuntimeError, dist.DistError) as exc:
        raise RankError(f"learner rank {rank} of {size}: could not join the group at {addr}:{port} within "
                        f"actors.learner.collective_timeout={timeout:g} s: {exc}") from exc
    log.info("learner rank %d of %d joined the group at %s:%d (%s)", rank, size, addr, port, dist.get_backend())
    return Ranks(rank, size, store, timeout)


class RankedLearner(Learner):
    """Rank 0 of the learner group: the bus's learner, and the one that tells the others what to do.
    `model`/`optimizer` are its whole copy; the group trains `world.model` with `sharded_optimizer`."""

    def __init__(self, *args, ranks: Ranks, world, sharded_optimizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.ranks, self.world, self.sharded_optimizer = ranks, world, sharded_optimizer

    def train_batch(self, batch, step: int) -> dict:
        lr = scheduled_lr(self.ppo, step, self.total_steps)
        try:
            self.ranks.post({"op": "train", "step": step, "lr": lr})
            self.ranks.share(batch)
            stats = train_ppo_batch(self.world.model, self.sharded_optimizer, batch, self.ppo, recompute=self.recompute,
                              ref_model=self.ref_model, lr=lr, world=self.world)
            self.model.load_state_dict(self.world.full_weights())
        except (RuntimeError, dist.DistError) as exc:
            raise self.ranks.fail(f"step {step}", exc) from exc
        return stats

    async def _checkpoint(self):
        await asyncio.to_thread(self._gather_optimizer)
        try:
            return await super()._checkpoint()
        finally:
            self.optimizer.state.clear()  # the whole state lives on rank 0 only while it is written

    def _gather_optimizer(self) -> None:
        try:
            self.ranks.post({"op": "optimizer"})
            load_optimizer_state_by_name(self.model, self.optimizer,
                                         self.world.full_optimizer_state(self.sharded_optimizer))
        except (RuntimeError, dist.DistError) as exc:
            raise self.ranks.fail(f"gathering the optimizer state at step {self.step}", exc) from exc

    async def on_stop(self) -> None:
        await super().on_stop()
        try:
            self.ranks.post({"op": "stop"})
        except (RuntimeError, dist.DistError) as exc:  # the others are gone already
            log.info("could not tell the other learner ranks to stop: %s", exc)


def serve(ranks: Ranks, world, *, optimizer, ppo, recompute: bool, ref_model=None) -> None:
    """Ranks > 0: take part in rank 0's steps (our share of each) and gathers until it says stop."""
    while (command := ranks.next_command())["op"] != "stop":
        what = f"step {command['step']}" if command["op"] == "train" else "gathering the optimizer state"
        log.info("learner rank %d: %s", ranks.rank,
                 f"step {command['step']}: training its share" if command["op"] == "train" else what)
        try:
            if command["op"] == "optimizer":
                world.full_optimizer_state(optimizer)
                continue
            batch = ranks.share(None)
            stats = train_ppo_batch(world.model, optimizer, batch, ppo, recompute=recompute, ref_model=ref_model,
                              lr=command["lr"], world=world)
            world.full_weights()
        except (RuntimeError, dist.DistError) as exc:
            raise ranks.fail(what, exc) from exc
        log.info("learner rank %d: %s done (loss %s)", ranks.rank, what, f"{stats.get('loss', 0.0):.4f}")
    log.info("learner rank %d: rank 0 says stop", ranks.rank)
    dist.destroy_process_group()

"""Stalls and losses at the edges of a run: before its first step, and while the broker is down.

Real launcher, broker and actor processes on loopback (tests.test_faults' LiveJob), the tiny model.
"""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from actors import protocol as P
from tests.launch_util import dataset
from tests.test_faults import HB, assert_exactly_once, commands_of, job_args, jobs  # noqa: F401 (jobs: the fixture)

pytestmark = pytest.mark.timeout(240)


def test_a_generator_frozen_as_it_joins_stops_the_run_before_step_0(tmp_path, jobs):
    """The watchdog is armed once the critical actors are up, not after the first step: a stall
    before step 0 (the only generator frozen as it joins) used to wait for ever."""
    train = dataset(tmp_path)
    job = jobs(job_args(tmp_path / "run", train, **{"train.steps": 3, "train.step_timeout": 8}))
    # the sampler held from its start (before it registers) until the generator froze: no prompt can
    # reach the generator first, however fast it generates or slowly this test polls the bus
    sampler = _spawned(job, "launcher actor sampler ")
    os.kill(sampler, signal.SIGSTOP)
    try:
        gen = job.wait_actors({"generator-0"})["generator-0"]
        os.kill(gen.pid, signal.SIGSTOP)
    finally:
        os.kill(sampler, signal.SIGCONT)
    frozen_at = time.monotonic()
    rc = job.finish(60)
    took = time.monotonic() - frozen_at
    out = job.output()
    assert rc != 0, job.tail()
    stopped = re.search(r"run failed: no learner step within 8 s \(train.step_timeout=8, slowest step so far "
                        r"0\.0 s\): rollout: \d+ prompt\(s\) not yet generated.*", out)
    assert stopped, job.tail()
    assert "[progress] step" not in out  # it stopped before step 0
    # armed once every role has joined (the others may load for a while after the generator froze)
    armed_at = max([frozen_at] + [t for t, line in job.lines
                                  if re.search(r"joined: (sampler|packer|learner|verifier-0) \(", line)])
    failed_at, _ = job.wait_for(r"no learner step within 8 s", 1)  # the watchdog's verdict, before the shutdown
    assert failed_at - armed_at < 8 + 5, f"stopped {failed_at - armed_at:.1f} s after every role joined"
    assert took < 60
    print(f"frozen at join: stopped {failed_at - armed_at:.1f} s after every role joined, exited {took:.1f} s after "
          f"the freeze: {stopped.group(0)[:200]}")


def _spawned(job, command: str, timeout: float = 60.0) -> int:
    """The pid of the job's process whose command line holds `command`, as soon as it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid, cmd in commands_of(job.proc.pid).items() if command in cmd]
        if found:
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"no process {command!r} within {timeout} s:\n{job.tail()}")


def test_a_generator_that_dies_while_the_broker_is_down_has_its_prompts_dealt_again(tmp_path, jobs):
    """The new broker never knew the dead generator, so no `left` comes: the sampler reconciles what
    it dealt with the broker's actor list (else its prompts wait rollout.request_timeout)."""
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    job = jobs(job_args(run_dir, train, **{"train.steps": 3, "actors.generator.count": 2,
                                           "rollout.batch_prompts": 4, "rollout.max_new_tokens": 64,
                                           "rollout.request_timeout": 600}))
    gens = job.wait_actors({"generator-0", "generator-1"})
    job.wait_for(r"\[sampler\].*batch 1 admitted", 150)
    held = job.call(lambda c: c.request(P.SAMPLER, P.SAMPLER_STATE, {}, timeout=5))["generators"]
    victim = max(("generator-0", "generator-1"), key=lambda g: held.get(g, 0))
    assert held.get(victim), f"no generator holds a prompt: {held}"
    broker = [p for p, cmd in commands_of(job.proc.pid).items() if "bus.broker" in cmd]
    os.kill(broker[0], signal.SIGKILL)
    os.kill(gens[victim].pid, signal.SIGKILL)  # before the broker is back: nobody will publish its `left`
    killed_at = time.monotonic()
    assert job.finish(90) == 0, job.tail()
    took = time.monotonic() - killed_at
    assert took < 60, f"finished {took:.1f} s after the kills"
    out = job.output()
    assert re.search(rf"{victim} holds prompts but is not on the bus .*died unseen", out), job.tail()
    assert_exactly_once(run_dir, train, batch_prompts=4, group_size=2, steps=range(3))
    print(f"{victim} (holding {held[victim]}) killed while the broker was down: run finished {took:.1f} s later")


async def test_the_shm_pool_stays_within_max_pool_bytes_and_a_send_waits_for_a_read_segment():
    """Segments whose readers are still to come used to be kept and new ones made past the bound."""
    import torch

    from tensors.errors import TransferError
    from tensors.channels.shm import ShmChannel

    tx, rx = ShmChannel(max_pool_bytes=2 << 20), ShmChannel()
    payload = {"w": torch.ones(100_000)}  # 400 kB: a 1 MiB segment each
    try:
        first = await tx.send(payload, timeout=30)
        await tx.send(payload, timeout=30)
        with pytest.raises(TransferError, match=r"max_pool_bytes=2097152, none freed within 0.3s"):
            await tx.send(payload, timeout=0.3)
        assert sum(s.capacity for s in tx._segments) <= 2 << 20
        got = await rx.recv(first, timeout=5)  # its reader is done: the segment is free again
        assert torch.equal(got["w"], payload["w"])
        await tx.send(payload, timeout=30)
        assert sum(s.capacity for s in tx._segments) <= 2 << 20
    finally:
        await tx.close()
        await rx.close()


_HEAD = r"""
import asyncio, sys, torch
from bus.broker import Broker
from bus.client import BusClient
from actors.weights.broadcaster import WeightBroadcaster
from tensors.channels.outbox import Outbox
replies = []
real = Outbox.send_reply
def counting(self, ident, frames):
    if frames and frames[0] == b"OK" and len(frames) > 2:  # a payload going out
        replies.append(sum(memoryview(f).nbytes for f in frames[1:]))
    return real(self, ident, frames)
Outbox.send_reply = counting
async def main():
    broker = Broker(f"tcp://{sys.argv[1]}:0", heartbeat_interval=0.5, insecure=True)
    await broker.start()
    print("BUS", broker.address, flush=True)
    bc = WeightBroadcaster(broker.address, weights={"w": torch.ones(int(sys.argv[2]) // 4)}, heartbeat_interval=0.5)
    await bc.start()  # no generator yet: the one that joins is brought to v0 over its slow link
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    while not (bc.announced or {}).get("generators") and loop.time() < deadline:
        await asyncio.sleep(0.2)
    print("ANNOUNCED", bc.announced, "REPLIES", replies, flush=True)
    await bc.stop()
    await broker.stop()
asyncio.run(main())
"""

_GENERATOR = r"""
import asyncio, sys, time
from actors import protocol as P
from actors.base import Actor, handler
class Gen(Actor):
    copies, loaded, lock = 0, None, None
    @handler(P.UPDATE_WEIGHTS, from_roles=(P.BROADCASTER,))
    async def update(self, body, src):
        self.copies += 1
        print("COPY", self.copies, flush=True)
        async with self.lock:  # as the real generator: a second copy waits for the first
            if self.loaded != body["version"]:
                t0 = time.monotonic()
                w = await self.channels.recv(body["weights_ref"], timeout=120)
                print(f"RECEIVED {w['w'].numel() * 4} bytes in {time.monotonic() - t0:.1f} s", flush=True)
                self.loaded = body["version"]
        return {"version": body["version"]}
async def main():
    gen = Gen("generator-0", P.GENERATOR, sys.argv[1], heartbeat_interval=0.5)
    gen.lock = asyncio.Lock()
    await gen.start()
    await asyncio.sleep(120)
asyncio.run(main())
"""


@pytest.mark.slow
def test_a_weight_update_over_a_slow_link_crosses_it_once_and_is_not_given_up(tmp_path):
    """A generator behind a 2 Mbit/s link (a token bucket on its switch port): the update takes longer
    than the old 10 s reply deadline, after which the broadcaster sent it again while the first copy
    moved. Now it is sent once, watched while its bytes move, and it arrives."""
    import subprocess
    import sys

    from tests.launch_util import ROOT
    from tests.simhosts import SimHosts, skip_reason
    if skip_reason() or not __import__("shutil").which("tc"):
        pytest.skip(skip_reason() or "needs tc (iproute2)")
    size = 3_000_000  # 24 Mbit: 12 s at 2 Mbit/s
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "BOBA_TORCH_THREADS": "1"}
    with SimHosts(2, tmp_path, sshd=False) as net:
        head, far = net.hosts
        subprocess.run(["ip", "netns", "exec", net.switch, "tc", "qdisc", "add", "dev", "p1", "root", "tbf",
                        "rate", "2mbit", "burst", "16kb", "latency", "2s"], check=True)
        a = subprocess.Popen(net.argv(head, [sys.executable, "-c", _HEAD, head.addr, str(size)]), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        bus = a.stdout.readline().split()
        assert bus[:1] == ["BUS"], bus + a.stdout.read()[-3000:]
        b = subprocess.Popen(net.argv(far, [sys.executable, "-c", _GENERATOR, bus[1]]), cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            head_out = a.communicate(timeout=150)[0]
        finally:
            b.kill()
        far_out = b.communicate(timeout=10)[0]
    print(head_out.strip().splitlines()[-1], "|", far_out.strip().replace("\n", " | ")[-300:])
    assert "ANNOUNCED {'version': 0, 'generators': ['generator-0']}" in head_out, head_out[-3000:] + far_out[-3000:]
    took = re.search(r"RECEIVED (\d+) bytes in ([\d.]+) s", far_out)
    assert took and int(took.group(1)) == size and float(took.group(2)) > 10, far_out[-3000:]
    assert far_out.count("COPY") == 1, far_out[-3000:]  # UPDATE_WEIGHTS sent once
    assert re.search(r"REPLIES \[\d+\]", head_out), head_out[-3000:]  # the bytes went out once


def test_every_client_is_given_the_configured_heartbeat_liveness():
    """bus.heartbeat_liveness reached the broker only: clients judged it silent after their default 3."""
    from launcher.config import load_config
    from launcher.job.plan import bus_kwargs
    from tests.launch_util import ROOT

    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["bus.heartbeat_liveness=7"])
    assert bus_kwargs(cfg, "generator")["heartbeat_liveness"] == 7

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
    gen = job.wait_actors({"generator-0"})["generator-0"]
    os.kill(gen.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    rc = job.finish(60)
    took = time.monotonic() - frozen_at
    out = job.output()
    assert rc != 0, job.tail()
    stopped = re.search(r"run failed: no learner step within 8 s \(train.step_timeout=8, slowest step so far "
                        r"0\.0 s\): rollout: \d+ prompt\(s\) not yet generated.*", out)
    assert stopped, job.tail()
    assert "[progress] step" not in out  # it stopped before step 0
    assert took < 20, f"stopped {took:.1f} s after the freeze"
    print(f"frozen at join: stopped after {took:.1f} s: {stopped.group(0)[:200]}")


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

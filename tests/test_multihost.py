"""A job across real network stacks: simulated hosts (network namespaces, each with an sshd) on one bridge.

Host A (198.18.0.2) runs the launcher, the broker, sampler, verifier, packer and learner; hosts B and C
run one generator each, started by the launcher over ssh from a hostfile; host D attaches by hand.
The bus and the tensor sockets are CurveZMQ-secured, as a job past loopback must be.
"""
from __future__ import annotations

import re
import sys
import time

import pytest

from bus.keys import generate_keys, write_subset
from launcher.job.metrics import read_metrics
from tests.launch_util import ROOT, dataset, expected_qids, tiny_overrides
from tests.live_job import LiveProcess, Timeline, job_and_attached
from tests.simhosts import SimHosts, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

BUS = r"\[launcher\] mode: .*; bus (tcp://198\.18\.0\.2:\d+);"


@pytest.fixture
def net(tmp_path):
    with SimHosts(4, tmp_path) as hosts:
        yield hosts


def start_job(net, tmp_path, steps: int, **extra) -> tuple[LiveProcess, object]:
    """The launcher on host A with generators pinned to B and C; returns (job, training data)."""
    a, b, c = (h.addr for h in net.hosts[:3])
    hostfile = net.hostfile(tmp_path / "hosts.txt", [f"{a} slots=1", f"root@{b} slots=1", f"root@{c} slots=1"])
    generate_keys(tmp_path / "keys")
    train = dataset(tmp_path)
    overrides = tiny_overrides(tmp_path / "run", train, **{
        "bus.host": a, "bus.keys_dir": str(tmp_path / "keys"), "actors.generator.count": 2,
        "actors.generator.hosts": f"[{b}, {c}]", "train.steps": steps, "train.checkpoint_every": 0,
        "rollout.request_timeout": 600, **extra})
    job = LiveProcess(net.argv(net.hosts[0], [sys.executable, "-m", "launcher", "--hosts", str(hostfile),
                                              "--ssh-config", net.ssh_config, "--config", "configs/tiny.yaml",
                                              *overrides]), name="job")
    return job, train


def assert_exactly_once(records, train) -> None:
    for m in records:  # every prompt of every step trained once, G = 2 samples each
        expected = expected_qids(train, batch_prompts=2, seed=1, step=m["step"])
        assert sorted(set(m["qids"])) == expected and len(m["qids"]) == 2 * len(expected), m["step"]


def test_rl_job_across_three_hosts(net, tmp_path):
    job, train = start_job(net, tmp_path, steps=4)
    try:
        assert job.wait(240) == 0, job.output(60)
    finally:
        job.stop()
    out = job.output()
    for gen, host in (("generator-0", "198.18.0.3"), ("generator-1", "198.18.0.4")):
        assert re.search(rf"joined: {gen} \(role generator, host {re.escape(host)}, pid \d+\)", out), out[-3000:]
        log = (tmp_path / "run" / "logs" / f"{gen}.log").read_text()
        # rollouts crossed the namespaces over zmq, to the packer's host, from an outbox on the generator's own
        assert re.search(rf"tensors from {re.escape(host)} to host 198\.18\.0\.2 travel over zmq "
                         rf"\(served at tcp://{re.escape(host)}:\d+\)", log), log[-2000:]
        assert "weights updated to version 4" in log
    learner_log = (tmp_path / "run" / "logs" / "learner.log").read_text()
    assert "to host 198.18.0.3 travel over zmq" in learner_log and "to host 198.18.0.4 travel over zmq" in learner_log

    records = read_metrics(tmp_path / "run")
    assert [m["step"] for m in records] == [0, 1, 2, 3]
    assert all(m["generators_updated"] == 2 and m["generators_failed"] == 0 for m in records)
    assert sum(sum(m["groups_by_generator"].values()) for m in records) == 4 * 2
    assert {g for m in records for g in m["groups_by_generator"]} == {"generator-0", "generator-1"}
    assert_exactly_once(records, train)
    deadline = time.monotonic() + 10  # a remote actor ends with its ssh session (SIGHUP)
    while left := leftovers(net, net.hosts[1:3]):
        assert time.monotonic() < deadline, f"actors outlived the job on their hosts: {left}"
        time.sleep(0.2)


def leftovers(net, hosts) -> list[int]:
    """Processes on the hosts other than their sshd."""
    return [p for h in hosts for p in net.pids(h) if p != h.sshd_pid]


ROGUE = """
import asyncio, sys, zmq
from bus.client import BusClient
from tensors.channels.outbox import Curve, Puller
from tensors.errors import TransferError
bus, endpoint, server_key = sys.argv[1:4]
async def main():
    try:
        c = BusClient(bus, "rogue", "generator", connect_timeout=3.0)
        await c.connect()
        print("bus: JOINED")
    except Exception as e:
        print("bus: refused", type(e).__name__)
    for label, puller, key in (("plain", Puller(), None),
                               ("stranger", Puller(curve=Curve(*zmq.curve_keypair(), frozenset())), server_key)):
        try:
            await puller.request(endpoint, b"GET", "0" * 16, peer="gen", timeout=3.0, server_key=key)
            print(f"tensors {label}: ANSWERED")
        except TransferError as e:
            print(f"tensors {label}: refused", e.phase)
        puller.close()
asyncio.run(main())
"""


def test_attach_from_another_host_and_keyless_clients_are_refused(net, tmp_path):
    t = Timeline()
    job, train = start_job(net, tmp_path, steps=400, **{"rollout.max_new_tokens": 32})
    d = net.hosts[3]
    with job_and_attached(job) as keep:
        address = job.wait_for(BUS, 60).group(1)
        job.wait_for_actors(("sampler", "packer", "learner", "verifier-0", "generator-0", "generator-1"))
        t("job up")
        attach_keys = write_subset(tmp_path / "keys", ["generator"], tmp_path / "attach-keys")  # a generator key only
        extra = keep(LiveProcess(net.argv(d, [sys.executable, "-m", "launcher", "attach", "generator", "--bus",
                                              address, "--keys", str(attach_keys), "--name", "generator-d"]),
                                 name="attach"))
        extra.wait_for(r"weights updated to version \d+", 90)
        extra.wait_for(r"\[attach\] generator-d got its first 'generate'", 90)
        t("attached")
        job.wait_for(rf"joined: generator-d \(role generator, host {d.addr}, ", 5)

        # a client on host D without the job's keys: refused on the bus and on a generator's tensor socket
        log = (tmp_path / "run" / "logs" / "generator-0.log").read_text()
        endpoint = re.search(r"served at (tcp://198\.18\.0\.3:\d+)", log).group(1)
        server_key = (tmp_path / "keys" / "generator.key").read_text()
        server_key = re.search(r'public-key = "(.+)"', server_key).group(1)
        r = net.run(d, [sys.executable, "-c", ROGUE, address, endpoint, server_key], cwd=ROOT)
        t("rogue client")
        assert "bus: refused" in r.stdout, r.stdout + r.stderr
        assert "tensors plain: refused" in r.stdout and "tensors stranger: refused" in r.stdout, r.stdout + r.stderr

        # the attached generator is among those the weights reach
        deadline = time.monotonic() + 60
        while not any(m["generators_updated"] == 3 for m in read_metrics(tmp_path / "run")):
            assert time.monotonic() < deadline, "no weight update reached three generators"
            time.sleep(0.5)
    assert_exactly_once(read_metrics(tmp_path / "run"), train)


def test_a_cut_link_moves_prompts_to_the_other_host_and_the_host_comes_back(net, tmp_path):
    t = Timeline()
    job, train = start_job(net, tmp_path, steps=400, **{"rollout.max_new_tokens": 32})
    b = net.hosts[1]
    try:
        job.wait_for(BUS, 60)
        job.wait_for_actors(("sampler", "packer", "learner", "verifier-0", "generator-0", "generator-1"))
        job.wait_for(r"\[progress\] step 3/", 120)
        t("training")
        mark = len(job.lines)
        net.cut(b)
        t("link to B cut")
        job.wait_for(r"generator-0 \(generator\) left the bus", 20, after=mark)
        t("B dropped")
        n = len(read_metrics(tmp_path / "run"))
        deadline = time.monotonic() + 30  # training goes on with C alone
        while len(read_metrics(tmp_path / "run")) < n + 3:
            assert time.monotonic() < deadline, "no progress with host B cut off"
            time.sleep(0.3)
        alone = read_metrics(tmp_path / "run")[-1]
        assert alone["generators_updated"] == 1, alone
        net.mend(b)
        t("link mended")
        job.wait_for(r"joined: generator-0 ", 60, after=mark)  # B registers again ...
        t("B registered again")
        deadline = time.monotonic() + 90  # ... is brought back into the weight updates, and gets prompts
        while not any(m["generators_updated"] == 2 and "generator-0" in m["groups_by_generator"]
                      for m in read_metrics(tmp_path / "run")[n + 3:]):
            assert time.monotonic() < deadline, "host B never came back into the updates and the work"
            time.sleep(0.5)
        t("B back at work")
    except BaseException:
        print(f"--- job ---\n{job.output()}")
        raise
    finally:
        job.stop()
    records = read_metrics(tmp_path / "run")
    assert [m["step"] for m in records] == list(range(len(records)))
    assert_exactly_once(records, train)


def test_a_host_that_refuses_our_key_stops_the_launch_before_anything_starts(net, tmp_path):
    import subprocess
    bad = tmp_path / "other_id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(bad)], check=True)
    config = tmp_path / "bad_ssh_config"
    config.write_text(open(net.ssh_config).read().replace(f"IdentityFile {net.dir / 'id'}", f"IdentityFile {bad}"))
    a, b = net.hosts[0].addr, net.hosts[1].addr
    hostfile = net.hostfile(tmp_path / "hosts.txt", [f"{a} slots=1", f"root@{b} slots=1"])
    generate_keys(tmp_path / "keys")
    train = dataset(tmp_path)
    r = net.run(net.hosts[0], [sys.executable, "-m", "launcher", "--hosts", str(hostfile), "--ssh-config", str(config),
                               "--config", "configs/tiny.yaml", *tiny_overrides(tmp_path / "run", train, **{
                                   "bus.host": a, "bus.keys_dir": str(tmp_path / "keys"),
                                   "actors.generator.hosts": f"[{b}]"})], cwd=ROOT)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert f"root@{b}" in err and "Permission denied (publickey)" in err, err
    assert not (tmp_path / "run" / "logs").exists(), "something started before the hosts were checked"
    assert leftovers(net, net.hosts) == []


def test_the_head_hosts_own_address_starts_its_actors_without_ssh(net, tmp_path):
    a, b = net.hosts[0].addr, net.hosts[1].addr
    hostfile = net.hostfile(tmp_path / "hosts.txt", [f"{a} slots=1", f"root@{b} slots=2"])
    train = dataset(tmp_path)
    r = net.run(net.hosts[0], [sys.executable, "-m", "launcher", "--dry-run", "--hosts", str(hostfile),
                               "--ssh-config", net.ssh_config, "--config", "configs/tiny.yaml",
                               *tiny_overrides(tmp_path / "run", train, **{"bus.host": a, "actors.generator.count": 3,
                                                                           "bus.keys_dir": str(tmp_path / "keys")})],
                cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    blocks = dict(re.findall(r"^# (\S+) on .*\n(.*)$", r.stdout, re.M))
    for name in ("sampler", "packer", "learner", "verifier-0"):
        assert not blocks[name].startswith("ssh"), blocks[name]
    remote = [cmd for cmd in blocks.values() if cmd.startswith("ssh")]
    assert len(remote) == 2 and all(f"-F {net.ssh_config}" in cmd and f"root@{b}" in cmd for cmd in remote)
    assert sorted(re.search(r"CUDA_VISIBLE_DEVICES=(\d)", cmd).group(1) for cmd in remote) == ["0", "1"]


def test_one_learner_rank_on_each_of_two_hosts(net, tmp_path):
    """Learner rank 0 on host A (the head), rank 1 on host B over ssh: one gloo group across the namespaces."""
    a, b = (h.addr for h in net.hosts[:2])
    hostfile = net.hostfile(tmp_path / "hosts.txt", [f"{a} slots=1", f"root@{b} slots=1"])
    generate_keys(tmp_path / "keys")
    train = dataset(tmp_path)
    overrides = tiny_overrides(tmp_path / "run", train, **{
        "bus.host": a, "bus.keys_dir": str(tmp_path / "keys"), "actors.generator.hosts": f"[{a}]",
        "actors.learner.ranks": 2, "actors.learner.hosts": f"[{a}, {b}]", "actors.learner.collective_timeout": 60,
        "ppo.normalize_advantages": "false", "train.steps": 2, "train.checkpoint_every": 0})
    job = LiveProcess(net.argv(net.hosts[0], [sys.executable, "-m", "launcher", "--hosts", str(hostfile),
                                              "--ssh-config", net.ssh_config, "--config", "configs/tiny.yaml",
                                              *overrides]), name="job")
    try:
        assert job.wait(300) == 0, job.output(60)
    finally:
        job.stop()
    rank1 = (tmp_path / "run" / "logs" / "learner-rank-1.log").read_text()
    assert f"learner rank 1 of 2 joined the group at {a}:" in rank1, rank1[-2000:]
    assert "learner rank 1: step 1 done" in rank1
    records = read_metrics(tmp_path / "run")
    assert [m["step"] for m in records] == [0, 1] and all(m["grad_norm"] > 0 for m in records)
    assert_exactly_once(records, train)
    deadline = time.monotonic() + 10  # rank 1 ends with its ssh session
    while left := leftovers(net, net.hosts[1:2]):
        assert time.monotonic() < deadline, f"learner rank 1 outlived the job on its host: {left}"
        time.sleep(0.2)

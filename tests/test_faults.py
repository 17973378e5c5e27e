"""Faults at the process level: real launcher, broker and actor processes on loopback, SIGKILLed on cue.

Each test launches a whole RL job with the tiny random model, waits for a line of its output, does
harm (kills a generator, the learner, the broker, or the whole run) and then checks the learner's
record of trained query ids: every prompt of every step trained exactly once.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest

from launcher.job.metrics import read_metrics
from tests.launch_util import dataset, expected_qids, launch, tiny_overrides
from tests.live_job import descendants

pytestmark = pytest.mark.timeout(240)
HB = 0.2  # bus.heartbeat_interval of every job here (liveness 3: a silent peer is gone after 0.6 s)


# ----------------------------------------------------------------------------------------- helpers

class LiveJob:
    """A launcher subprocess whose output is read line by line, for tests that act on cue."""

    def __init__(self, args: list[str], keys: Path | None = None):
        self.keys = keys
        self.run_dir = next(a.split("=", 1)[1] for a in args if a.startswith("run_dir="))
        self.proc = launch(args, wait=False)
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.address = re.search(r"bus (tcp://\S+);", self.wait_for(r"\[launcher\] mode: ", 60)[1]).group(1)

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line.rstrip("\n")))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> tuple[float, str]:
        """The first output line from index `start` on matching `pattern`: (arrival time, line)."""
        rx, deadline = re.compile(pattern), time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    if rx.search(self.lines[i][1]):
                        return self.lines[i]
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r} within {timeout} s; last lines:\n"
                                         + self.tail())
                self._cond.wait(min(left, 0.5))

    def tail(self, n: int = 60) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines[-n:])

    def output(self) -> str:
        with self._cond:
            return "\n".join(line for _, line in self.lines)

    def client_kwargs(self) -> dict:
        from bus.keys import client_kwargs
        return client_kwargs(self.keys)

    def call(self, fn, timeout: float = 10.0, **client_kwargs):
        """Run ``await fn(client)`` with a fresh bus client of the job's bus (keyed if the bus is)."""
        from bus.client import BusClient

        async def go():
            c = BusClient(self.address, f"test-{os.getpid()}-{time.monotonic_ns()}", "tool", heartbeat_interval=HB,
                          **(client_kwargs or self.client_kwargs()))
            await c.connect(timeout=timeout)
            try:
                return await fn(c)
            finally:
                await c.close()
        return asyncio.run(go())

    def actors(self, timeout: float = 10.0) -> dict:
        """name -> ActorInfo of everyone on the job's bus."""
        return self.call(lambda c: _by_name(c.actors(timeout=timeout)), timeout)

    def wait_actors(self, names: set[str], timeout: float = 90.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = self.actors()
            if names <= set(found):
                return found
            assert time.monotonic() < deadline, f"actors {sorted(names - set(found))} never joined:\n{self.tail()}"
            time.sleep(0.3)

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except Exception:
            raise AssertionError(f"the launcher did not exit within {timeout} s; last lines:\n{self.tail()}")
        self._reader.join(5)
        return rc

    def kill_all(self) -> None:
        """SIGKILL the launcher and every process of the job (actors run in sessions of their own;
        those a dead launcher left behind are found by the run dir they name)."""
        for pid in [self.proc.pid, *descendants(self.proc.pid), *job_processes(self.run_dir)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)
        self._reader.join(5)


async def _by_name(listing) -> dict:
    return {a.name: a for a in await listing}


@pytest.fixture
def jobs():
    """Every LiveJob a test starts is torn down (all its processes SIGKILLed) whatever happens."""
    started: list[LiveJob] = []

    def start(args: list[str], keys: Path | None = None) -> LiveJob:
        job = LiveJob(args, keys)
        started.append(job)
        return job
    yield start
    for job in started:
        if job.proc.poll() is None or descendants(job.proc.pid) or job_processes(job.run_dir):
            job.kill_all()


def job_processes(run_dir: str | Path, known: dict[int, str] | None = None) -> list[int]:
    """Live processes of the job on `run_dir`: those of `known` (pid -> command line, a snapshot
    taken while the launcher lived) still running that command, and any whose command line or
    environment names the run dir.  A dead launcher's children are reparented to init, so
    descendants() of the launcher no longer finds them: leaks are only visible this way."""
    marker = str(run_dir).encode()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        pid = int(d.name)
        try:
            cmdline = (d / "cmdline").read_bytes()
            environ = (d / "environ").read_bytes()
        except OSError:
            continue
        same = known is not None and known.get(pid) == cmdline.replace(b"\0", b" ").decode()
        if (same or marker in cmdline or b"BOBA_RUN_DIR=" + marker + b"\0" in environ) and alive(pid):
            found.append(pid)
    return found


def commands_of(pid: int) -> dict[int, str]:
    """pid -> command line of every process under ``pid``."""
    out = {}
    for p in descendants(pid):
        try:
            out[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of the sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.append(addr)
    return found


def job_args(run_dir: Path, train: Path, **overrides) -> list[str]:
    return ["--config", "configs/tiny.yaml",
            *tiny_overrides(run_dir, train, **{"bus.heartbeat_interval": HB, **overrides})]


def assert_exactly_once(run_dir: Path, train: Path, batch_prompts: int, group_size: int, steps) -> None:
    """Every prompt of every step trained once, with its G samples, by the learner's own record
    (RUN_DIR/trained.jsonl, a line per trained step, rolled back with the weights on a resume): no
    step twice, none missing, not a de-duplicated view."""
    from actors.learner.trained_log import read_trained
    records = read_trained(run_dir)
    assert [m["step"] for m in records] == list(steps), f"steps in trained.jsonl: {[m['step'] for m in records]}"
    by_step = {m["step"]: m for m in records}
    for step in steps:
        qids = by_step[step]["qids"]
        want = expected_qids(train, batch_prompts=batch_prompts, seed=1, step=step)
        assert sorted(set(qids)) == want, f"step {step}: trained {sorted(set(qids))}, expected {want}"
        assert sorted(qids) == sorted(q for q in want for _ in range(group_size)), f"step {step}: {qids}"


# ----------------------------------------------------------------------------------------- the faults

def test_sigkill_one_of_two_generators_mid_step(tmp_path, jobs):
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    job = jobs(job_args(run_dir, train, **{"train.steps": 3, "actors.generator.count": 2,
                                           "rollout.batch_prompts": 4, "rollout.max_new_tokens": 48}))
    victims = job.wait_actors({"generator-0", "generator-1"})
    assert job.address.startswith("tcp://127.0.0.1:")  # the default binds loopback only
    assert listening(int(job.address.rsplit(":", 1)[1])) == ["0100007F"]  # 127.0.0.1, and nothing else
    # batch 1 is dealt to both generators the moment version 1 is announced: kill one while it generates
    job.wait_for(r"\[sampler\].*batch 1 admitted", 120)
    os.kill(victims["generator-1"].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    rc = job.finish(120)
    out = job.output()
    assert rc == 0, job.tail()
    held = re.search(r"generator-1 left holding (\d+) prompts: dealing them again", out)
    assert held and int(held.group(1)) > 0, "the killed generator held no prompt: the kill came too late"
    redealt_at, _ = job.wait_for(r"generator-1 left holding", 1)
    assert redealt_at - killed_at < 3 * HB + 1.0  # the broker's expiry window, plus scheduling
    print(f"generator SIGKILL: {held.group(1)} prompts dealt again {redealt_at - killed_at:.2f} s after the kill")

    records = read_metrics(run_dir)
    assert_exactly_once(run_dir, train, batch_prompts=4, group_size=2, steps=range(3))
    assert records[-1]["generators_updated"] == 1 and records[-1]["generators_failed"] == 0


def test_sigkill_whole_run_then_resume_continues_from_the_checkpoint(tmp_path, jobs):
    from actors import protocol as P
    from actors.learner.checkpoint import list_checkpoints, restore_optimizer, state_digest
    from launcher.config import load_config
    from policies.model.loading import load_model
    from policies.train.ppo import make_optimizer

    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    args = job_args(run_dir, train, **{"train.steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 2})
    job = jobs(args)
    job.wait_for(r"\[progress\] step 3/4", 150)  # steps 0-2 trained; the checkpoint of step 2 is on disk
    pids = [job.proc.pid, *descendants(job.proc.pid)]
    job.kill_all()
    deadline = time.monotonic() + 10  # pool workers of a killed verifier see their pipes close and exit
    while [p for p in pids if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "a process of the killed run survived"
    first = read_metrics(run_dir)
    assert [m["step"] for m in first] == [0, 1, 2]
    assert [c.name for c in list_checkpoints(run_dir)] == ["step-000002"], "killed too late: not between checkpoints"
    ckpt = list_checkpoints(run_dir)[0]
    saved = json.loads((ckpt / "state.json").read_text())

    again = jobs(args + ["--resume"])
    assert "steps 2..4" in again.output()
    again.wait_actors({"learner"})
    state = again.call(lambda c: c.request(P.LEARNER, P.LEARNER_STATE, {"qids": False}, timeout=10))
    assert again.finish(150) == 0, again.tail()

    records = read_metrics(run_dir)
    resumed = records[len(first):]
    assert [(m["step"], m["version"]) for m in resumed] == [(2, 3), (3, 4)]  # the same step numbers
    assert_exactly_once(run_dir, train, batch_prompts=2, group_size=2, steps=range(4))
    assert sorted(resumed[0]["qids"]) == sorted(first[2]["qids"])  # step 2 saw the same prompts both times
    out = again.output()
    assert re.search(r"\[sampler\].*batch 2 admitted", out) and not re.search(r"batch [01] admitted", out)
    # the resumed learner holds exactly what was saved, and so do the files on disk
    assert state["resumed"] == {"checkpoint": str(ckpt), "step": 2, "digest": saved["digest"]}
    model = load_model(ckpt / "model")
    opt = make_optimizer(model, load_config(run_dir / "config.yaml").ppo)
    restore_optimizer(ckpt, opt)
    assert state_digest(model, opt) == saved["digest"]


def test_sigkill_of_the_launcher_alone_ends_every_process_of_the_job(tmp_path, jobs):
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    job = jobs(job_args(run_dir, train, **{"train.steps": 30}))
    job.wait_for(r"\[progress\] step 1/30", 150)  # every actor up and training
    procs = commands_of(job.proc.pid)
    assert sum("bus.broker" in c for c in procs.values()) == 1 and len(procs) >= 7, procs
    os.kill(job.proc.pid, signal.SIGKILL)  # only the launcher: nothing else is told
    job.proc.wait(10)
    deadline = time.monotonic() + 10
    while (left := job_processes(run_dir, procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes outlived their launcher: {[procs.get(p, p) for p in left]}"


def test_a_second_launcher_on_a_live_run_dir_is_refused_naming_the_holder(tmp_path, jobs):
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    args = job_args(run_dir, train, **{"train.steps": 100_000})  # still running while the others try
    job = jobs(args)
    job.wait_for(r"\[progress\] step 1/100000", 150)
    for extra in ([], ["--resume"]):
        second = launch(args + extra, timeout=60)
        assert second.returncode == 1, second.stdout[-3000:]
        assert f"run dir {run_dir} is in use by a live launcher (pid {job.proc.pid}" in second.stdout + second.stderr
    assert job.proc.poll() is None, "the first job runs on"
    job.kill_all()


def test_a_stalled_rollout_stops_the_run_naming_the_stage(tmp_path, jobs):
    """A generator frozen mid-run holds the rollout: no heartbeat failure stops a non-critical role,
    so without the watchdog the run waits for ever."""
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    job = jobs(job_args(run_dir, train, **{"train.steps": 100_000, "train.step_timeout": 8}))
    gen = job.wait_actors({"generator-0"})["generator-0"]
    job.wait_for(r"\[progress\] step 3/100000", 150)
    os.kill(gen.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    rc = job.finish(90)
    assert rc == 1, job.tail()
    out = job.output()
    stopped = re.search(r"run failed: no learner step within \d+ s \(train.step_timeout=8, slowest step so far "
                        r"[\d.]+ s\): rollout: \d+ prompt\(s\) not yet generated.*", out)
    assert stopped, job.tail()
    assert time.monotonic() - frozen_at < 60
    print(stopped.group(0))


def test_broker_restart_mid_step_actors_register_again_and_nothing_is_lost(tmp_path, jobs):
    import zmq

    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    limit = 1 << 20
    job = jobs(job_args(run_dir, train, **{"train.steps": 3, "bus.max_message_bytes": limit}))
    job.wait_for(r"\[sampler\].*batch 1 admitted", 150)  # prompts of step 1 in flight
    broker = [p for p, cmd in commands_of(job.proc.pid).items() if "bus.broker" in cmd]
    assert len(broker) == 1
    os.kill(broker[0], signal.SIGKILL)
    killed_at, n = time.monotonic(), len(job.lines)
    job.wait_for(r"\[launcher\] the broker exited with code -9; starting it again", 10, start=n)
    serving_at, _ = job.wait_for(r"\[broker\] BROKER tcp://", 30, start=n)
    # the new broker meets garbage and an oversized frame while the run goes on
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(job.address)
    raw.send(b"\x93not msgpack at all")
    raw.send_multipart([b"two", b"frames"])
    raw.send(b"x" * (limit + 4096))
    assert job.finish(150) == 0, job.tail()
    raw.close()
    ctx.term()

    back = [job.wait_for(rf"{name}: registered again with the broker", 1, start=n)[0]
            for name in ("sampler", "packer", "learner", "generator-0", "verifier-0")]
    print(f"broker SIGKILL: serving again after {serving_at - killed_at:.2f} s, all actors registered again "
          f"after {max(back) - killed_at:.2f} s; the launcher exited {time.monotonic() - killed_at:.1f} s after the kill")
    assert_exactly_once(run_dir, train, batch_prompts=2, group_size=2, steps=range(3))
    broker_log = (run_dir / "logs" / "broker.log").read_text()
    assert "not msgpack" in broker_log and "2 frames, expected 1" in broker_log
    assert "exceeds the bus limit" in broker_log


def test_frozen_learner_is_reported_within_the_heartbeat_window_and_stops_the_run(tmp_path, jobs):
    from bus.client import BusClient
    from bus.errors import BusTimeout
    from bus.keys import generate_keys

    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    keys = generate_keys(tmp_path / "keys")
    # more steps than the test lets it run: the learner must still be training when it is frozen
    job = jobs(job_args(run_dir, train, **{"train.steps": 30, "bus.keys_dir": keys}), keys=keys)
    learner = job.wait_actors({"learner"})["learner"]  # a keyed client gets in
    procs = commands_of(job.proc.pid)

    async def unkeyed():
        c = BusClient(job.address, "intruder", "tool", heartbeat_interval=HB)
        await c.connect(timeout=1.0)
    with pytest.raises(BusTimeout, match="registration reply"):  # an unkeyed client is refused
        asyncio.run(unkeyed())
    assert "intruder" not in job.actors()

    job.wait_for(r"\[progress\] step 1/30", 150)
    os.kill(learner.pid, signal.SIGSTOP)  # hung, not dead: only the missing heartbeats tell
    frozen_at = time.monotonic()
    seen_at, _ = job.wait_for(r"learner \(learner\) missed heartbeats; its process \d+ is alive", 10)
    rc = job.finish(60)
    stopped_at = time.monotonic()
    assert rc == 1
    assert re.search(r"run failed: learner \(learner\) missed heartbeats and did not register again within "
                     r"[\d.]+ s .*hung\?\) \(train.on_learner_death=stop\)", job.output())
    detected = seen_at - frozen_at
    assert detected < 3 * HB + 1.0, f"frozen learner reported {detected:.2f} s after SIGSTOP"
    assert stopped_at - frozen_at < 20
    assert not job_processes(run_dir, procs), "a process of the stopped run survived its launcher"
    print(f"frozen learner: reported after {detected:.2f} s, launcher exited after {stopped_at - frozen_at:.1f} s")


def test_dead_learner_restarts_the_run_from_its_last_checkpoint(tmp_path, jobs):
    train = dataset(tmp_path)
    run_dir = tmp_path / "run"
    job = jobs(job_args(run_dir, train, **{"train.steps": 4, "train.checkpoint_every": 1,
                                           "train.keep_checkpoints": 2, "train.on_learner_death": "restart"}))
    learner = job.wait_actors({"learner"})["learner"]
    job.wait_for(r"\[progress\] step 2/4", 150)  # steps 0-1 trained and checkpointed
    os.kill(learner.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    seen_at, _ = job.wait_for(r"learner exited with code -9", 10)
    job.wait_for(r"restarting from the last checkpoint \(1/3\)", 30)
    job.wait_for(r"\[launcher\] mode: .*steps 2\.\.4", 60)
    assert job.finish(180) == 0, job.tail()
    detected = seen_at - killed_at
    assert detected < HB + 0.5, f"dead learner reported {detected:.2f} s after SIGKILL"
    records = read_metrics(run_dir)
    assert [m["step"] for m in records] == [0, 1, 2, 3]
    assert_exactly_once(run_dir, train, batch_prompts=2, group_size=2, steps=range(4))
    print(f"dead learner: reported after {detected:.3f} s")

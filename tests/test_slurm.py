"""Jobs on a real Slurm: `sbatch examples/slurm/multi_node.sbatch` on three simulated nodes (tests.slurm_cluster).

n1 is the head (launcher, broker, control actors), generators run as `srun` steps on n2 and n3. One cluster
for the module; each test submits the example script itself (CI has no gres: `--gpus-per-node=0` and one
CPU per task on the command line override the script's requests). Two jobs in all, each asserting much:
a run that completes through a lost node, and a run that is requeued, resumed and stopped with scancel.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.job.engines import slurm
from launcher.job.engines.slurm_step import slurm_devices
from launcher.job.hosts import Host
from launcher.job.metrics import read_metrics
from tests.launch_util import ROOT, dataset, expected_qids, tiny_overrides
from tests.slurm_cluster import SlurmCluster, skip_reason


SCRIPT = str(ROOT / "examples" / "slurm" / "multi_node.sbatch")
NODES = ("n1", "n2", "n3")


def test_gpus_and_devices_come_from_slurm(monkeypatch):
    detail = ("JobId=7 JobName=x\n   Nodes=n[1-2] CPU_IDs=0-7 Mem=0 GRES=gpu:a100:4(IDX:0-3)\n"
              "   Nodes=n3 CPU_IDs=0-7 Mem=0 GRES=gpu:2(IDX:4-5),gpu:v100:1(IDX:6)\n   Nodes=n4 CPU_IDs=0 Mem=0 GRES=\n")
    names = {"n[1-2]": "n1\nn2\n", "n3": "n3\n", "n4": "n4\n"}
    monkeypatch.setattr(slurm, "_scontrol", lambda *a: names[a[2]] if a[:2] == ("show", "hostnames") else "")
    assert slurm.gpus_per_node(detail) == {"n1": 4, "n2": 4, "n3": 3, "n4": 0}
    # the planner's indices, as the ids Slurm gave the step (a node shared with another job: GPUs 4-7)
    assert slurm_devices("0", "4,5,6,7") == "4" and slurm_devices("1,2", "4,5,6,7") == "5,6"
    assert slurm_devices("1", None) == "1"  # Slurm gave no GPUs: the planned index stands


def test_outside_an_allocation_and_the_srun_command(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(slurm.HostsError, match=r"^--slurm: not inside a Slurm allocation \(SLURM_JOB_ID"):
        slurm.allocation_hosts()
    argv = slurm.ENGINE.command(Host("n2", 8, engine="slurm"), [sys.executable, "-m", "launcher", "actor",
                                "generator", "--name", "generator-3"], {"CUDA_VISIBLE_DEVICES": "3"}, "/proj")
    assert argv[:8] == ["srun", "--overlap", "--nodes=1", "--ntasks=1", "--nodelist=n2", "--job-name=generator-3",
                        "--kill-on-bad-exit=1", "--chdir=/proj"]
    assert argv[8:13] == [sys.executable, slurm.STEP, "generator-3", "CUDA_VISIBLE_DEVICES=3", "--"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=3) as sc:
        yield sc


class Submitted:
    def __init__(self, sc: SlurmCluster, tmp: Path, steps: int, **extra):
        self.sc, self.run_dir, self.out = sc, tmp / "run", tmp / "job.out"
        self.train = dataset(tmp)
        overrides = tiny_overrides(self.run_dir, self.train, **{
            "actors.generator.count": 2, "actors.generator.hosts": "[n2, n3]", "train.steps": steps,
            "rollout.request_timeout": 600, **extra})
        env = {**sc.env, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "BOBA_TORCH_THREADS": "1",
               "BOBA_PROJECT": str(ROOT), "RUN_DIR": str(self.run_dir)}
        self.id = sc.sbatch(["--gpus-per-node=0", "--cpus-per-task=1", f"--output={self.out}", SCRIPT,
                             *overrides], env=env, cwd=ROOT)

    def output(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (m := re.search(pattern, self.output(), re.M)):
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s: {self.output()[-3000:]}"
            time.sleep(0.3)
        return m

    def log(self, name: str) -> str:
        return (self.run_dir / "logs" / f"{name}.log").read_text(errors="replace")


def assert_exactly_once(records, train) -> None:
    for m in records:  # every prompt of every step trained once, G = 2 samples each
        expected = expected_qids(train, batch_prompts=2, seed=1, step=m["step"])
        assert sorted(set(m["qids"])) == expected and len(m["qids"]) == 2 * len(expected), m["step"]


def assert_nothing_left(sc: SlurmCluster, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while (queue := sc.squeue()) or (left := {n: sc.node_pids(n) for n in NODES if sc.node_pids(n)}):
        assert time.monotonic() < deadline, f"left after the job: queue {queue}, processes {locals().get('left')}"
        time.sleep(0.3)


def steps_done(job: Submitted) -> list[int]:
    return [int(s) for s in re.findall(r"^\[progress\] step (\d+)/", job.output(), re.M)]


def wait_steps(job: Submitted, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(steps_done(job)) < n:
        assert time.monotonic() < deadline, f"fewer than {n} steps within {timeout} s: {job.output()[-3000:]}"
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.timeout(600)  # the waits inside are bounded; this is for a loaded machine
@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_sbatch_trains_on_three_nodes_and_a_lost_node_is_a_lost_host(cluster, tmp_path):
    """The example script on n1-n3: generators on n2 and n3 as srun steps. n3 is set DOWN and its cable cut
    mid-run (--no-kill): the run goes on with n2's generator and completes, every step once; nothing is
    left anywhere (n3's step ends once n3 is back). Meanwhile, --dry-run in an allocation of its own."""
    steps = 8
    job = Submitted(cluster, tmp_path, steps=steps)
    wait_steps(job, 2, 300)
    n3 = cluster.names["n3"]
    cluster.net.cut(n3)
    r = cluster.run(["scontrol", "update", "nodename=n3", "state=down", "reason=test-lost-node"])
    assert r.returncode == 0, r.stderr
    lost_at = len(steps_done(job))
    assert lost_at < steps - 1, "the run finished before the node was lost"
    # --dry-run under salloc on n1-n2, the launcher on its first node (as in sbatch)
    dry = subprocess.Popen(cluster.inside(cluster.ctl, [
        "salloc", "-N2", "--cpus-per-task=1", "srun", "-N1", "-n1", "-w", "n1", sys.executable, "-m", "launcher",
        "--slurm", "--dry-run", "--config", "configs/tiny.yaml", *tiny_overrides(tmp_path / "dry", job.train, **{
            "actors.generator.count": 2})]), env={**cluster.env, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    dry_out = dry.communicate(timeout=300)[0]
    assert dry.returncode == 0, dry_out
    assert re.search(r"^# generator-\d on n2.*\nsrun --overlap --nodes=1 --ntasks=1 --nodelist=n2 --job-name=generator-\d "
                     r".*slurm_step\.py generator-\d .*-- .* -m launcher actor generator", dry_out, re.M), dry_out
    assert re.search(r"^# generator-\d on n1", dry_out, re.M) and not (tmp_path / "dry" / "keys").exists()

    state = cluster.wait_state(job.id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
    out = job.output()
    assert state == "COMPLETED", out[-4000:]
    assert f"training finished at step {steps}" in out
    # the head's bus address comes from Slurm (n1's NodeAddr), the keys are the run's own
    assert re.search(rf"bus tcp://{re.escape(cluster.addr('n1'))}:\d+;", out), out[:2000]
    assert (job.run_dir / "keys" / "broker.key").exists()
    for gen, node in (("generator-0", "n2"), ("generator-1", "n3")):
        log = job.log(gen)
        assert re.search(rf"^\[slurm\] {gen}: Slurm step {job.id}\.\d+ on {node}$", log, re.M), log[:2000]
    assert f"weights updated to version {steps}" in job.log("generator-0")  # every update reached n2
    # a lost node is a lost host: its generator's step ends, named by its Slurm step id
    assert re.search(rf"generator-1 \(Slurm step {job.id}\.\d+ on n3\) exited with code", out), out[-3000:]
    records = read_metrics(job.run_dir)
    assert [m["step"] for m in records] == list(range(steps))
    assert all(m["generators_updated"] == 2 and m["generators_failed"] == 0 for m in records[:2])
    late = [m for m in records if m["step"] >= lost_at + 1]
    assert late and all(set(m["groups_by_generator"]) == {"generator-0"} for m in late), late
    assert_exactly_once(records, job.train)
    trained = [json.loads(ln)["step"] for ln in (job.run_dir / "trained.jsonl").read_text().splitlines()]
    assert trained == list(range(steps))
    cluster.net.mend(n3)  # n3's slurmd registers again (now: reconfigure) and ends the step of a job that is gone
    cluster.run(["scontrol", "update", "nodename=n3", "state=resume"])
    cluster.run(["scontrol", "reconfigure"])
    assert_nothing_left(cluster, within=60)


@pytest.mark.slow
@pytest.mark.timeout(600)  # the waits inside are bounded; this is for a loaded machine
@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_requeue_resumes_with_the_same_data_order(cluster, tmp_path):
    """USR1 (what `--signal=B:USR1@120` sends before the time limit): a checkpoint, `scontrol requeue`, the
    job comes back with --resume and continues the exactly-once record in the same data order; a generator
    attached from a second allocation registers with it again. Then `scancel --batch --signal=TERM` (the
    graceful stop: a checkpoint, every actor on every node gone within seconds), and a plain `scancel` of
    the attached generators' allocation."""
    deadline = time.monotonic() + 60
    while cluster.idle() != set(NODES):
        assert time.monotonic() < deadline, f"nodes not idle: {cluster.run(['sinfo', '-N']).stdout}"
        time.sleep(0.5)
    port = 29555
    job = Submitted(cluster, tmp_path, steps=500, **{"train.checkpoint_every": 0, "bus.port": port})
    bus = f"tcp://{cluster.addr('n1')}:{port}"
    wait_steps(job, 1, 300)
    env = {**cluster.env, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "BOBA_TORCH_THREADS": "1",
           "BOBA_PROJECT": str(ROOT)}
    attach_out = tmp_path / "attach.out"
    attach = cluster.sbatch(["--nodes=1", "--nodelist=n2", "--gpus-per-node=0", "--cpus-per-task=1",
                             f"--output={attach_out}", str(ROOT / "examples" / "slurm" / "attach.sbatch"), bus,
                             str(job.run_dir)], env=env, cwd=ROOT)
    deadline = time.monotonic() + 240
    while "got its first" not in (attach_out.read_text() if attach_out.exists() else ""):
        assert time.monotonic() < deadline, attach_out.read_text() if attach_out.exists() else "no output"
        time.sleep(0.5)
    before = len(steps_done(job))

    assert cluster.run(["scancel", "--batch", "--signal=USR1", job.id]).returncode == 0
    m = job.wait_for(r"checkpoint written at step (\d+)", 60)
    ckpt = int(m.group(1))
    job.wait_for(r"^\[job\.sh\] job \d+ \(restart 1\)", 90)
    wait_steps(job, before + 2, 300)  # the requeued job trains on
    out = job.output()
    assert f"steps {ckpt}..500" in out, out[-3000:]
    trained = [json.loads(ln) for ln in (job.run_dir / "trained.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in trained]
    assert steps == list(range(len(steps))) and len(steps) > ckpt, steps  # each step once, none lost
    for r in trained:  # the data order of a run that never stopped
        expected = expected_qids(job.train, batch_prompts=2, seed=1, step=r["step"])
        assert sorted(set(r["qids"])) == expected, r["step"]
    broker_log = job.log("broker")
    assert len(re.findall(r"joined: generator-n2-\d+ ", broker_log)) >= 2, broker_log[-3000:]

    t0 = time.monotonic()
    assert cluster.run(["scancel", "--batch", "--signal=TERM", job.id]).returncode == 0
    m = job.wait_for(rf"checkpoint written at step (?!{ckpt}\b)(\d+)", 60)
    assert (job.run_dir / "checkpoints" / f"step-{int(m.group(1)):06d}").is_dir()
    cluster.wait_state(job.id, {"COMPLETED", "FAILED", "CANCELLED"}, 60)
    gone = time.monotonic() - t0
    assert cluster.run(["scancel", attach]).returncode == 0
    assert_nothing_left(cluster, within=30)
    print(f"[test] job ended {gone:.1f} s after scancel --batch --signal=TERM; all gone after "
          f"{time.monotonic() - t0:.1f} s")

"""Jobs on a real Slurm: `sbatch examples/slurm/multi_node.sbatch` on three simulated nodes (tests.slurm_cluster).

n1 is the head (launcher, broker, control actors), generators run as `srun` steps on n2 and n3. One cluster
for the module; each test submits the example script itself (CI has no gres: `--gpus-per-node=0` and one
CPU per task on the command line override the script's requests).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from launcher.job.metrics import read_metrics
from tests.launch_util import ROOT, dataset, expected_qids, tiny_overrides
from tests.slurm_cluster import SlurmCluster, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]

SCRIPT = str(ROOT / "examples" / "slurm" / "multi_node.sbatch")
NODES = ("n1", "n2", "n3")


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


def test_sbatch_trains_on_three_nodes(cluster, tmp_path):
    job = Submitted(cluster, tmp_path, steps=3)
    state = cluster.wait_state(job.id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 150)
    out = job.output()
    assert state == "COMPLETED", out[-4000:]
    assert "training finished at step 3" in out
    # the head's bus address comes from Slurm (n1's NodeAddr), the keys are the run's own
    assert re.search(rf"bus tcp://{re.escape(cluster.addr('n1'))}:\d+;", out), out[:2000]
    assert (job.run_dir / "keys" / "broker.key").exists()
    for gen, node in (("generator-0", "n2"), ("generator-1", "n3")):
        log = job.log(gen)
        assert re.search(rf"^\[slurm\] {gen}: Slurm step {job.id}\.\d+ on {node}$", log, re.M), log[:2000]
        assert "weights updated to version 3" in log, log[-2000:]
    records = read_metrics(job.run_dir)
    assert [m["step"] for m in records] == [0, 1, 2]
    assert all(m["generators_updated"] == 2 and m["generators_failed"] == 0 for m in records)
    assert {g for m in records for g in m["groups_by_generator"]} == {"generator-0", "generator-1"}
    assert_exactly_once(records, job.train)
    trained = [json.loads(ln) for ln in (job.run_dir / "trained.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trained] == [0, 1, 2]
    assert_nothing_left(cluster)

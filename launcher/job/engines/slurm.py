"""The Slurm engine: inside an allocation (sbatch, salloc), the job's nodes are the hosts and every remote
actor is an `srun` step on its node.

The nodes come from the allocation (SLURM_JOB_NODELIST expanded by `scontrol show hostnames`), the launching
node is the head (first host), each node's slots are its GPUs in the job (`scontrol show job -d`), else 1.
A step is `srun --overlap` (the batch step holds the node's CPUs; --overlap also shares the job's GPUs
with the step, and slurm_step.py picks the planned ones among them) on one node (`--nodelist`), so it ends
with the allocation, with `scancel`, and with its srun (SIGTERM is forwarded); a node that fails ends its
steps, and the launcher sees an actor exit, as for a lost ssh host. Needs the job run with `--no-kill`
for the allocation to outlive a failed node.
"""
from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from bus.broker import is_loopback_host
from launcher.job.hosts import Host, HostsError

STEP = str(Path(__file__).with_name("slurm_step.py"))
SCONTROL_TIMEOUT = 30  # seconds; a controller that does not answer is an error, named


def _scontrol(*args: str) -> str:
    try:
        r = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=SCONTROL_TIMEOUT)
    except FileNotFoundError:
        raise HostsError("--slurm: scontrol not found: is this a Slurm node?") from None
    except subprocess.TimeoutExpired:
        raise HostsError(f"--slurm: `scontrol {' '.join(args)}` did not answer within {SCONTROL_TIMEOUT} s") from None
    if r.returncode != 0:
        raise HostsError(f"--slurm: `scontrol {' '.join(args)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def job_id() -> str:
    jid = os.environ.get("SLURM_JOB_ID")
    if not jid:
        raise HostsError("--slurm: not inside a Slurm allocation (SLURM_JOB_ID is not set): "
                         "run the launcher from an sbatch script or an salloc shell")
    return jid


def gpus_per_node(job_detail: str) -> dict[str, int]:
    """Node -> GPUs of the job there, from `scontrol show job -d`'s lines "Nodes=n[1-2] ... GRES=gpu:4(IDX:0-3)"."""
    out: dict[str, int] = {}
    for line in job_detail.splitlines():
        m = re.search(r"\bNodes=(\S+).*\bGRES=(\S*)", line)
        if not m:
            continue
        n = sum(int(g.group(1)) for g in re.finditer(r"gpu(?::[^:(,]+)?:(\d+)", m.group(2)))
        for node in _scontrol("show", "hostnames", m.group(1)).split():
            out[node] = n
    return out


def allocation_hosts() -> list[Host]:
    """The allocation's nodes as hosts, this (launching) node first: the head runs the control actors."""
    jid = job_id()
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise HostsError(f"--slurm: job {jid} has no SLURM_JOB_NODELIST in the environment")
    nodes = _scontrol("show", "hostnames", nodelist).split()
    gpus = gpus_per_node(_scontrol("show", "job", "-d", jid))
    me = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    if me not in nodes:
        raise HostsError(f"--slurm: this node ({me}) is not one of job {jid}'s nodes ({', '.join(nodes)})")
    nodes.remove(me)
    # Slurm says each node's GPUs: the planner (launcher.job.placement) takes them as said, 0 included.
    return [Host(n, max(1, gpus.get(n, 0)), gpus=gpus.get(n, 0), engine="slurm") for n in [me, *nodes]]


def node_address(node: str) -> str:
    """The node's address as Slurm knows it (NodeAddr): where the other nodes reach the bus on the head."""
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", node))
    return m.group(1) if m else node


class SlurmEngine:
    name = "slurm"

    def command(self, host, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
        name = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--name"), argv[-1])
        # srun exports the launcher's environment (--export=ALL); the planned variables travel on the
        # wrapper's command line (a value may hold commas, which --export cannot carry)
        return ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={host.name}", f"--job-name={name}",
                "--kill-on-bad-exit=1", f"--chdir={cwd}", sys.executable, STEP, name,
                *(f"{k}={v}" for k, v in sorted(env.items())), "--", *argv]

    async def check(self, hosts: list, timeout: float = 60.0) -> None:
        """One step on all the hosts at once: every node answers before anything starts."""
        names = ",".join(h.name for h in hosts)
        argv = ["srun", "--overlap", f"--nodes={len(hosts)}", f"--ntasks={len(hosts)}", "--ntasks-per-node=1",
                f"--nodelist={names}", "--job-name=boba-check", "true"]
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise HostsError(f"--slurm: a step on {names} did not run within {timeout:.0f} s") from None
        if proc.returncode != 0:
            lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
            raise HostsError(f"--slurm: a step on {names} failed ({proc.returncode}): "
                             + (lines[-1] if lines else "(no output)"))


ENGINE = SlurmEngine()


def prepare(cfg, make_keys: bool = True) -> list[Host]:
    """The allocation's hosts, with the config made ready for them: a loopback bus moves to the head's
    address (NodeAddr), and an unsecured one gets CurveZMQ keys in RUN_DIR/keys (made once, kept for a
    requeued job and for generators attached from other allocations: `attach --keys RUN_DIR/keys`)."""
    hosts = allocation_hosts()
    if is_loopback_host(cfg.bus.host):
        cfg.bus.host = node_address(hosts[0].name)
    if not cfg.bus.keys_dir:
        keys = Path(cfg.run_dir) / "keys"
        if make_keys and not (keys / "broker.key").exists():
            from bus.keys import generate_keys
            generate_keys(keys)
        cfg.bus.keys_dir = str(keys)
    return hosts

"""A real Slurm cluster on simulated hosts: slurmctld, munged and one slurmd per network namespace.

    with SlurmCluster(tmp_path, nodes=3) as sc:       # controller "ctl" + nodes n1..n3
        job = sc.sbatch(["examples/slurm/multi_node.sbatch"], env={...})
        sc.wait_state(job, "COMPLETED", 120)

Each host is a namespace of tests.simhosts on one bridge (no sshd: Slurm starts everything). Each
daemon runs in a UTS namespace of its own with its node's hostname, so slurmd finds its NodeName and
the job's processes see their node's name, and in a mount namespace of its own with the cluster's
hosts file bound over /etc/hosts, so node names resolve everywhere. One munged (its unix socket is shared by all
namespaces) signs for everyone. No cgroups (proctrack/linuxproc, task/none), no gres, short timers
(cred_expire: how long a requeued job waits). Needs root and Debian's slurm-wlm + munge.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.simhosts import SimHosts, skip_reason as net_skip_reason

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "srun", "scontrol", "squeue", "scancel")


def skip_reason() -> str | None:
    why = net_skip_reason()
    if why:
        return why
    missing = [d for d in DAEMONS if not shutil.which(d) and not os.path.exists(f"/usr/sbin/{d}")]
    if missing:
        return f"a simulated Slurm cluster needs {', '.join(missing)}: apt-get install slurm-wlm munge"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, workdir: Path, nodes: int = 3, *, cpus: int = 2, prefix: str | None = None):
        self.dir = Path(workdir) / "slurm"
        self.net = SimHosts(nodes + 1, workdir, prefix=prefix, sshd=False)
        self.ctl = self.net.hosts[0]
        self.nodes = [f"n{i}" for i in range(1, nodes + 1)]
        self.names = {"ctl": self.ctl, **{n: h for n, h in zip(self.nodes, self.net.hosts[1:])}}
        self.cpus = cpus
        self.conf = self.dir / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def addr(self, node: str) -> str:
        return self.names[node].addr

    # ---- start and stop ----
    def start(self) -> None:
        self.net.start()
        for sub in ("ctld", "spool", "log"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for n in self.nodes:
            (self.dir / "spool" / n).mkdir(exist_ok=True)
        self.hosts_file = self.dir / "hosts"
        self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.addr} {n}\n" for n, h in self.names.items()))
        (self.dir / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        self._munge()
        self.conf.write_text(self._conf())
        self._daemon(self.ctl, "ctl", [_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self.run(["scontrol", "ping"]).stdout.count("UP") >= 1, 30, "slurmctld answering")
        for n in self.nodes:
            self._daemon(self.names[n], n, [_exe("slurmd"), "-D", "-f", str(self.conf)], f"slurmd-{n}")
        self._wait(lambda: self.idle() == set(self.nodes), 60, "every node idle")

    def _munge(self) -> None:
        m = self.dir / "munge"
        m.mkdir(exist_ok=True, mode=0o700)
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = str(m / "munge.sock")
        p = subprocess.Popen([_exe("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                              f"--key-file={key}", f"--pid-file={m / 'munged.pid'}",
                              f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)
        self._wait(lambda: os.path.exists(self.munge_socket), 10, "munged's socket")

    def _conf(self) -> str:
        d = self.dir
        nodes = "".join(f"NodeName={n} NodeAddr={self.addr(n)} CPUs={self.cpus} RealMemory=1000 State=UNKNOWN\n"
                        for n in self.nodes)
        return f"""ClusterName=boba
SlurmctldHost=ctl({self.ctl.addr})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation={d / 'ctld'}
SlurmdSpoolDir={d / 'spool'}/%n
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'spool'}/slurmd-%n.pid
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log'}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=5
KillWait=3
MinJobAge=60
InactiveLimit=0
ReturnToService=2
PropagateResourceLimits=NONE
SchedulerParameters=sched_interval=1
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

    def _daemon(self, host, hostname: str, argv: list[str], log: str) -> None:
        out = open(self.dir / "log" / f"{log}.out", "ab")
        p = subprocess.Popen(self.inside(host, argv, hostname), env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)

    def inside(self, host, argv: list[str], hostname: str | None = None) -> list[str]:
        """`argv` in the host's network namespace, with the cluster's /etc/hosts (and a hostname of its own)."""
        set_name = f"hostname {hostname} && " if hostname else ""
        return ["nsenter", f"--net=/run/netns/{host.ns}", "unshare", "--mount", *(["--uts"] if hostname else []),
                "--", "sh", "-c", f'mount --bind {self.hosts_file} /etc/hosts && {set_name}exec "$@"', "sh", *argv]

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ok():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                logs = "; ".join(f"{p.name}: {p.read_text(errors='replace')[-600:]}"
                                 for p in sorted((self.dir / "log").glob("*")) if p.is_file())
                raise RuntimeError(f"simulated Slurm: no {what} within {timeout} s. Logs: {logs}")
            time.sleep(0.3)

    def close(self) -> None:
        if self.conf.exists():
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True, timeout=20)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        self.net.close()  # kills whatever is left in the namespaces (job steps included)

    # ---- what tests do ----
    def run(self, argv: list[str], *, host: str = "ctl", timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command on a host (the controller's by default: the login node)."""
        return subprocess.run(self.inside(self.names[host], argv), env=kw.pop("env", self.env),
                              capture_output=True, text=True, timeout=timeout, **kw)

    def idle(self) -> set[str]:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split("\n")
        return {ln.split()[0] for ln in out if ln.strip() and ln.split()[1] == "idle"}

    def sbatch(self, argv: list[str], **kw) -> str:
        r = self.run(["sbatch", "--parsable", *argv], **kw)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(argv)}: {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        r = self.run(["scontrol", "show", "job", job, "-o"])
        for tok in r.stdout.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "GONE"

    def wait_state(self, job: str, states: set[str] | str, timeout: float) -> str:
        states = {states} if isinstance(states, str) else states
        deadline = time.monotonic() + timeout
        while (s := self.state(job)) not in states:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job} is {s}, not {'/'.join(sorted(states))}, after {timeout} s")
            time.sleep(0.5)
        return s

    def squeue(self) -> list[str]:
        return [ln for ln in self.run(["squeue", "-h", "-o", "%i %T %N"]).stdout.splitlines() if ln.strip()]

    def node_pids(self, node: str) -> list[int]:
        """Processes in a node's namespace other than its slurmd."""
        ours = {p.pid for p in self.procs}
        return [p for p in self.net.pids(self.names[node]) if p not in ours]

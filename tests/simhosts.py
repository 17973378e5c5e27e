"""Simulated hosts: Linux network namespaces on one bridge, each with its own address and a real sshd.

    with SimHosts(3, tmp_path) as net:       # hosts 198.18.0.2 .. 198.18.0.4
        net.hostfile(tmp_path / "hosts.txt", ["198.18.0.2 slots=1", "root@198.18.0.3"])
        proc = net.popen(net.hosts[0], [sys.executable, "-m", "launcher", "--ssh-config", net.ssh_config, ...])
        net.cut(net.hosts[1]); ...; net.mend(net.hosts[1])

Nothing is created in the caller's own namespace: the bridge lives in a namespace of its own, each
host's veth is made inside its namespaces, and the addresses come from 198.18.0.0/15 (set aside for
network tests) with no route out. The launcher reaches the hosts over ssh exactly as on a cluster,
with a throw-away key pair and a known_hosts file made here (`ssh -F ssh_config`). `close()` kills
every process left in the namespaces (sshd included) and deletes them, also after a failed test.
Needs root, `ip` and `sshd`; `skip_reason()` says why not, in one line.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "198.18.0"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def skip_reason() -> str | None:
    """Why simulated hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces)"
    if not shutil.which("ip"):
        return "simulated hosts need iproute2 (`ip`): apt-get install iproute2"
    if not os.path.exists(SSHD) or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        return "simulated hosts need openssh-server and openssh-client: apt-get install openssh-server"
    probe = f"boba-probe-{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def enter(ns: str) -> None:
    """Move the calling thread (and the threads and processes it starts later) into namespace `ns`."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{ns}") as f:
        if libc.setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into {ns}")


@dataclass
class SimHost:
    ns: str  # the network namespace
    addr: str  # its address on the simulated LAN
    sshd_pid: int | None = None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class SimHosts:
    def __init__(self, n: int, workdir: Path, *, prefix: str | None = None, sshd: bool = True):
        self.sshd = sshd
        self.dir = Path(workdir) / "simhosts"
        self.prefix = prefix or f"boba{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.hosts = [SimHost(f"{self.prefix}-h{i}", f"{SUBNET}.{i + 2}") for i in range(n)]
        self.ssh_config = str(self.dir / "ssh_config")
        self._made: list[str] = []

    def __enter__(self) -> SimHosts:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._keys()
        self._netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts):
            self._netns(h.ns)
            port = f"p{i}"
            _ip("link", "add", "eth0", "netns", h.ns, "type", "veth", "peer", "name", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            if self.sshd:
                self._sshd(h)
        for h in self.hosts if self.sshd else ():
            self._wait_for_ssh(h)

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def _keys(self) -> None:
        for key in ("host_key", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"boba-simhosts-{key}",
                            "-f", str(self.dir / key)], check=True, capture_output=True)
        (self.dir / "authorized_keys").write_text((self.dir / "id.pub").read_text())
        host_pub = " ".join((self.dir / "host_key.pub").read_text().split()[:2])
        (self.dir / "known_hosts").write_text("".join(f"{h.addr} {host_pub}\n" for h in self.hosts))
        (self.dir / "ssh_config").write_text(
            "Host *\n"
            f"  IdentityFile {self.dir / 'id'}\n"
            "  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {self.dir / 'known_hosts'}\n"
            "  StrictHostKeyChecking yes\n"
            "  LogLevel ERROR\n")

    def _sshd(self, h: SimHost) -> None:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        conf = self.dir / f"sshd_{h.addr}.conf"
        conf.write_text(
            f"ListenAddress {h.addr}\n"
            f"HostKey {self.dir / 'host_key'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PidFile none\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n")
        log = open(self.dir / f"sshd_{h.addr}.log", "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", h.ns, SSHD, "-D", "-e", "-f", str(conf)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        h.sshd_pid = proc.pid  # `ip netns exec` execs sshd: the same process

    def _wait_for_ssh(self, h: SimHost, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.run(h, ["ssh", "-F", self.ssh_config, "-o", "BatchMode=yes", "-o", "ConnectTimeout=2",
                             f"root@{h.addr}", "true"])
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                log = (self.dir / f"sshd_{h.addr}.log").read_text(errors="replace")
                raise RuntimeError(f"sshd on simulated host {h.addr} not reachable within {timeout} s: "
                                   f"{r.stderr.strip()}; sshd log: {log[-500:]}")
            time.sleep(0.2)

    # ---- what tests do with the hosts ----
    def argv(self, h: SimHost, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", h.ns, *argv]

    def run(self, h: SimHost, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(h, argv), capture_output=True, text=True, timeout=60, **kw)

    def hostfile(self, path: Path, lines: list[str]) -> Path:
        path.write_text("\n".join(lines) + "\n")
        return path

    def cut(self, h: SimHost) -> None:
        """Pull the host's cable: its switch port goes down (the host's own interface stays up)."""
        _ip("-n", self.switch, "link", "set", f"p{self.hosts.index(h)}", "down")

    def mend(self, h: SimHost) -> None:
        _ip("-n", self.switch, "link", "set", f"p{self.hosts.index(h)}", "up")

    def pids(self, h: SimHost) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", h.ns], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def close(self) -> None:
        for ns in reversed(self._made):
            for _ in range(3):
                r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
                pids = [int(p) for p in r.stdout.split() if int(p) != os.getpid()]  # we may have entered one
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.2)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

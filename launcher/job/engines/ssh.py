"""The ssh engine: hosts of a hostfile, reached with `ssh -tt` (the remote process ends with its ssh)."""
from __future__ import annotations

import asyncio
import os
import shlex

from launcher.job.hosts import HostsError

# what a local actor inherits from the launcher and a remote one gets on its command line
FORWARDED_ENV = ("BOBA_TORCH_THREADS", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "PYTHONUNBUFFERED")
SSH_CONNECT_TIMEOUT = 10  # seconds; ssh's own limit on reaching a host
SSH_ALIVE = (10, 3)  # a host silent for 10 s x 3 probes ends its ssh, and so its actor (-tt: SIGHUP)


def ssh_argv(host, *, tty: bool = False) -> list[str]:
    """`ssh [-tt] [-F config] -o ... user@host`: no prompts, bounded connect, dead links noticed."""
    argv = ["ssh"] + (["-tt"] if tty else []) + (["-F", host.ssh_config] if host.ssh_config else [])
    return argv + ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT}",
                   "-o", f"ServerAliveInterval={SSH_ALIVE[0]}", "-o", f"ServerAliveCountMax={SSH_ALIVE[1]}",
                   host.ssh_target]


class SshEngine:
    name = "ssh"

    def command(self, host, argv: list[str], env: dict[str, str], cwd: str) -> list[str]:
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ} | env
        envs = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
        remote = f"cd {shlex.quote(cwd)} && {envs + ' ' if envs else ''}exec {shlex.join(argv)}"
        # -tt: a remote terminal, so the remote process gets SIGHUP and ends with this ssh (stopped by
        # the launcher, or the connection lost); without one it would outlive the job on its host
        return ssh_argv(host, tty=True) + [remote]

    async def check(self, hosts: list, timeout: float = SSH_CONNECT_TIMEOUT) -> None:
        """Without this an unreachable host shows up only as an actor that never joins, after the rest
        of the job has started."""
        async def probe(host) -> str | None:
            argv = ssh_argv(host) + ["true"]
            try:
                proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                            stdout=asyncio.subprocess.PIPE,
                                                            stderr=asyncio.subprocess.STDOUT)
            except OSError as exc:
                return f"{host}: cannot run ssh ({exc})"
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), timeout + 5)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                return f"{host}: no answer over ssh within {timeout + 5:.0f} s"
            if proc.returncode != 0:
                lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
                return f"{host}: ssh exited with code {proc.returncode}: {lines[-1] if lines else '(no output)'}"
            return None

        problems = [p for p in await asyncio.gather(*(probe(h) for h in hosts)) if p]
        if problems:
            raise HostsError(f"unreachable host{'s' if len(problems) > 1 else ''} (ssh -o BatchMode=yes): "
                             + "; ".join(problems))


ENGINE = SshEngine()

"""Hand each remote host the bus keys of its own roles, over ssh, before its actors start.

A host gets the broker's public key, every client public key (tensor outboxes let each other in) and
the secrets of the key classes its actors register (bus.keys.write_subset): never the broker's
secret, nor another role's. A host running only generators holds a generator key and can be a
generator, nothing else. The directory lands in the remote user's ~/.boba/keys/<job> (mode 0700,
files 0600) and the host's actors are started with `--keys` pointing at it.
"""
from __future__ import annotations

import asyncio
import dataclasses
import io
import tarfile
import tempfile
import uuid

from launcher.job.hosts import Host, HostsError
from launcher.job.engines.ssh import SSH_CONNECT_TIMEOUT, ssh_argv
from launcher.job.spawn import ProcessSpec


async def ship_keys(keys_dir: str, specs: list[ProcessSpec]) -> list[ProcessSpec]:
    """`specs` with each remote actor's argv given `--keys DIR`, DIR holding its host's keys only."""
    from bus.keys import write_subset
    by_host: dict[Host, set[str]] = {}
    for s in specs:
        # ssh hosts only: a Slurm job's nodes read the run directory's keys on the shared filesystem
        # (engines/slurm.py prepare: mode 0700, the job's user only), where no copy would be private
        if s.host is not None and not s.host.is_local and s.host.engine == "ssh":
            by_host.setdefault(s.host, set()).add(s.role)
    token = uuid.uuid4().hex[:12]

    async def ship(host: Host, roles: set[str]) -> tuple[Host, str]:
        with tempfile.TemporaryDirectory() as tmp:
            subset = write_subset(keys_dir, sorted(roles), f"{tmp}/keys")
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for p in sorted(subset.iterdir()):
                    tar.add(p, arcname=p.name)
        remote = (f'umask 077 && d="$HOME/.boba/keys/{token}" && mkdir -p "$d" && tar -x -C "$d" '
                  f'--no-same-owner && chmod 600 "$d"/* && echo "$d"')
        proc = await asyncio.create_subprocess_exec(*ssh_argv(host), remote, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(buf.getvalue()), SSH_CONNECT_TIMEOUT + 20)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise HostsError(f"{host}: copying the bus keys over ssh took over {SSH_CONNECT_TIMEOUT + 20} s") from None
        lines = out.decode(errors="replace").split()
        if proc.returncode != 0 or not lines:
            raise HostsError(f"{host}: could not copy the bus keys over ssh (exit {proc.returncode}): "
                             f"{err.decode(errors='replace').strip()[-300:] or 'no output'}")
        return host, lines[-1]

    shipped = dict(await asyncio.gather(*(ship(h, r) for h, r in by_host.items())))
    return [dataclasses.replace(s, argv=[*s.argv, "--keys", shipped[s.host]]) if s.host in shipped else s
            for s in specs]

"""GPU placement: which devices each process of a GPU job gets, and what cannot work, refused up front.

The core (`assign`, `server_hosts`) is pure over an inventory, a plain list of (host name, GPU count)
(what a hostfile's `gpus=`, `actors.gpus_per_host` or detection on this machine says; a Slurm allocation
gives the same list), so CI checks it against any cluster. Device numbers are indices into a host's GPUs;
`device_ids` maps them to what CUDA_VISIBLE_DEVICES names (the launcher's own list on this machine).

Rules: every learner rank gets a GPU of its own, first; every SGLang server gets `sglang_tp_size` free
GPUs of one host; a server goes onto learner rank 0's GPU only when asked
(`actors.generator.sglang_share_learner_gpu`, then with `sglang_mem_fraction_static`); torch generators
take a free GPU of their host, else share one. A job whose learner host has no GPU (or `model.device: cpu`)
is a CPU job and is planned by slots alone, as before.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from launcher.job.hosts import Host, HostsError

Inventory = list[tuple[str, int]]  # (host name, GPUs), head host first


@dataclass(frozen=True)
class Demand:
    """What one process needs: `gpus` devices on `host`; kind learner | sglang | torch."""
    name: str
    host: str
    gpus: int
    kind: str


def assign(inventory: Inventory, demands: list[Demand], *, share_learner_gpu: bool = False) -> dict[str, tuple[int, ...]]:
    """Each demand's device indices on its host; HostsError (naming the config key) for what cannot fit.
    Learner ranks are served first, then servers, then torch generators (which may share)."""
    total = {h.lower(): n for h, n in inventory}
    free = {h: list(range(n)) for h, n in total.items()}
    out: dict[str, tuple[int, ...]] = {}
    rank0: tuple[str, int] | None = None
    shared = False
    for d in (d for d in demands if d.kind == "learner"):
        host = d.host.lower()
        if not free.get(host):
            n = sum(1 for x in demands if x.kind == "learner" and x.host.lower() == host)
            raise HostsError(f"actors.learner.ranks: {n} learner rank(s) on {d.host} need a GPU each, it has "
                             f"{total.get(host, 0)} (hostfile gpus=, actors.gpus_per_host)")
        out[d.name] = (free[host].pop(0),)
        rank0 = rank0 or (host, out[d.name][0])
    for d in (d for d in demands if d.kind == "sglang"):
        host = d.host.lower()
        if d.gpus > total.get(host, 0):
            raise HostsError(f"actors.generator.sglang_tp_size: {d.name}'s server needs {d.gpus} GPU(s) on one "
                             f"host, {d.host} has {total.get(host, 0)} (hostfile gpus=, actors.gpus_per_host)")
        if len(free[host]) >= d.gpus:
            out[d.name] = tuple(free[host][:d.gpus])
            del free[host][:d.gpus]
        elif share_learner_gpu and d.gpus == 1 and rank0 and rank0[0] == host and not shared:
            out[d.name], shared = (rank0[1],), True
        else:
            hint = ("; one server may share learner rank 0's GPU: actors.generator.sglang_share_learner_gpu: true"
                    if d.gpus == 1 and rank0 and rank0[0] == host and not share_learner_gpu else "")
            raise HostsError(f"actors.generator.count: {d.name}'s server needs {d.gpus} free GPU(s) on {d.host}, "
                             f"{len(free[host])} left after the learner ranks and the other servers{hint}")
    shares: dict[str, int] = {}
    for d in (d for d in demands if d.kind == "torch"):
        host = d.host.lower()
        if free.get(host):
            out[d.name] = (free[host].pop(0),)
        elif total.get(host):  # a torch generator shares a GPU (round-robin) rather than run on the CPU
            shares[host] = shares.get(host, -1) + 1
            out[d.name] = (shares[host] % total[host],)
        else:
            out[d.name] = ()
    return out


def server_hosts(inventory: Inventory, learner_gpus: dict[str, int], tp_size: int, count: int,
                 share_learner_gpu: bool = False) -> list[str]:
    """Hosts for `count` SGLang servers of `tp_size` GPUs, spread over the GPUs the learner ranks leave
    (round-robin by free capacity, head first); more than fit go where `assign` will refuse them."""
    cap = {h: max(0, n - learner_gpus.get(h.lower(), 0)) // tp_size for h, n in inventory}
    if share_learner_gpu and tp_size == 1 and inventory and not cap[inventory[0][0]]:
        cap[inventory[0][0]] = 1
    order = [h for k in range(max(cap.values(), default=0)) for h, _ in inventory if k < cap[h]]
    order = order or [inventory[0][0]]
    return [order[i % len(order)] for i in range(count)]


def device_ids(host: Host, count: int) -> list[str]:
    """What CUDA_VISIBLE_DEVICES names for a host's GPUs 0..count-1: on this machine the launcher's own
    CUDA_VISIBLE_DEVICES where set (a job confined to GPUs 4-7 stays there), else the indices."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if host.is_local else ""
    ids = [d.strip() for d in visible.split(",") if d.strip()]
    return ids[:count] if len(ids) >= count else [str(i) for i in range(count)]


def local_gpus() -> int:
    """GPUs this machine offers the job: CUDA_VISIBLE_DEVICES where set, else `nvidia-smi -L`, else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def inventory(hosts: list[Host], gpus_per_host: int | None, *, gpu_job: bool | None = None) -> Inventory:
    """Each host's GPU count: the hostfile's gpus=, else actors.gpus_per_host, else detected on this
    machine; a remote host without either counts its slots in a GPU job (its slots are its GPUs)."""
    out = []
    for h in hosts:
        if h.gpus is not None:
            n = h.gpus
        elif gpus_per_host is not None:
            n = gpus_per_host
        elif h.is_local:
            n = local_gpus()
        else:
            n = h.slots if gpu_job else 0
        out.append((h.name, n))
    return out

"""Bandwidth of the CPU tensor channels against a plain memcpy of the same bytes, in the same run.

    python bench/tensors.py                 # 1, 8, 64, 512 MB; about a minute
    python bench/tensors.py --sizes 1 16 --repeats 5

The sender is this process, the receiver a separate (spawned) process, as in a real deployment.
One transfer = send() + shipping the descriptor over a pipe + recv() in the receiver (tensors
ready, pages mapped) + its ack.  `memcpy` copies the same bytes into an already-faulted buffer
(torch copy_, same threads).  Rounds interleave memcpy and every channel so that load from other
processes hits them alike.  The first transfer of each size (cold: segments created, pages
faulted) is shown apart; the figures are medians of the warm rounds.
Goals: shm >= 0.5x memcpy, zmq on loopback >= 1 GB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from tensors.channels import open_channel  # noqa: E402

MB = 1 << 20


def _receiver(kind: str, conn) -> None:
    async def loop() -> None:
        chan = open_channel(kind)
        while True:
            desc = conn.recv()
            if desc is None:
                break
            payload = await chan.recv(desc, timeout=60)
            t = payload["x"]
            check = int(t[:: max(1, t.numel() // 64)].sum())  # touch a little, to prove it arrived
            del payload, t
            conn.send(check)
        await chan.close()

    asyncio.run(loop())


class Sender:
    """A channel plus the spawned process that receives from it."""

    def __init__(self, kind: str):
        ctx = mp.get_context("spawn")
        self.kind = kind
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_receiver, args=(kind, child), daemon=True)
        self.proc.start()
        self.chan = open_channel(kind)

    async def transfer(self, x: torch.Tensor, expected: int) -> float:
        t0 = time.perf_counter()
        desc = await self.chan.send({"x": x}, timeout=60)
        self.pipe.send(desc)
        got = self.pipe.recv()
        elapsed = time.perf_counter() - t0
        if got != expected:
            raise RuntimeError(f"{self.kind}: wrong data arrived for {x.numel() * 4 // MB} MB")
        return elapsed

    async def close(self) -> None:
        self.pipe.send(None)
        self.proc.join(30)
        await self.chan.close()


def memcpy_time(src: torch.Tensor, dst: torch.Tensor) -> float:
    t0 = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t0


async def run(kinds: list[str], sizes: list[int], repeats: int) -> dict:
    senders = [Sender(k) for k in kinds]
    results: dict = {k: {} for k in ["memcpy", *kinds]}
    try:
        for size in sizes:
            x = torch.randint(0, 1 << 30, (size // 4,), dtype=torch.int32)
            expected = int(x[:: max(1, x.numel() // 64)].sum())
            dst = torch.empty_like(x)
            dst.copy_(x)  # fault the destination's pages in: this is the plain-copy ceiling
            cold = {s.kind: await s.transfer(x, expected) for s in senders}
            rounds: dict = {k: [] for k in ["memcpy", *kinds]}
            for _ in range(repeats):
                rounds["memcpy"].append(memcpy_time(x, dst))
                for s in senders:
                    rounds[s.kind].append(await s.transfer(x, expected))
            for k in rounds:
                results[k][size] = (cold.get(k), rounds[k])
            del x, dst
    finally:
        for s in senders:
            await s.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 64, 512], help="payload sizes in MB (<= 512)")
    ap.add_argument("--repeats", type=int, default=5, help="warm rounds per size")
    ap.add_argument("--kinds", nargs="+", default=["shm", "zmq"], choices=["shm", "zmq"])
    args = ap.parse_args()
    if max(args.sizes) > 512 or min(args.sizes) < 1:
        ap.error("sizes must be between 1 and 512 MB (memory safety on small machines)")
    sizes = [s * MB for s in args.sizes]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    results = asyncio.run(run(args.kinds, sizes, args.repeats))
    head = f"{'size':>7} {'memcpy GB/s':>12}"
    for k in args.kinds:
        head += f" {k + ' GB/s':>10} {'x memcpy':>8} {'cold GB/s':>9}"
    print(head)
    met = {k: True for k in args.kinds}
    for size in sizes:
        base = size / statistics.median(results["memcpy"][size][1]) / 1e9
        row = f"{size // MB:>5}MB {base:>12.2f}"
        for k in args.kinds:
            cold, warm = results[k][size]
            bw = size / statistics.median(warm) / 1e9
            row += f" {bw:>10.2f} {bw / base:>8.2f} {size / cold / 1e9:>9.2f}"
            met[k] &= (bw / base >= 0.5) if k == "shm" else (bw >= 1.0)
        print(row)
    for k, ok in met.items():
        goal = ">= 0.5x memcpy" if k == "shm" else ">= 1 GB/s"
        print(f"{k}: goal {goal} at every size: {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()

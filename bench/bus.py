"""Bus round trips through the broker vs raw pyzmq DEALER/ROUTER round trips, same run.

    python bench/bus.py [--n 5000] [--total 40000] [--window 128]

Broker path: client A (this process) -> broker (own process) -> actor B (own process) ->
broker -> A, i.e. a full `await a.request("b", "echo", body)`. Raw path: a sync pyzmq DEALER
(this process) -> ROUTER echo server (own process) -> back. Both carry the same small body.
Prints, per path, sequential ping-pong latency (p50/p99), pipelined throughput with `window`
requests in flight, and CPU seconds per round trip summed over the processes of that path
(robust to a busy machine, where wall-clock figures mostly measure the scheduler), then the
ratios broker/raw. The broker path sends twice the messages of the raw path through three
processes instead of two, so on a machine with fewer free cores than that the pipelined ratio
is bounded by the CPU ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zmq  # noqa: E402

BODY = {"prompt_id": 12345, "version": 7, "n": 16}


def _raw_echo(port_q) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.sndhwm = s.rcvhwm = 100_000
    port_q.put(s.bind_to_random_port("tcp://127.0.0.1"))
    while True:
        msg = s.recv_multipart()
        if msg[1] == b"quit":
            return
        s.send_multipart(msg)


def _broker(addr_q) -> None:
    from bus.broker import Broker

    b = Broker("tcp://127.0.0.1:0")
    addr_q.put(b.open())
    b.serve_forever()


def _echo_actor(address: str, ready) -> None:
    from actors.base import Actor, handler, run

    class Echo(Actor):
        @handler("echo")
        async def echo(self, body, src):
            return body

        async def on_start(self):
            ready.set()

    run(Echo("b", "echo", address))


def cpu_seconds(pid: int) -> float:
    """user+system CPU of a process, all threads (zmq IO threads included), from /proc."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(lat: list[float]) -> tuple[float, float]:
    lat = sorted(lat)
    return lat[len(lat) // 2] * 1e6, lat[int(len(lat) * 0.99)] * 1e6


def bench_raw(port: int, n: int, total: int, window: int) -> dict:
    import msgpack

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.sndhwm = s.rcvhwm = 100_000
    s.connect(f"tcp://127.0.0.1:{port}")
    packer = msgpack.Packer()
    frame = packer.pack({"v": 1, "type": "echo", "src": "a", "dst": "b", "cid": 1, "body": BODY})
    for _ in range(200):
        s.send(frame)
        s.recv()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        s.send(packer.pack({"v": 1, "type": "echo", "src": "a", "dst": "b", "cid": 1, "body": BODY}))
        msgpack.unpackb(s.recv())
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(window):
        s.send(frame)
    for i in range(total):
        msgpack.unpackb(s.recv())
        if i + window < total:
            s.send(packer.pack({"v": 1, "type": "echo", "src": "a", "dst": "b", "cid": i, "body": BODY}))
    thr = total / (time.perf_counter() - t)
    s.send(b"quit")
    s.close(linger=1000)
    ctx.term()
    p50, p99 = percentiles(lat)
    return {"p50": p50, "p99": p99, "seq": n / sum(lat), "thr": thr}


async def bench_bus(address: str, n: int, total: int, window: int) -> dict:
    from bus.client import BusClient

    a = BusClient(address, "a", "bench")
    await a.connect()
    for _ in range(200):
        await a.request("b", "echo", BODY)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        await a.request("b", "echo", BODY, timeout=10)
        lat.append(time.perf_counter() - t)

    async def worker(k: int) -> None:
        for _ in range(k):
            await a.request("b", "echo", BODY, timeout=30)

    t = time.perf_counter()
    await asyncio.gather(*[worker(total // window) for _ in range(window)])
    thr = (total // window) * window / (time.perf_counter() - t)
    await a.close()
    p50, p99 = percentiles(lat)
    return {"p50": p50, "p99": p99, "seq": n / sum(lat), "thr": thr}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=5000, help="sequential round trips")
    p.add_argument("--total", type=int, default=40000, help="pipelined round trips")
    p.add_argument("--window", type=int, default=128, help="requests in flight when pipelining")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each path; the best is kept")
    a = p.parse_args()
    spawn = mp.get_context("spawn")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())

    q = spawn.Queue()
    echo = spawn.Process(target=_raw_echo, args=(q,), daemon=True)
    broker = spawn.Process(target=_broker, args=(q,), daemon=True)
    echo.start()
    port = q.get(timeout=30)
    broker.start()
    address = q.get(timeout=30)
    ready = spawn.Event()
    actor = spawn.Process(target=_echo_actor, args=(address, ready), daemon=True)
    actor.start()
    assert ready.wait(30), "echo actor did not start"

    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    raws, buses = [], []
    for r in range(a.repeats):
        if r:
            echo = spawn.Process(target=_raw_echo, args=(q,), daemon=True)
            echo.start()
            port = q.get(timeout=30)
        c0 = cpu_seconds(os.getpid()) + cpu_seconds(echo.pid)
        raws.append(bench_raw(port, a.n, a.total, a.window))
        raws[-1]["cpu"] = (cpu_seconds(os.getpid()) + cpu_seconds(echo.pid) - c0) / (a.n + a.total + 200)
        echo.join(10)
        c0 = cpu_seconds(os.getpid()) + cpu_seconds(broker.pid) + cpu_seconds(actor.pid)
        buses.append(run(bench_bus(address, a.n, a.total, a.window)))
        buses[-1]["cpu"] = (cpu_seconds(os.getpid()) + cpu_seconds(broker.pid) + cpu_seconds(actor.pid) - c0) / (
            a.n + a.total + 200)

    def best(rs: list[dict]) -> dict:
        return {"p50": min(r["p50"] for r in rs), "p99": statistics.median(r["p99"] for r in rs),
                "seq": max(r["seq"] for r in rs), "thr": max(r["thr"] for r in rs), "cpu": min(r["cpu"] for r in rs)}

    raw, bus = best(raws), best(buses)
    print(f"cpu cores: {os.cpu_count()}, loop: {run.__module__}, body: {BODY}, best of {a.repeats} runs")
    print(f"load average before: {load}; all figures are round trips (request + reply)")
    print(f"{'path':<8}{'seq msgs/s':>12}{'p50 us':>9}{'p99 us':>9}{'pipelined msgs/s':>18}{'cpu us/rt':>11}")
    for name, r in (("raw", raw), ("broker", bus)):
        print(f"{name:<8}{r['seq']:>12.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['thr']:>18.0f}{r['cpu'] * 1e6:>11.1f}")
    print(f"ratio broker/raw: sequential throughput {bus['seq'] / raw['seq']:.2f}x, "
          f"pipelined throughput {bus['thr'] / raw['thr']:.2f}x, p50 latency {bus['p50'] / raw['p50']:.2f}x, "
          f"cpu per round trip {bus['cpu'] / raw['cpu']:.2f}x")
    print(f"goals: pipelined >= 0.4x raw: {'met' if bus['thr'] >= 0.4 * raw['thr'] else 'NOT met'}; "
          f"p50 < 300 us: {'met' if bus['p50'] < 300 else 'NOT met'}")
    for proc in (broker, actor):
        proc.terminate()
        proc.join(5)


if __name__ == "__main__":
    main()

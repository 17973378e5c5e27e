"""Embed one generator actor in an asyncio service of your own.

The service here stands for yours: a small HTTP endpoint (`GET /health`) on its own port. The
generator runs in the same event loop as the service; its decode steps and weight loads run in a
worker thread, so the service keeps answering while it generates. It joins a running job's bus,
gets the job's current weights from the broadcaster at once, serves prompts, and leaves the bus
cleanly on Ctrl-C, or by itself when the job ends (its learner announces the last step, or the
job's broker stays silent for --job-gone-after seconds).

    source .venv/bin/activate                    # or prefix each line with .venv/bin/
    python -m launcher --config configs/tiny.yaml -o train.steps=200 &   # a job; note "bus tcp://HOST:PORT"
    python examples/embed_generator.py --bus tcp://HOST:PORT --port 8080
    curl http://127.0.0.1:8080/health
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
import uuid

from actors import protocol as P
from actors.generator.generator import Generator
from actors.generator.torch_backend import TorchBackend
from bus.client import BusClient
from bus.errors import BusError
from bus.keys import client_kwargs
from policies.data.prompts import stop_ids
from policies.model.loading import load_model, load_tokenizer


class CountingTorchBackend(TorchBackend):
    """The torch backend, counting the groups it has generated (what our endpoint reports)."""
    groups_generated = 0

    async def generate_group(self, rid, prompt_ids, n, sampling):
        samples = await super().generate_group(rid, prompt_ids, n, sampling)
        self.groups_generated += 1
        return samples


async def job_model(bus: str, keys: dict) -> tuple[str, int]:
    """Ask the job's launcher which model it trains and at which step it started."""
    client = BusClient(bus, f"embed-{uuid.uuid4().hex[:8]}", "tool", **keys)
    await client.connect()
    try:
        reply = await client.request(P.LAUNCHER, P.CONFIG, {}, timeout=10.0)
    finally:
        await client.close()
    return reply["model_path"], int(reply["step"])


async def make_generator(name: str, bus: str, model_path: str | None, keys: dict) -> Generator:
    step = 0
    if model_path is None:
        model_path, step = await job_model(bus, keys)
    # loading is blocking work: keep it off the loop so the service answers meanwhile
    model, tok = await asyncio.to_thread(lambda: (load_model(model_path), load_tokenizer(model_path)))
    backend = CountingTorchBackend(model, stop_token_ids=tuple(stop_ids(tok)))
    backend.engine.version = step  # the broadcaster sends the current weights as soon as we join
    return Generator(name, bus, backend=backend, tokenizer=tok, **keys)


async def until_the_job_ends(gen: Generator, bus: str, gone_after: float, stop: asyncio.Event) -> None:
    """Set `stop` when the job ends: the learner's run.finished, or a broker silent for `gone_after` s
    (a job stopped by Ctrl-C or killed takes its broker with it; the bus client would retry forever)."""
    def finished(topic, body, src):
        print(f"[service] the job finished (step {(body or {}).get('step')}): leaving", flush=True)
        stop.set()
    await gen.bus.subscribe(P.RUN_FINISHED, finished)
    silent_since = None
    while not stop.is_set():
        await asyncio.sleep(0.5)
        if gen.bus.registered:
            silent_since = None
        elif silent_since is None:
            silent_since = time.monotonic()
        elif time.monotonic() - silent_since > gone_after:
            print(f"[service] no broker at {bus} for {gone_after:.0f} s: the job has ended; leaving", flush=True)
            stop.set()


async def serve(args) -> None:
    started, gen = time.monotonic(), None

    def health() -> dict:
        return {"status": "ok", "uptime_s": round(time.monotonic() - started, 3), "generator": args.name,
                "on_bus": bool(gen and gen.bus.registered),
                "weights_version": gen.backend.version if gen else None,
                "groups_generated": gen.backend.groups_generated if gen else 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            while (await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b"\n", b""):
                pass  # headers
            parts = request.split()
            found = len(parts) > 1 and parts[1] == b"/health"
            body = json.dumps(health() if found else {"error": "not found"}).encode()
            writer.write(b"HTTP/1.1 " + (b"200 OK" if found else b"404 Not Found") +
                         b"\r\nContent-Type: application/json\r\nConnection: close\r\n" +
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"[service] health on http://127.0.0.1:{port}/health", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        gen = await make_generator(args.name, args.bus, args.model, client_kwargs(args.keys, "generator"))
        await gen.start()  # registers on the bus; from now on prompts and weight updates arrive
        print(f"[service] {args.name} joined {args.bus}", flush=True)
        watch = asyncio.create_task(until_the_job_ends(gen, args.bus, args.job_gone_after, stop))
        await stop.wait()
        watch.cancel()
    finally:
        if gen is not None:
            await gen.stop()  # finishes in-flight handlers, then leaves the bus
        server.close()
        await server.wait_closed()
        print("[service] stopped", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bus", required=True, help="the job's bus, tcp://HOST:PORT")  # as the launcher printed it
    ap.add_argument("--name", default=f"generator-{socket.gethostname()}-{os.getpid()}")
    ap.add_argument("--model", help="model directory; default: the one the job trains (asked over the bus)")
    ap.add_argument("--port", type=int, default=8080, help="the service's own HTTP port (0 = any free one)")
    ap.add_argument("--keys", help="CurveZMQ keys directory of a secured bus")
    ap.add_argument("--job-gone-after", type=float, default=30.0,
                    help="leave when the job's broker has not answered for this many seconds")
    try:
        asyncio.run(serve(ap.parse_args()))
    except (BusError, OSError) as exc:  # no job at --bus, a model directory that is not there, a port in use
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()

"""The Actor base: a name, a role, async handlers by message type, and a bus connection.

    class Echo(Actor):
        @handler("echo")
        async def echo(self, body, src):
            return body

    run(Echo("echo-0", "echo", "tcp://127.0.0.1:5555"))   # or: await actor.start() in your own loop

A handler's return value is the reply; an exception becomes a RemoteError at the requester and
the actor keeps running. Heartbeats and re-registration live in the BusClient.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any, Callable

from bus.client import BusClient

log = logging.getLogger("actors.base")
_ATTR = "__bus_handler__"


def handler(type: str) -> Callable:
    """Mark an async method `(self, body, src) -> reply body` as the handler of `type`."""
    if not isinstance(type, str) or not type or type.startswith("_"):
        raise ValueError(f"handler type must be a non-empty string not starting with '_', got {type!r}")

    def mark(fn: Callable) -> Callable:
        setattr(fn, _ATTR, type)
        return fn

    return mark


def declared_handlers(cls: type) -> dict[str, str]:
    """Message type -> method name, subclasses overriding their bases."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        own: dict[str, str] = {}
        for attr, value in vars(klass).items():
            t = getattr(value, _ATTR, None)
            if t is None:
                continue
            if t in own:
                raise TypeError(f"{klass.__name__} declares two handlers for {t!r}: {own[t]} and {attr}")
            own[t] = attr
        found.update(own)
    return found


class Actor:
    def __init__(self, name: str, role: str, bus_address: str, **client_kwargs: Any):
        self.name, self.role = name, role
        self.bus = BusClient(bus_address, name, role, **client_kwargs)
        for type_, attr in declared_handlers(type(self)).items():
            self.bus.on(type_, getattr(self, attr))
        self._started = False
        self._stopped: asyncio.Event | None = None
        self._stopping: asyncio.Task | None = None

    async def on_start(self) -> None:
        """Hook: runs once registered (subscribe to topics, start background tasks)."""

    async def on_stop(self) -> None:
        """Hook: runs first on stop, while the actor is still on the bus."""

    async def start(self) -> None:
        if self._started:
            return
        self._stopped = asyncio.Event()
        await self.bus.connect()
        self._started = True
        try:
            await self.on_start()
        except BaseException:
            await self.bus.close()
            self._stopped.set()
            raise
        log.info("%s (%s) started on %s", self.name, self.role, self.bus.address)

    async def run_forever(self) -> None:
        """Start if needed, then serve until stop()."""
        await self.start()
        await self._stopped.wait()

    async def stop(self, grace: float = 5.0) -> None:
        """Finish in-flight handlers (up to `grace` seconds), then leave the bus. Idempotent."""
        if not self._started:
            return
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float) -> None:
        try:
            await asyncio.wait_for(self.on_stop(), grace)
        except Exception as e:
            log.error("%s: on_stop failed: %s: %s", self.name, type(e).__name__, e)
        if not await self.bus.drain(grace):
            log.warning("%s: %d handlers still running after %.1fs; cancelling them",
                        self.name, self.bus.in_flight, grace)
        await self.bus.close()
        self._stopped.set()
        log.info("%s stopped", self.name)


def run(actor: Actor) -> None:
    """Run `actor` until SIGINT/SIGTERM or stop(), on uvloop when it is installed."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(actor.stop()))
        log.info("%s: event loop %s", actor.name, type(loop).__module__)
        try:
            await actor.run_forever()
        finally:
            await actor.stop()

    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None and hasattr(uvloop, "run"):
        uvloop.run(main())
    else:
        asyncio.run(main())

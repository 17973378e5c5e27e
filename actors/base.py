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
from bus.errors import BusError, BusTimeout, MessageTooLarge, PeerGone, ProtocolError, RemoteError
from tensors.channels.locality import Channels, TensorOptions

log = logging.getLogger("actors.base")
_ATTR = "__bus_handler__"


def handler(type: str, *, from_roles: tuple[str, ...] | None = None) -> Callable:
    """Mark an async method `(self, body, src) -> reply body` as the handler of `type`.

    `from_roles`: the only sender roles it serves (the role the broker registered, not a claim);
    others get a RemoteError saying so. Messages that change what an actor does (TRAIN,
    UPDATE_WEIGHTS, ...) name their one sender role, so no other bus member can forge them."""
    if not isinstance(type, str) or not type or type.startswith("_"):
        raise ValueError(f"handler type must be a non-empty string not starting with '_', got {type!r}")

    def mark(fn: Callable) -> Callable:
        setattr(fn, _ATTR, type)
        fn.__bus_from_roles__ = None if from_roles is None else tuple(from_roles)
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
    def __init__(self, name: str, role: str, bus_address: str, *, tensors: TensorOptions | None = None,
                 **client_kwargs: Any):
        """`tensors`: where this process's tensor sockets live (default: the address that reaches the
        bus); the actor registers with its host, so peers choose channels by locality."""
        self.name, self.role = name, role
        self.channels = Channels(tensors or TensorOptions.for_bus(bus_address))
        client_kwargs.setdefault("host", self.channels.host)
        self.bus = BusClient(bus_address, name, role, **client_kwargs)
        for type_, attr in declared_handlers(type(self)).items():
            method = getattr(self, attr)
            self.bus.on(type_, method, from_roles=getattr(method, "__bus_from_roles__", None))
        self._started = False
        self._stopped: asyncio.Event | None = None
        self._stopping: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    async def request_until(self, dst: str, type: str, body: Any, *, within: float, attempt: float = 2.0,
                            gone_grace: float = 10.0) -> Any:
        """A request sent again until ``dst`` answers; returns the reply body.

        What a broker restart loses (a frame in flight, a reply, a peer not yet registered again) is
        sent again, every ``attempt`` seconds at most. A peer the broker does not know is waited for
        ``gone_grace`` seconds (it may be registering again), not the whole ``within``. The handler
        at ``dst`` must be idempotent: a lost reply means a second copy. Raises BusTimeout naming
        ``dst`` and ``type`` when time runs out; RemoteError (the handler raised), MessageTooLarge and
        ProtocolError at once.
        """
        loop = asyncio.get_running_loop()
        deadline, pause, gone_since = loop.time() + within, 0.05, None
        while True:
            left = deadline - loop.time()
            try:
                return await self.bus.request(dst, type, body, timeout=max(0.05, min(attempt, left)))
            except (RemoteError, MessageTooLarge, ProtocolError):  # sending it again would not help
                raise
            except BusError as exc:
                if self._stopping is not None:  # stopping: nobody will send it again
                    raise
                now = loop.time()
                if isinstance(exc, PeerGone):
                    gone_since = now if gone_since is None else gone_since
                    if now - gone_since >= gone_grace:
                        raise
                else:
                    gone_since = None
                if now + pause >= deadline:
                    raise BusTimeout(dst, f"an answer to {type!r}", within, str(exc)) from exc
                log.info("%s: %r to %s not answered (%s); sending it again", self.name, type, dst, exc)
            await asyncio.sleep(pause)
            pause = min(1.0, pause * 2)

    async def deliver(self, dst: str, type: str, body: Any, *, within: float, **kw: Any) -> None:
        """A one-way message that must arrive: ``request_until`` an acknowledgement.

        Plain one-way messages are lost when the broker restarts or ``dst`` is registering again; a
        delivered one is not. The handler at ``dst`` answers at once (it acknowledges receipt, not the
        work) and ignores a second copy.
        """
        await self.request_until(dst, type, body, within=within, **kw)

    def spawn(self, coro) -> asyncio.Task:
        """Run ``coro`` in the background, kept alive and cancelled on stop; a failure is logged."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s: background task failed: %s: %s", self.name, type(exc).__name__, exc, exc_info=exc)

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
        for task in list(self._background):
            task.cancel()
        await self.channels.close()
        if not await self.bus.drain(grace):
            log.warning("%s: %d handlers still running after %.1fs; cancelling them",
                        self.name, self.bus.in_flight, grace)
        await self.bus.close()
        self._stopped.set()
        log.info("%s stopped", self.name)


def run(*actors: Actor, leave_after: float | None = None) -> bool:
    """Start `actors` in order and serve until SIGINT/SIGTERM, then stop them in reverse order; on uvloop
    when it is installed. An actor that stops itself (leaves the bus on a fault) does not end the process:
    whoever started it decides when it ends. With `leave_after`, they also stop once none of them has been
    registered with the broker for that many seconds (the job they joined has ended); True is returned then."""
    lost = False

    async def watch_broker(stop: asyncio.Event) -> None:
        nonlocal lost
        loop, since = asyncio.get_running_loop(), None
        while not stop.is_set():
            await asyncio.sleep(min(0.5, leave_after))
            if any(a.bus.registered for a in actors):
                since = None
            elif since is None:
                since = loop.time()
            elif loop.time() - since >= leave_after:
                log.error("%s: the broker at %s has not answered for %gs: the job has ended; leaving",
                          actors[0].name, actors[0].bus.address, leave_after)
                lost = True
                stop.set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info("%s: event loop %s", actors[0].name, type(loop).__module__)
        watcher = None
        try:
            for actor in actors:
                await actor.start()
            if leave_after is not None:
                watcher = loop.create_task(watch_broker(stop))
            await stop.wait()
        finally:
            if watcher is not None:
                watcher.cancel()
            for actor in reversed(actors):
                await actor.stop()

    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None and hasattr(uvloop, "run"):
        uvloop.run(main())
    else:
        asyncio.run(main())
    return lost

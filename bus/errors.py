"""Errors of the control plane.

Each error names the peer and what went wrong, so a log line alone tells a user what to fix.
All of them pickle (they cross process boundaries in tests and launchers).
"""
from __future__ import annotations


class BusError(Exception):
    """Base of every bus error. A subclass lists its constructor's arguments, kept as attributes of the
    same names, in `fields`: they rebuild it when pickled and travel in an `_error` reply (error_body)."""

    fields: tuple[str, ...] = ()

    def __reduce__(self):
        if not self.fields:
            return super().__reduce__()
        return (type(self), tuple(getattr(self, f) for f in self.fields))


class ProtocolError(BusError):
    """A frame that is not a valid envelope (the reason says why)."""

    fields = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"bad bus frame: {reason}")


class BusTimeout(BusError, TimeoutError):
    """Nothing came back from `peer` while waiting for `phase` within `timeout` seconds."""

    fields = ("peer", "phase", "timeout", "hint")

    def __init__(self, peer: str, phase: str, timeout: float, hint: str = ""):
        self.peer, self.phase, self.timeout, self.hint = peer, phase, timeout, hint
        msg = f"timed out after {timeout:g}s waiting for {phase} from {peer!r}"
        super().__init__(f"{msg} ({hint})" if hint else msg)


class PeerGone(BusError):
    """The destination is not registered with the broker (never joined, or left)."""

    fields = ("peer",)

    def __init__(self, peer: str):
        self.peer = peer
        super().__init__(f"peer {peer!r} is not on the bus (unknown or departed)")


class NameTaken(BusError):
    """Another live actor already registered this name."""

    fields = ("name", "detail")

    def __init__(self, name: str, detail: str = ""):
        self.name, self.detail = name, detail
        msg = f"actor name {name!r} is already taken"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class RemoteError(BusError):
    """The handler for `type` raised on `peer`; `message` is its error text."""

    fields = ("peer", "type", "message")

    def __init__(self, peer: str, type: str, message: str):
        self.peer, self.type, self.message = peer, type, message
        super().__init__(f"handler for {type!r} on {peer!r} failed: {message}")


class NotAllowed(BusError):
    """The broker refused `what` from actor `name`: `reason` says who may (e.g. a broker-owned topic)."""

    fields = ("name", "what", "reason")

    def __init__(self, name: str, what: str, reason: str):
        self.name, self.what, self.reason = name, what, reason
        super().__init__(f"broker refused {what} from {name!r}: {reason}")


class MessageTooLarge(BusError):
    """An encoded envelope exceeds the bus's max_message_bytes."""

    fields = ("size", "limit")

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit
        super().__init__(
            f"message of {size} bytes exceeds the bus limit of {limit} bytes "
            "(send bulk data over a tensors channel, not the bus)"
        )


_ON_THE_WIRE = (PeerGone, RemoteError, NameTaken, MessageTooLarge, ProtocolError, NotAllowed)  # error_from_body's


def error_body(exc: BusError) -> dict:
    """The body of an `_error` envelope carrying `exc` to the requester."""
    body: dict = {"kind": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, _ON_THE_WIRE):
        body.update((f, getattr(exc, f)) for f in exc.fields)
    return body


def error_from_body(body: object, peer: str) -> BusError:
    """Rebuild the exception an `_error` envelope carries; unknown kinds become BusError."""
    if not isinstance(body, dict):
        return ProtocolError(f"error reply from {peer!r} with a non-map body {body!r:.80}")
    kind, msg = body.get("kind"), str(body.get("message", ""))
    try:
        if kind == "PeerGone":
            return PeerGone(str(body["peer"]))
        if kind == "RemoteError":
            return RemoteError(str(body.get("peer", peer)), str(body["type"]), msg)
        if kind == "NameTaken":
            return NameTaken(str(body["name"]), str(body.get("detail", "")))
        if kind == "MessageTooLarge":
            return MessageTooLarge(int(body["size"]), int(body["limit"]))
        if kind == "ProtocolError":
            return ProtocolError(str(body["reason"]))
        if kind == "NotAllowed":
            return NotAllowed(str(body["name"]), str(body["what"]), str(body["reason"]))
    except (KeyError, TypeError, ValueError):
        pass
    return BusError(f"{kind} from {peer!r}: {msg}")

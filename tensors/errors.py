"""Errors of the data plane.  Each names what was wrong so a log line is enough to act on."""

from __future__ import annotations


class TensorsError(Exception):
    """Base class of every error raised by `tensors`."""


class WireError(TensorsError, ValueError):
    """A wire header or its buffers are malformed or disagree; `field` names the culprit."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"wire: field {field!r}: {reason}")


class AllocationError(TensorsError, ValueError):
    """The micro-batch allocator cannot satisfy the request (e.g. one sequence exceeds the budget)."""


class TransferError(TensorsError):
    """A tensor transfer failed or ran out of time; names the peer, the transfer id and the phase."""

    def __init__(self, peer: str, transfer_id: str, phase: str, reason: str):
        self.peer = peer
        self.transfer_id = transfer_id
        self.phase = phase
        self.reason = reason
        super().__init__(f"transfer {transfer_id} from {peer} failed during {phase}: {reason}")


class BatchError(TensorsError, ValueError):
    """A PackedBatch would be inconsistent; `field` names the offending field (or 'meta'/'cu_seqlens')."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"PackedBatch field {field!r}: {reason}")

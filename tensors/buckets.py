"""Named-tensor buckets: weights cut into channel-sized dicts of (name -> tensor), in order."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def bucket_named_tensors(
    named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Group tensors, keeping their order, into buckets of at most `max_bytes` each.

    A tensor larger than `max_bytes` travels alone in its own bucket.  Each bucket is a plain
    dict[str, Tensor], the named-tensor payload every channel accepts.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    pairs = named.items() if isinstance(named, Mapping) else named
    buckets: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0
    seen: set[str] = set()
    for name, t in pairs:
        if name in seen:
            raise ValueError(f"tensor name {name!r} appears twice")
        seen.add(name)
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            buckets.append(current)
            current, size = {}, 0
        current[name] = t
        size += n
    if current:
        buckets.append(current)
    return buckets

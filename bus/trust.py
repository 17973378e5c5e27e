"""Who may be what on the bus, and who may send what: the one table the broker enforces.

A CurveZMQ key belongs to a key class; each class may register only its roles (KEY_ROLES), so a role
is something a key holds, not a claim. Whatever the keys, a name that is a single-instance role is
registered only with that role (NAMED_ROLES: a reply from "launcher" comes from the launcher), the
messages that change what an actor does are routed only from their sender roles (SENDERS) and the
control topics are published only by their owners (TOPIC_OWNERS).

The names are those of actors/protocol.py (bus/ imports nothing of actors/; tests/test_trust.py
checks that the two agree).
"""
from __future__ import annotations

TOOL = "tool"  # a short-lived client (status, attach's config request): lists actors, asks questions

# key class -> the roles a key of that class may register (every class may register a tool)
KEY_ROLES: dict[str, tuple[str, ...]] = {
    "launcher": ("launcher", TOOL),
    "sampler": ("sampler", TOOL),
    "generator": ("generator", TOOL),
    "verifier": ("verifier", TOOL),
    "packer": ("packer", TOOL),
    "learner": ("learner", "broadcaster", TOOL),  # the broadcaster runs in the learner's process
    "rollout": ("rollout", TOOL),  # runs users' workflows: it may open sessions, never train or publish
}

# names that are a role: taken only by a member registered with that role
NAMED_ROLES = frozenset({"sampler", "packer", "learner", "broadcaster", "launcher"})

# message type -> the only roles whose messages of that type the broker routes
SENDERS: dict[str, tuple[str, ...]] = {
    "generate": ("sampler",),
    "score": ("generator", "rollout"),
    "generated": ("generator", "rollout"),
    "scored": ("verifier",),
    "accepted": ("packer",),
    "rejected": ("packer", "generator", "verifier", "rollout"),
    "open_session": ("rollout",),
    "close_session": ("rollout",),
    "train": ("packer",),
    "publish_weights": ("learner",),
    "update_weights": ("broadcaster",),
    "checkpoint": ("launcher",),
}

# topic -> the roles that may publish it (the broker's own topics: see bus.broker.BROKER_TOPICS)
TOPIC_OWNERS: dict[str, tuple[str, ...]] = {
    "weights.version": ("broadcaster",),
    "run.finished": ("learner",),
    "metrics": ("learner",),
}


def key_class(stem: str) -> str | None:
    """The class of a client key file `<class>.key` or `<class>-<label>.key`; None if no class."""
    cls = stem.split("-", 1)[0]
    return cls if cls in KEY_ROLES else None


def classes_for(role: str) -> list[str]:
    """The key classes whose keys may register `role`, the launcher's first (a tool on the head node)."""
    classes = [c for c, roles in KEY_ROLES.items() if role in roles]
    if not classes:
        raise ValueError(f"no key class may register role {role!r} (bus/trust.py KEY_ROLES)")
    return classes

"""CurveZMQ keys for a bus that listens beyond loopback: one pair per role class, bound to its roles.

Layout of a key directory (zmq certificate files, keys z85-encoded, every file mode 0600):
  broker.key, broker.key_secret      the broker's pair (the secret stays on the head node)
  <class>.key, <class>.key_secret    one pair per key class of bus.trust.KEY_ROLES (launcher, sampler,
                                     generator, verifier, packer, learner): a key registers only its
                                     class's roles, so a host holding a generator key can be a generator
                                     and nothing else
  <class>-<label>.key                further public keys the broker binds to <class>'s roles (a key made
                                     on an attach host, say)

Pairs are per role class, not per host: what a key may do is the role, and the launcher hands each
host (`write_subset`) the secrets of the classes it runs only, so a host is no stronger than its roles.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from bus.trust import KEY_ROLES, TOOL, classes_for, key_class

BROKER = "broker"


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes | None  # None in a worker's directory
    roles_by_key: dict[bytes, frozenset[str]]  # client public key (z85) -> the roles it may register
    pairs: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)  # class -> its pair, where the secret is here
    directory: str = ""

    @property
    def authorized(self) -> frozenset[bytes]:
        """Every client public key the broker (and a tensor outbox) lets in."""
        return frozenset(self.roles_by_key)

    def roles_of(self, public: bytes | str) -> frozenset[str]:
        key = public.encode() if isinstance(public, str) else public
        if len(key) == 32:
            key = zmq.utils.z85.encode(key)
        return self.roles_by_key.get(key, frozenset())

    def pair_for(self, role: str) -> tuple[bytes, bytes]:
        """The (public, secret) pair this directory holds for registering `role`."""
        classes = classes_for(role)
        for cls in classes:
            if cls in self.pairs:
                return self.pairs[cls]
        raise ValueError(f"{self.directory or 'the bus key directory'} holds no key for role {role!r}: it needs "
                         f"{classes[0]}.key_secret (made by `python -m launcher keys DIR`)")


def _private(path: Path) -> None:
    os.chmod(path, 0o600)


def generate_keys(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the broker's pair and one pair per key class into `directory` (mode 0700, files 0600)."""
    d = Path(directory)
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support; cannot make bus keys")
    names = (BROKER, *KEY_ROLES, "client")
    existing = [d / f"{n}.key{s}" for n in names for s in ("", "_secret") if (d / f"{n}.key{s}").exists()]
    if existing and not overwrite:
        raise FileExistsError(f"bus keys already exist in {d} ({existing[0].name}); pass overwrite=True to replace")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for old in (d / "client.key", d / "client.key_secret"):  # the one shared key of before: no role
        old.unlink(missing_ok=True)
    mask = os.umask(0o077)  # no moment in which a secret is readable by others
    try:
        for name in (BROKER, *KEY_ROLES):
            public, secret = zmq.auth.create_certificates(d, name)
            _private(Path(public))
            _private(Path(secret))
    finally:
        os.umask(mask)
    return d


def load_keys(directory: str | os.PathLike) -> CurveKeys:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"bus key directory {d} does not exist (make one with `python -m launcher keys {d}`)")
    broker_pub = d / f"{BROKER}.key"
    if not broker_pub.exists():
        raise FileNotFoundError(f"{broker_pub} is missing: a bus key directory needs the broker's public key")
    if (d / "client.key").exists():
        raise ValueError(f"{d} holds client.key, one key for every role, which the bus no longer accepts: "
                         f"remake it with `python -m launcher keys {d} --force` (one key per role class)")
    server_public, _ = zmq.auth.load_certificate(broker_pub)
    server_secret = None
    if (d / f"{BROKER}.key_secret").exists():
        _, server_secret = zmq.auth.load_certificate(d / f"{BROKER}.key_secret")
    roles_by_key: dict[bytes, frozenset[str]] = {}
    pairs: dict[str, tuple[bytes, bytes]] = {}
    for p in sorted(d.glob("*.key")):
        if p.name == broker_pub.name:
            continue
        cls = key_class(p.stem)
        if cls is None:
            raise ValueError(f"{p}: a client key is named <class>.key or <class>-<label>.key with a class of "
                             f"{', '.join(KEY_ROLES)}, so the broker knows which roles it may register")
        public, _ = zmq.auth.load_certificate(p)
        roles_by_key[public] = roles_by_key.get(public, frozenset()) | frozenset(KEY_ROLES[cls])
        secret_file = p.with_name(p.name + "_secret")
        if p.stem == cls and secret_file.exists():
            pairs[cls] = zmq.auth.load_certificate(secret_file)
    return CurveKeys(server_public, server_secret, roles_by_key, pairs, str(d))


def client_kwargs(keys_dir: str | os.PathLike | None, role: str = TOOL) -> dict:
    """A `BusClient`'s CurveZMQ keyword arguments for a member of `role` (default: a short-lived tool,
    with whichever key the directory holds, the launcher's first); {} without keys (a plain bus)."""
    if not keys_dir:
        return {}
    keys = load_keys(keys_dir)
    return {"curve_server_key": keys.server_public, "curve_client_keys": keys.pair_for(role)}


def write_subset(keys_dir: str | os.PathLike, roles, dest: str | os.PathLike) -> Path:
    """The key directory of one host running `roles`: the broker's public key, every client public key
    (tensor outboxes let each other in) and the secrets of those roles' classes only."""
    src, out = Path(keys_dir), Path(dest)
    keys = load_keys(src)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    for old in out.iterdir():
        old.unlink()
    for p in src.glob("*.key"):
        shutil.copyfile(p, out / p.name)
        _private(out / p.name)
    for role in roles:
        public, _ = keys.pair_for(role)
        cls = next(c for c, pair in keys.pairs.items() if pair[0] == public)
        shutil.copyfile(src / f"{cls}.key_secret", out / f"{cls}.key_secret")
        _private(out / f"{cls}.key_secret")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bus.keys DIR")
    print(f"bus keys written to {generate_keys(sys.argv[1])}")

"""CurveZMQ keys for a bus that listens beyond loopback.

Layout of a key directory (zmq certificate files, keys z85-encoded):
  broker.key, broker.key_secret   the broker's pair (the secret stays on the broker host)
  client.key, client.key_secret   the pair every actor uses
  <other>.key                     further client public keys the broker also accepts
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

BROKER, CLIENT = "broker", "client"


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes | None  # None in a client-only directory
    client_public: bytes | None
    client_secret: bytes | None
    authorized: frozenset[bytes]  # client public keys the broker lets in

    @property
    def client_keys(self) -> tuple[bytes, bytes]:
        if self.client_public is None or self.client_secret is None:
            raise ValueError("this key set has no client key pair (client.key_secret missing)")
        return self.client_public, self.client_secret


def generate_keys(directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write broker and client key pairs into `directory` (created, mode 0700)."""
    d = Path(directory)
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support; cannot make bus keys")
    existing = [d / f"{n}.key{s}" for n in (BROKER, CLIENT) for s in ("", "_secret") if (d / f"{n}.key{s}").exists()]
    if existing and not overwrite:
        raise FileExistsError(f"bus keys already exist in {d} ({existing[0].name}); pass overwrite=True to replace")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    for name in (BROKER, CLIENT):
        _, secret = zmq.auth.create_certificates(d, name)
        os.chmod(secret, 0o600)
    return d


def load_keys(directory: str | os.PathLike) -> CurveKeys:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"bus key directory {d} does not exist (make one with `python -m launcher keys {d}`)")
    broker_pub = d / f"{BROKER}.key"
    if not broker_pub.exists():
        raise FileNotFoundError(f"{broker_pub} is missing: a bus key directory needs the broker's public key")
    server_public, _ = zmq.auth.load_certificate(broker_pub)
    server_secret = None
    if (d / f"{BROKER}.key_secret").exists():
        _, server_secret = zmq.auth.load_certificate(d / f"{BROKER}.key_secret")
    client_public = client_secret = None
    if (d / f"{CLIENT}.key_secret").exists():
        client_public, client_secret = zmq.auth.load_certificate(d / f"{CLIENT}.key_secret")
    authorized = {
        zmq.auth.load_certificate(p)[0] for p in sorted(d.glob("*.key")) if p.name != broker_pub.name
    }
    return CurveKeys(server_public, server_secret, client_public, client_secret, frozenset(authorized))


def client_kwargs(keys_dir: str | os.PathLike | None) -> dict:
    """A `BusClient`'s CurveZMQ keyword arguments from a key directory; {} without one (a plain bus)."""
    if not keys_dir:
        return {}
    keys = load_keys(keys_dir)
    return {"curve_server_key": keys.server_public, "curve_client_keys": keys.client_keys}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bus.keys DIR")
    print(f"bus keys written to {generate_keys(sys.argv[1])}")

"""Channels: local / shm / zmq round trips in one process and across processes, expiry, readers,
dead senders (a clear TransferError within the timeout, never a hang or a half-filled payload),
and no shared-memory segment left behind."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time

import pytest
import torch
import zmq

from tensors.channels import Channels, TensorOptions, choose_kind, open_channel
from tensors.channels import shm as shm_mod
from tensors.channels.shm import ShmChannel, sweep_orphans
from tensors.errors import TransferError
from tensors.packed import PackedBatch
from tests.spawned import SPAWNED, let_go, spawned

CPU_KINDS = ["local", "shm", "zmq"]


def sample_batch(n: int = 3, seed: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        length = 3 + 2 * i
        seqs.append({
            "input_ids": torch.randint(0, 50000, (length,), generator=g),
            "loss_mask": torch.arange(length) >= 2,
            "logprobs": -torch.rand(length, generator=g),
            "versions": torch.full((length,), i, dtype=torch.int32),
            "rewards": float(5 - 10 * (i % 2)),
            "group_ids": i // 2,
        })  # fmt: skip
    return PackedBatch.from_sequences(seqs, meta={"qids": [f"q{i}" for i in range(n)], "step": seed})


def sample_weights(seed: int = 0, mb: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = int(mb * (1 << 20) / 4)
    return {
        "embed.weight": torch.randn(n // 64, 64, generator=g),
        "norm.weight": torch.randn(64, generator=g).to(torch.bfloat16),
        "step": torch.tensor(seed),
    }


def same_tensors(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def our_shm_files() -> set[str]:
    """Segments owned by this process or one it spawned (other programs may use /dev/shm meanwhile)."""
    ours = {os.getpid(), *SPAWNED}
    d = shm_mod.shm_directory()
    return {f for f in os.listdir(d) if f.startswith(shm_mod.PREFIX) and int(f.split("-")[2]) in ours}


@pytest.fixture(autouse=True)
def no_leaked_segments():
    before = our_shm_files()
    yield
    gc.collect()
    leaked = our_shm_files() - before
    assert not leaked, f"shared-memory segments left behind: {sorted(leaked)}"


# ---- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", CPU_KINDS)
async def test_round_trip_in_one_process(kind):
    async with open_channel(kind) as tx, open_channel(kind) as rx:
        batch, weights = sample_batch(), sample_weights()
        d1 = await tx.send(batch, timeout=10)
        d2 = await tx.send(weights, timeout=10)
        assert d1["kind"] == kind and isinstance(d1["id"], str)
        got = await rx.recv(d1, timeout=5)
        assert got.equals(batch) and got.meta == batch.meta
        assert same_tensors(await rx.recv(d2, timeout=5), weights)
        del got


@pytest.mark.parametrize("kind", CPU_KINDS)
async def test_each_reader_gets_it_once_then_it_is_gone(kind):
    async with open_channel(kind) as tx, open_channel(kind) as rx:
        weights = sample_weights(mb=0.1)
        d = await tx.send(weights, timeout=10, readers=2)
        a, b = await rx.recv(d, timeout=5), await rx.recv(d, timeout=5)
        assert same_tensors(a, weights) and same_tensors(b, weights)
        with pytest.raises(TransferError) as info:
            await rx.recv(d, timeout=2)
        assert info.value.transfer_id == d["id"] and tx.name in str(info.value)
        del a, b


@pytest.mark.parametrize("kind", CPU_KINDS)
async def test_payload_expires_after_its_time_to_live(kind):
    async with open_channel(kind) as tx, open_channel(kind) as rx:
        d = await tx.send(sample_weights(mb=0.1), timeout=0.2)
        await asyncio.sleep(0.45)
        if kind == "shm":  # the segment is reused only when a new send needs one
            d_new = await tx.send(sample_weights(seed=1, mb=0.1), timeout=10)
            assert d_new["path"] == d["path"] and d_new["gen"] == d["gen"] + 1
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="expired|unknown"):
            await rx.recv(d, timeout=3)
        assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("kind", CPU_KINDS)
async def test_bad_descriptors_and_arguments_are_refused(kind):
    async with open_channel(kind) as ch:
        with pytest.raises(TransferError, match="descriptor"):
            await ch.recv({"kind": "other", "id": "x", "src": "peer"}, timeout=1)
        with pytest.raises(TransferError, match="lacks"):
            await ch.recv({"kind": kind}, timeout=1)
        with pytest.raises(ValueError, match="timeout"):
            await ch.send(sample_batch(), timeout=0)
        with pytest.raises(ValueError, match="readers"):
            await ch.send(sample_batch(), timeout=1, readers=0)
        with pytest.raises(TypeError, match="PackedBatch or a dict"):
            await ch.send([torch.zeros(1)], timeout=1)


@pytest.mark.parametrize("kind", CPU_KINDS)
async def test_an_actors_channels_receive_any_kind_and_name_a_closed_sender(kind):
    tx, rx = open_channel(kind, name="packer-1"), Channels(TensorOptions(host="127.0.0.1"))
    d = await tx.send(sample_batch(seed=3), timeout=10)
    assert (await rx.recv(d, timeout=5)).equals(sample_batch(seed=3))
    d2 = await tx.send(sample_batch(seed=4), timeout=10)
    await tx.close()
    t0 = time.monotonic()
    with pytest.raises(TransferError) as info:
        await rx.recv(d2, timeout=0.5)
    assert info.value.peer == "packer-1" and time.monotonic() - t0 < 2.0
    await rx.close()


async def test_local_descriptor_from_another_process_is_refused():
    async with open_channel("local") as ch:
        d = await ch.send(sample_batch(), timeout=5)
        with pytest.raises(TransferError, match="was made in process"):
            await ch.recv(dict(d, pid=d["pid"] + 1), timeout=1)
        assert (await ch.recv(d, timeout=1)) is not None


async def test_local_hands_over_the_same_objects():
    async with open_channel("local") as ch:
        batch = sample_batch()
        assert (await ch.recv(await ch.send(batch, timeout=5), timeout=1)) is batch


async def test_shm_receives_zero_copy_on_the_segment():
    async with ShmChannel() as tx, ShmChannel() as rx:
        d = await tx.send(sample_weights(mb=2), timeout=10)
        got = await rx.recv(d, timeout=5)
        ptr = got["embed.weight"].data_ptr()
        with open("/proc/self/maps") as f:
            maps = [line.split() for line in f]
        owner = [m[-1] for m in maps if int(m[0].split("-")[0], 16) <= ptr < int(m[0].split("-")[1], 16)]
        assert owner and owner[0] == d["path"], "the received tensor lives in the shared segment"
        del got


async def test_shm_reuses_a_segment_only_after_the_reader_released_it():
    async with ShmChannel() as tx, ShmChannel() as rx:
        d1 = await tx.send(sample_weights(seed=1), timeout=10)
        held = await rx.recv(d1, timeout=5)
        d2 = await tx.send(sample_weights(seed=2), timeout=10)
        assert d2["path"] != d1["path"], "a segment still in use must not be rewritten"
        assert same_tensors(held, sample_weights(seed=1))
        del held
        gc.collect()
        d3 = await tx.send(sample_weights(seed=3), timeout=10)
        assert d3["path"] == d1["path"] and d3["gen"] == d1["gen"] + 1, "released segment is reused"
        assert same_tensors(await rx.recv(d3, timeout=5), sample_weights(seed=3))
        assert same_tensors(await rx.recv(d2, timeout=5), sample_weights(seed=2))


async def test_shm_segment_held_by_a_dead_reader_is_reclaimed():
    async with ShmChannel() as tx, ShmChannel() as rx:
        d1 = await tx.send(sample_weights(seed=1), timeout=10)
        held = await rx.recv(d1, timeout=5)
        fd = os.open(d1["path"], os.O_RDWR)
        try:  # pretend the reader holding it was killed: its slot now names a pid that does not exist
            state = shm_mod._State.read(fd)
            assert state.pids[0] == os.getpid() and state.taken == 1
            state.pids[0] = 4_194_000  # above any pid in use here
            state.write(fd)
        finally:
            os.close(fd)
        d2 = await tx.send(sample_weights(seed=2), timeout=10)
        assert d2["path"] == d1["path"], "a dead reader's segment is reused"
        assert same_tensors(await rx.recv(d2, timeout=5), sample_weights(seed=2))
        del held


async def test_shm_half_written_segment_is_detected(monkeypatch):
    async with ShmChannel() as tx, ShmChannel() as rx:
        seen = {}

        def broken_write(seg, header, buffers, offsets):
            seen["path"] = seg.path
            seen["gen"] = shm_mod._State.read(seg.fd).gen
            seg.mm[shm_mod._HEADER_OFFSET : shm_mod._HEADER_OFFSET + len(header)] = header
            raise OSError("disk on fire")  # the sender fails half-way: READY is never written

        monkeypatch.setattr(shm_mod, "_write_segment", broken_write)
        with pytest.raises(OSError, match="disk on fire"):
            await tx.send(sample_batch(), timeout=10)
        d = {"kind": "shm", "id": "x#1", "src": "tx", "host": "h", "nbytes": 1, **seen}
        with pytest.raises(TransferError, match="half-written"):
            await rx.recv(d, timeout=2)


async def test_zmq_unreachable_sender_times_out_naming_the_phase():
    async with open_channel("zmq") as rx:
        ctx = zmq.Context()
        s = ctx.socket(zmq.ROUTER)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(0)
        ctx.term()  # nobody listens on that port any more
        d = {"kind": "zmq", "id": "abc", "src": "gen-7", "endpoint": f"tcp://127.0.0.1:{port}", "nbytes": 10}
        t0 = time.monotonic()
        with pytest.raises(TransferError) as info:
            await rx.recv(d, timeout=0.5)
        assert time.monotonic() - t0 < 1.5
        assert info.value.phase == "connect" and info.value.peer == "gen-7"


async def test_zmq_reused_connection_notices_a_closed_sender():
    tx = open_channel("zmq", name="gen-2")
    async with open_channel("zmq") as rx:
        for seed in range(3):  # one connection serves them all
            d = await tx.send(sample_weights(seed, mb=0.1), timeout=10)
            assert same_tensors(await rx.recv(d, timeout=5), sample_weights(seed, mb=0.1))
        d = await tx.send(sample_weights(9, mb=0.1), timeout=10)
        await tx.close()
        t0 = time.monotonic()
        with pytest.raises(TransferError) as info:
            await rx.recv(d, timeout=1.0)
        assert time.monotonic() - t0 < 2.0 and info.value.peer == "gen-2"
        async with open_channel("zmq") as tx2:  # a new sender works through the same receiver
            d2 = await tx2.send(sample_batch(seed=2), timeout=10)
            assert (await rx.recv(d2, timeout=5)).equals(sample_batch(seed=2))


async def test_an_actors_channels_reuse_one_channel_per_kind():
    rx = Channels(TensorOptions(host="127.0.0.1"))
    async with open_channel("zmq") as tx:
        for seed in range(2):
            d = await tx.send(sample_batch(seed=seed), timeout=10)
            assert (await rx.recv(d, timeout=5)).equals(sample_batch(seed=seed))
        assert rx.channel("zmq") is rx.channel("zmq")
    with pytest.raises(ValueError, match="channel kind 'pigeon'"):
        await rx.recv({"kind": "pigeon"}, timeout=1)
    await rx.close()


def test_choose_kind_and_open_channel():
    assert choose_kind(True, True) == "local"
    assert choose_kind(False, True) == "shm"
    assert choose_kind(False, False) == "zmq"
    with pytest.raises(ValueError, match="unknown channel kind 'carrier-pigeon'"):
        open_channel("carrier-pigeon")


# ---- across processes --------------------------------------------------------------------------


def _serve_payloads(conn) -> None:
    """Child: send a batch and weights on shm and zmq, wait until the parent has them."""

    async def main() -> None:
        chans = {k: open_channel(k, name=f"child-{k}") for k in ("shm", "zmq")}
        descs = {}
        for k, ch in chans.items():
            descs[k] = [await ch.send(sample_batch(seed=5), timeout=30), await ch.send(sample_weights(5), timeout=30)]
        conn.send(descs)
        await asyncio.to_thread(conn.recv)
        for ch in chans.values():
            await ch.close()

    asyncio.run(main())


async def test_round_trip_across_processes():
    with spawned(_serve_payloads) as (proc, parent):
        assert await asyncio.to_thread(parent.poll, 60), "child did not start"
        descs = parent.recv()
        for kind, (d_batch, d_weights) in descs.items():
            async with open_channel(kind) as rx:
                batch = await rx.recv(d_batch, timeout=10)
                assert batch.equals(sample_batch(seed=5)), kind
                assert same_tensors(await rx.recv(d_weights, timeout=10), sample_weights(5)), kind
                del batch
        gc.collect()
        assert await let_go(proc, parent) == 0


def _zmq_dies_mid_transfer(conn) -> None:
    """Child: its outbox sends the header and one buffer of a two-buffer reply, then stalls until killed."""
    from tensors.channels import outbox

    def partial_reply(self, ident, frames):
        if frames[0] != b"OK":
            return self._sock.send_multipart([ident, *frames])
        for part in [ident, *frames[:-1]]:
            self._sock.send(part, zmq.SNDMORE, copy=False)
        conn.send("partial")
        time.sleep(120)

    outbox.Outbox.send_reply = partial_reply

    async def main() -> None:
        ch = open_channel("zmq", name="dying-sender")
        conn.send(await ch.send(sample_weights(mb=4), timeout=60))
        await asyncio.sleep(120)

    asyncio.run(main())


async def test_zmq_sender_killed_mid_transfer_raises_transfer_error_quickly():
    with spawned(_zmq_dies_mid_transfer) as (proc, parent):
        assert await asyncio.to_thread(parent.poll, 60), "child did not start"
        desc = parent.recv()
        async with open_channel("zmq") as rx:
            pulling = asyncio.ensure_future(rx.recv(desc, timeout=20))
            assert await asyncio.to_thread(parent.poll, 20), "sender never began the reply"
            assert parent.recv() == "partial"
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(TransferError) as info:
                await pulling
            assert time.monotonic() - t0 < 5.0, "the disconnect is noticed, not the timeout waited out"
            assert info.value.phase == "pull" and info.value.peer == "dying-sender"
            assert "disconnected" in str(info.value)


def _shm_dies_mid_write(conn) -> None:
    """Child: sends one complete payload, then dies (killed) half-way through writing a second."""

    async def main() -> None:
        ch = ShmChannel(name="dying-shm")
        done = await ch.send(sample_weights(seed=8), timeout=60)
        conn.send(done)

        def half_write(seg, header, buffers, offsets):
            seg.mm[shm_mod._HEADER_OFFSET : shm_mod._HEADER_OFFSET + len(header)] = header
            gen = shm_mod._State.read(seg.fd).gen
            conn.send(dict(done, id=f"half#{gen}", path=seg.path, gen=gen))
            time.sleep(120)

        shm_mod._write_segment = half_write
        await ch.send(sample_weights(seed=9), timeout=60)

    asyncio.run(main())


async def test_shm_sender_killed_mid_write_then_orphans_swept():
    async with ShmChannel() as rx:  # created (and swept) before the child dies
        with spawned(_shm_dies_mid_write) as (proc, parent):
            assert await asyncio.to_thread(parent.poll, 60), "child did not start"
            complete = parent.recv()
            assert await asyncio.to_thread(parent.poll, 30)
            half = parent.recv()
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.join, 10)
        # what was complete before the sender died is still whole; what was not is refused
        got = await rx.recv(complete, timeout=5)
        assert same_tensors(got, sample_weights(seed=8))
        del got
        gc.collect()
        with pytest.raises(TransferError, match="half-written") as info:
            await rx.recv(half, timeout=5)
        assert info.value.peer == "dying-shm"
        removed = sweep_orphans()
        assert complete["path"] in removed and half["path"] in removed
        with pytest.raises(TransferError, match="gone"):
            await rx.recv(half, timeout=5)


# ---- shm: a full tmpfs, other pid namespaces, hostile descriptors -----------------------------


async def test_shm_full_tmpfs_is_a_transfer_error_naming_size_and_directory(monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")  # ENOSPC, what a full tmpfs answers

    monkeypatch.setattr(shm_mod.os, "posix_fallocate", no_space)
    async with ShmChannel(name="tx") as tx:
        with pytest.raises(TransferError, match=r"cannot reserve \d+ bytes of shared memory in /") as info:
            await tx.send(sample_weights(mb=2), timeout=5)
        assert info.value.phase == "reserve" and tx.directory in str(info.value)
        monkeypatch.undo()  # space again: the same channel sends
        async with ShmChannel() as rx:
            d = await tx.send(sample_weights(seed=4), timeout=5)
            assert same_tensors(await rx.recv(d, timeout=5), sample_weights(seed=4))


_SEND_ON_TINY_TMPFS = """
import asyncio, sys
from tensors.channels.shm import ShmChannel
from tensors.errors import TransferError
import torch
async def main():
    ch = ShmChannel(name="tx", directory=sys.argv[1])
    try:
        await ch.send({"w": torch.ones(1 << 20)}, timeout=5)  # 4 MiB into a 1 MiB tmpfs
    except TransferError as e:
        print("REFUSED", e)
    ch.close_now()
asyncio.run(main())
"""


def test_shm_send_into_a_real_full_tmpfs_does_not_kill_the_sender(tmp_path):
    """Without the reservation the child dies of SIGBUS while copying into the segment."""
    import subprocess
    import sys

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a 1 MiB tmpfs")
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        proc = subprocess.run([sys.executable, "-c", _SEND_ON_TINY_TMPFS, str(mnt)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"sender died (rc {proc.returncode}): {proc.stderr[-2000:]}"
        assert "REFUSED" in proc.stdout and "cannot reserve" in proc.stdout and str(mnt) in proc.stdout
        assert os.listdir(mnt) == [], "the sender unlinked its segment"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_shm_sweep_spares_other_namespaces_live_owners_and_foreign_names(tmp_path):
    ns = os.stat("/proc/self/ns/pid").st_ino
    me, start = os.getpid(), shm_mod._start_time(os.getpid())
    dead = 4_194_000  # above any pid in use here
    names = {
        f"boba-shm-{dead}-{ns + 1}-5-0123abcd-1": True,  # another container's live segment: its pid means nothing here
        f"boba-shm-{me}-{ns}-{start}-0123abcd-1": True,  # ours, alive
        f"boba-shm-{me}-{ns}-{start + 1}-0123abcd-1": False,  # a recycled pid: not the owner
        f"boba-shm-{dead}-{ns}-5-0123abcd-1": False,  # dead owner in our namespace
        f"boba-shm-{dead}-0123abcd-1": True,  # a name of another format is not ours to judge
    }
    for name in names:
        (tmp_path / name).write_bytes(b"")
    removed = {os.path.basename(p) for p in sweep_orphans(str(tmp_path))}
    assert removed == {n for n, kept in names.items() if not kept}
    assert set(os.listdir(tmp_path)) == {n for n, kept in names.items() if kept}


async def test_shm_receive_opens_only_segments_in_its_directory(tmp_path):
    outside = tmp_path / "boba-shm-1-2-3-0123abcd-1"  # a valid name, in the wrong directory
    outside.write_bytes(b"\0" * 4096)
    async with ShmChannel(name="tx") as tx, ShmChannel() as rx:
        good = await tx.send(sample_batch(), timeout=5)
        link = os.path.join(rx.directory, "boba-shm-1-2-3-0123abcd-9")
        os.symlink(outside, link)
        try:
            bad_paths = [str(outside), "/etc/passwd", os.path.join(rx.directory, "..", "etc", "passwd"),
                         os.path.join(rx.directory, "not-a-segment"), good["path"] + "/../x", 7]
            for bad in bad_paths:
                with pytest.raises(TransferError, match="refusing segment path") as info:
                    await rx.recv(dict(good, path=bad), timeout=2)
                assert repr(bad) in str(info.value)
            with pytest.raises(TransferError, match="symbolic link"):
                await rx.recv(dict(good, path=link), timeout=2)
        finally:
            os.unlink(link)
        assert outside.read_bytes() == b"\0" * 4096
        await rx.recv(good, timeout=5)


async def test_shm_header_claims_are_capped():
    async with ShmChannel(name="tx") as tx, ShmChannel() as rx:
        for field, value, message in [("readers", shm_mod.MAX_READERS + 1, "claims 17 readers"),
                                      ("data_end", 1 << 40, "but the file holds")]:
            d = await tx.send(sample_batch(), timeout=5)
            fd = os.open(d["path"], os.O_RDWR)
            try:
                state = shm_mod._State.read(fd)
                setattr(state, field, value)
                state.write(fd)
            finally:
                os.close(fd)
            with pytest.raises(TransferError, match=message):
                await rx.recv(d, timeout=2)

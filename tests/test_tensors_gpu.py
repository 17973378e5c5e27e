"""GPU channels (CUDA IPC, NCCL via CuPy).  The GPU tests skip without CUDA and CuPy; the rest
checks, on any machine, that the package works without them and that the unique id survives the bus."""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing as mp
import os
import subprocess
import sys

import pytest
import torch

from tensors.channels import open_channel
from tensors.channels.nccl import UNIQUE_ID_BYTES, decode_unique_id, encode_unique_id
from tensors.errors import TransferError
from tests.spawned import let_go, spawned

HAVE_CUPY = importlib.util.find_spec("cupy") is not None
HAVE_GPU = torch.cuda.is_available() and HAVE_CUPY
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs CUDA and CuPy")
needs_two_gpus = pytest.mark.skipif(not HAVE_GPU or torch.cuda.device_count() < 2, reason="needs 2 GPUs and CuPy")


def weights(seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    named = {
        "layers.0.w": torch.randn(256, 128, generator=g),
        "layers.0.b": torch.randn(128, generator=g).to(torch.bfloat16),
        "step": torch.tensor(seed),
    }
    return {k: v.to(device) for k, v in named.items()}


def same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_unique_id_round_trips_through_bytes():
    uid = tuple(range(-128, 0)) if UNIQUE_ID_BYTES == 128 else ()
    data = encode_unique_id(uid)
    assert isinstance(data, bytes) and len(data) == UNIQUE_ID_BYTES
    assert decode_unique_id(data) == uid
    mixed = tuple((i * 37) % 256 - 128 for i in range(UNIQUE_ID_BYTES))
    assert decode_unique_id(encode_unique_id(mixed)) == mixed
    with pytest.raises(ValueError, match="128 bytes"):
        decode_unique_id(b"short")


@pytest.mark.skipif(HAVE_GPU, reason="checks the error when CUDA or CuPy is missing")
@pytest.mark.parametrize("kind", ["cuda_ipc"])
def test_gpu_kinds_fail_clearly_without_cuda_or_cupy(kind):
    with pytest.raises(RuntimeError, match="CuPy|CUDA"):
        open_channel(kind)


# ---- on a GPU -------------------------------------------------------------------------------------


def _ipc_sender(conn) -> None:
    async def main() -> None:
        ch = open_channel("cuda_ipc", device=0, name="ipc-child")
        conn.send(await ch.send(weights(3, "cuda:0"), timeout=60))
        await asyncio.to_thread(conn.recv)
        await ch.close()

    asyncio.run(main())


@pytest.mark.gpu
@needs_gpu
async def test_cuda_ipc_round_trip_across_processes():
    with spawned(_ipc_sender) as (proc, parent):
        assert await asyncio.to_thread(parent.poll, 120), "child did not start"
        desc = parent.recv()
        async with open_channel("cuda_ipc", device=0) as rx:
            got = await rx.recv(desc, timeout=30)
            assert all(t.is_cuda for t in got.values())
            assert same(got, weights(3))
            with pytest.raises(TransferError):  # one reader: it is gone now
                await rx.recv(desc, timeout=5)
        assert await let_go(proc, parent) == 0


@pytest.mark.gpu
@needs_gpu
async def test_nccl_single_rank_broadcast_and_init_timeout():
    from tensors.channels.nccl import NcclGroup, nccl_unique_id

    group = await NcclGroup.create(nccl_unique_id(), 1, 0, device=0, timeout=60)
    buf = torch.arange(1000, dtype=torch.uint8, device="cuda:0")
    await group.broadcast(buf, root=0, timeout=30)
    assert torch.equal(buf.cpu(), torch.arange(1000, dtype=torch.uint8))
    group.close()
    # a group of two where the other rank never comes: a clear error, not a hang
    with pytest.raises(TransferError, match="not all 2 ranks joined") as info:
        await NcclGroup.create(nccl_unique_id(), 2, 0, device=0, timeout=3)
    assert info.value.phase == "init"


def _nccl_rank(rank: int, uid: bytes, desc_conn, mode: str) -> None:
    from tensors.channels.nccl import NcclChannel, NcclGroup

    async def main() -> None:
        group = await NcclGroup.create(uid, 2, rank, device=rank, timeout=60)
        ch = NcclChannel(group=group)
        if rank == 0:
            desc = await ch.send(weights(11, "cuda:0"), timeout=10, readers=1)
            desc_conn.send(desc)
            try:
                await ch.flush()
                desc_conn.send("ok")
            except TransferError as e:
                desc_conn.send(f"error:{e.phase}")
        elif mode == "normal":
            got = await ch.recv(desc_conn.recv(), timeout=30)
            desc_conn.send("same" if same(got, weights(11)) else "different")
        else:  # "absent": never joins the broadcast
            desc_conn.recv()
            await asyncio.sleep(30)

    asyncio.run(main())


@pytest.mark.gpu
@needs_two_gpus
@pytest.mark.parametrize("mode", ["normal", "absent"])
async def test_nccl_weight_broadcast_between_two_processes(mode):
    from tensors.channels.nccl import nccl_unique_id

    uid = nccl_unique_id()
    ctx = mp.get_context("spawn")
    root_end, root_child = ctx.Pipe()
    peer_end, peer_child = ctx.Pipe()
    procs = [
        ctx.Process(target=_nccl_rank, args=(0, uid, root_child, mode), daemon=True),
        ctx.Process(target=_nccl_rank, args=(1, uid, peer_child, mode), daemon=True),
    ]
    for p in procs:
        p.start()
    try:
        assert await asyncio.to_thread(root_end.poll, 120)
        peer_end.send(root_end.recv())  # the descriptor rides "the bus"
        assert await asyncio.to_thread(root_end.poll, 60)
        outcome = root_end.recv()
        if mode == "normal":
            assert outcome == "ok"
            assert await asyncio.to_thread(peer_end.poll, 60) and peer_end.recv() == "same"
        else:
            assert outcome.startswith("error:"), "the watchdog aborts a broadcast nobody joins"
    finally:
        for p in procs:
            p.kill()
            p.join(10)


def test_gpu_modules_import_without_importing_cupy():
    code = (
        "import sys, tensors, tensors.channels, tensors.channels.cuda_ipc as ipc, tensors.channels.nccl\n"
        "assert 'cupy' not in sys.modules, 'cupy was imported eagerly'\n"
        "assert ipc.pack_layout([3, 300, 0, 1]) == ([0, 256, 768, 768], 1024)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

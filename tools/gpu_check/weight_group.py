"""The weight-update group on nccl with one rank (one GPU: the trainer alone): join, async broadcasts
polled to completion, the group aborted; then a group whose peer never comes: the deadline fires,
the group is aborted and this process goes on. DEVICE/BACKEND (cuda/nccl) let it run on cpu/gloo."""
import asyncio
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from actors.weights.sglang_distributed import GroupError, TrainerGroup, free_port  # noqa: E402

backend = os.environ.get("BACKEND", "nccl")


async def main():
    g = TrainerGroup(backend=backend, master_address="127.0.0.1", master_port=free_port("127.0.0.1"), world_size=1,
                     group_name="gpu_check_1", timeout=30)
    await g.join()
    print("TORCH_NCCL_ASYNC_ERROR_HANDLING", os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING"))
    ts = [torch.randn(1024, 1024, dtype=torch.bfloat16, device=g.device) for _ in range(8)]
    ts.append(torch.randn(4096))  # a host tensor: copied to the device one bucket at a time
    t0 = time.monotonic()
    await g.broadcast(ts)
    print(f"broadcast of {len(ts)} tensors in {time.monotonic() - t0:.3f} s")
    await g.abort()
    lone = TrainerGroup(backend=backend, master_address="127.0.0.1", master_port=free_port("127.0.0.1"), world_size=2,
                        group_name="gpu_check_2", timeout=5)
    t0 = time.monotonic()
    try:
        await lone.join()
        raise SystemExit("a group whose peer never came was joined")
    except GroupError as exc:
        print(f"peer never came: {exc} after {time.monotonic() - t0:.1f} s; the process goes on")
    print("OK")

asyncio.run(main())

"""FSDP2 over a one-rank group (nccl on a GPU) against World.alone: one PPO step, same weights.
DEVICE/BACKEND (default cuda/nccl) let the same script run on cpu/gloo."""
import copy
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2] / "tests")]
import rank_proc  # noqa: E402
from actors.learner.learner import train_ppo_batch  # noqa: E402
from actors.weights.sglang_distributed import free_port  # noqa: E402
from policies.train.data_parallel import World  # noqa: E402
from policies.train.ppo import make_optimizer  # noqa: E402

device, backend = os.environ.get("DEVICE", "cuda"), os.environ.get("BACKEND", "nccl")
print("torch", torch.__version__, "device", device, "backend", backend)
model, _, batch = rank_proc.setup()
model = model.to(device)
whole = copy.deepcopy(model)
cfg = rank_proc.config(10, 2)
alone_stats = train_ppo_batch(whole, make_optimizer(whole, rank_proc.CFG), batch, cfg, recompute=True, ref_model=None,
                              lr=rank_proc.CFG.lr, world=World.alone(whole))
kw = {"device_id": torch.device(device)} if device == "cuda" else {}
dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port('127.0.0.1')}", rank=0, world_size=1, **kw)
world = World.fsdp(model)
stats = train_ppo_batch(model, make_optimizer(model, rank_proc.CFG), batch, cfg, recompute=True, ref_model=None,
                        lr=rank_proc.CFG.lr, world=world)
full = world.full_weights()
ref = {k: v.detach().cpu() for k, v in whole.state_dict().items()}
worst = max((full[k].float() - ref[k].float()).abs().max().item() for k in ref)
print("loss alone", alone_stats.get("loss"), "fsdp", stats.get("loss"), "max |weight diff|", worst)
dist.destroy_process_group()
assert worst < 1e-4, worst
print("OK")

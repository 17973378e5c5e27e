"""LoRA under learner ranks: two gloo ranks (FSDP2) train only the adapter, their adapter gradients summed,
to the adapter one rank trains; rank 0's whole copy publishes the adapter only."""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LORA_ATOL = 1e-5  # as tests/test_learner_ranks.py: two ranks sum gradients in another order


def setup():
    from policies.model import lora
    from policies.model.loading import tiny_model
    from policies.train.ppo import make_optimizer, recompute_logprobs
    from tests.batches import synthetic_batch, with_behaviour_logprobs
    from tests.rank_proc import CFG
    torch.manual_seed(0)
    model = lora.wrap(tiny_model(seed=3), lora.LoraSettings(r=4, alpha=8.0, target_modules=("q_proj", "down_proj")))
    with torch.no_grad():  # B != 0: A gets gradients too
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    batch = synthetic_batch(10, 1, response_len=lambda i: 4 + (5 * i) % 9, reward=lambda i: float((i * 7) % 5) - 2.0)
    batch = with_behaviour_logprobs(batch, recompute_logprobs(model, batch, CFG) - 0.05)
    return model, make_optimizer(model, CFG), batch


def rank_main(out: str) -> None:
    """One rank of the group (the environment names it), as rank 0 / a served rank run a step."""
    from actors.learner.learner import train_ppo_batch
    from actors.learner.ranks import join, serve
    from actors.weights.broadcaster import snapshot
    from policies.train.data_parallel import World
    from policies.train.ppo import make_optimizer
    from tests.rank_proc import CFG
    ranks = join("cpu", timeout=60.0, batch_over="link")
    model, _, batch = setup()
    whole = copy.deepcopy(model)
    base = {k: v.clone() for k, v in whole.state_dict().items() if ".lora_" not in k}
    world = World.fsdp(model)
    opt = make_optimizer(model, CFG)
    if ranks.rank > 0:
        serve(ranks, world, optimizer=opt, ppo=CFG, recompute=True)
        return
    ranks.post({"op": "train", "step": 0, "lr": CFG.lr}, batch)
    train_ppo_batch(model, opt, batch, CFG, recompute=True, ref_model=None, lr=CFG.lr, world=world)
    world.gather_weights(whole)
    ranks.stop()
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    base_moved = max(float((whole.state_dict()[k] - v).abs().max()) for k, v in base.items())
    torch.save({"adapter": {k: v.clone() for k, v in snapshot(whole).items()}, "n_opt": n_opt,
                "base_moved": base_moved}, out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_the_adapter_only_to_the_adapter_of_one(tmp_path):
    from actors.learner.learner import train_ppo_batch
    from actors.weights.broadcaster import snapshot
    from policies.model import lora
    from tests.rank_proc import CFG
    out = tmp_path / "rank0.pt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "BOBA_TORCH_THREADS": "1", "BOBA_LEARNER_SECRET": os.urandom(32).hex(), "PYTHONPATH": str(ROOT)}
    code = f"from tests.test_lora_ranks import rank_main; rank_main({str(out)!r})"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [log[-3000:] for log in logs]
    two = torch.load(out, weights_only=True)
    model, opt, batch = setup()
    before = {k: v.clone() for k, v in snapshot(model).items()}
    train_ppo_batch(model, opt, batch, CFG, recompute=True, ref_model=None, lr=CFG.lr)
    one = snapshot(model)
    assert lora.is_adapter_state(two["adapter"]) and two["adapter"].keys() == one.keys()
    assert two["n_opt"] == len(one)  # the sharded optimizer holds the adapter's parameters only
    assert two["base_moved"] == 0.0  # the base stays frozen on every rank
    diff = max(float((one[k] - two["adapter"][k]).abs().max()) for k in one)
    moved = min(float((one[k] - before[k]).abs().max()) for k in one)  # every adapter tensor trained
    print(f"adapter 1 rank vs 2 ranks: max |diff| {diff:.2e}; every adapter tensor moved by >= {moved:.2e}")
    assert moved > 50 * LORA_ATOL and diff <= LORA_ATOL

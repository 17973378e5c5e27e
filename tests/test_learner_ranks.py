"""Learner ranks: two real processes in a gloo group train a PPO batch as one rank does."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rank_proc
import simhosts

HERE = Path(__file__).resolve().parent
# fp32 on a CPU: two ranks add the micro-batch gradients in another order than one rank does, and AdamW's
# m / sqrt(v) magnifies rounding where a gradient is near 0; after 2 steps of lr 1e-3 (weights move by up to
# ~lr per step) the weights agree to 1e-5, 1% of one step (observed: 1.0e-6, printed)
WEIGHT_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# a keyless process on another simulated host writes stop commands into the group's TCP store (as the
# ranks > 0 read them before the command link) for as long as the ranks run
ATTACK = """
import datetime, sys, time, torch.distributed as dist
addr, port = sys.argv[1], int(sys.argv[2])
wrote = 0
for _ in range(600):
    try:
        store = dist.TCPStore(addr, port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=20))
        for seq in range(8):
            store.set(f"cmd/{seq}", '{"op": "stop"}')
        wrote += 1
        if wrote == 1:
            print("attacker: wrote stop commands into the store", flush=True)
    except Exception:  # not listening yet, or gone
        pass
    time.sleep(0.1)
"""


def _rank_env(addr: str) -> dict:
    return {**os.environ, "MASTER_ADDR": addr, "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
            "BOBA_TORCH_THREADS": "1", "BOBA_LEARNER_SECRET": os.urandom(32).hex()}


@pytest.mark.parametrize("n_seqs,minibatches,batch_over,attacked,slow_s",
                         [(10, 2, "link", True, 0.0), (1, 1, "group", False, 2.0)])
def test_two_ranks_train_a_batch_to_the_weights_and_metrics_of_one(tmp_path, n_seqs, minibatches, batch_over,
                                                                   attacked, slow_s):
    """Rank 0 sends the step and its batch as the learner does: over the command link (CPU) or the group
    (GPU's path, here on gloo). Attacked: the ranks on simulated host A, a keyless client on host B keeps
    writing stop commands into their store; the ranks ignore it and train as one rank does. Slow: rank 1
    asks for each command 2 s late, and still gets the last one (stop) from a rank 0 that is done."""
    out = tmp_path / "rank0.pt"
    argv = [sys.executable, str(HERE / "rank_proc.py"), str(out), str(n_seqs), str(minibatches), batch_over,
            str(slow_s)]
    net = attacker = None
    if attacked and simhosts.skip_reason() is None:
        net = simhosts.SimHosts(2, tmp_path, sshd=False).__enter__()
    try:
        env = _rank_env(net.hosts[0].addr if net else "127.0.0.1")
        if net:
            attacker = subprocess.Popen(net.argv(net.hosts[1], [sys.executable, "-c", ATTACK, net.hosts[0].addr,
                                                                env["MASTER_PORT"]]),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs = [subprocess.Popen(net.argv(net.hosts[0], argv) if net else argv, env={**env, "RANK": str(r)},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
        try:
            logs = [p.communicate(timeout=300)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
        said = ""
        if attacker:
            attacker.kill()
            said = attacker.communicate()[0]
    finally:
        if net:
            net.close()
    assert [p.returncode for p in procs] == [0, 0], logs
    if attacker:
        assert "attacker: wrote stop commands into the store" in said, said[-3000:]  # it did reach the store
    two = torch.load(out, weights_only=True)
    model, opt, one = rank_proc.train(n_seqs, minibatches)
    diff = max(float((p - two["weights"][k]).abs().max()) for k, p in model.state_dict().items())
    moved = max(float((p - q).abs().max()) for p, q in zip(model.state_dict().values(),
                                                           rank_proc.setup(n_seqs, minibatches)[0].state_dict().values()))
    print(f"max weight difference 1 rank vs 2 ranks: {diff:.2e} (the step moved weights by up to {moved:.2e})")
    assert moved > 50 * WEIGHT_ATOL  # the step did something the comparison can see (one step: ~lr)
    assert diff <= WEIGHT_ATOL
    # AdamW's state: each rank holds about half; gathered (as a checkpoint does) it is one rank's
    one_opt = opt.state_dict()
    full = sum(st["exp_avg"].numel() for st in one_opt["state"].values())
    assert two["held"] <= 0.6 * full, (two["held"], full)
    assert two["optimizer"]["state"].keys() == one_opt["state"].keys()
    for i, st in one_opt["state"].items():
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(two["optimizer"]["state"][i][k], st[k], rtol=1e-4, atol=1e-7)
    for key in ("loss", "grad_norm", "grad_norm_max", "clip_frac", "approx_kl", "entropy", "n_loss_tokens",
                "n_minibatches", "advantage_std", "behav_logprob_gap"):
        assert two["stats"][key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key

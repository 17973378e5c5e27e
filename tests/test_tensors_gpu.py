"""GPU bytes between learner ranks (gpu marker; skipped without CUDA): on one GPU, a one-rank NCCL group
runs the same calls as two ranks do. The batch from rank 0 reaches the group over NCCL as tensors, whole;
rank 0's copy of the weights is filled device to device from the FSDP2 shards; the optimizer state a
checkpoint writes is gathered to the CPU and never loaded into rank 0's GPU optimizer."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank_nccl(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from actors.learner.ranks import join
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "BOBA_LEARNER_SECRET": os.urandom(32).hex()}.items():
        monkeypatch.setenv(k, v)
    torch.cuda.set_device(0)
    ranks = join("cuda", timeout=60.0)
    yield ranks
    ranks.link.close()
    torch.distributed.destroy_process_group()


def test_batch_weights_and_optimizer_state_on_one_nccl_rank(one_rank_nccl):
    import torch.distributed as dist
    from actors.learner.rank_link import broadcast_batch
    from policies.model.loading import tiny_model
    from policies.train.data_parallel import World, whole_optimizer_state
    from policies.train.ppo import PPOConfig, make_optimizer, train_step
    from tensors import wire
    from tests.batches import synthetic_batch
    ranks = one_rank_nccl
    assert dist.get_backend() == "nccl" and ranks.batch_over == "group"
    batch = synthetic_batch(6, 1, response_len=lambda i: 3 + i, reward=lambda i: float(i % 3) - 1.0)
    header, tensors = wire.encode_tensors(batch)
    got = broadcast_batch(header, tensors, ranks.device, ranks.timeout)
    assert torch.equal(got.input_ids, batch.input_ids) and torch.equal(got.cu_seqlens, batch.cu_seqlens)

    model = tiny_model(seed=3).cuda()
    whole = copy.deepcopy(model)
    world = World.fsdp(model)
    cfg = PPOConfig(minibatches=1, lr=1e-2, max_tokens_per_micro_batch=64)
    opt = make_optimizer(model, cfg)
    train_step(model, opt, batch, cfg, lr=cfg.lr, world=world)
    before = {k: v.clone() for k, v in whole.state_dict().items()}
    world.gather_weights(whole)
    after = whole.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step's weights arrived
    assert all(v.device.type == "cuda" for v in after.values())
    whole_opt = make_optimizer(whole, cfg)
    saved = whole_optimizer_state(whole, whole_opt, world.full_optimizer_state(opt))
    assert not whole_opt.state  # nothing loaded onto the GPU copy
    assert saved["state"] and all(t.device.type == "cpu" for st in saved["state"].values()
                                  for t in st.values() if isinstance(t, torch.Tensor))

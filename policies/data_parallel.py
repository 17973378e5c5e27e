"""Where a PPO step runs: alone, or as one of N data-parallel learner ranks (the one interface).

Every rank holds the whole batch and deals itself its micro-batches (tensors.allocator with
`n_ranks`); the loss is divided by the minibatch's global loss-token count, so the gradients summed
over ranks are the one-rank gradients. PyTorch does the summing: the model runs under
DistributedDataParallel, whose averaging the step undoes by scaling the loss by the world size.

Why DDP and not FSDP2: `fully_shard` does train on gloo in torch 2.13 (CPU: forward, backward,
clip, step and a full state dict all run), but its sharded weights and optimizer state would need
gathering for every weight broadcast and a sharded checkpoint format to resume; DDP keeps a full
replica (weights and AdamW state) on every rank, so rank 0's model is what the broadcaster and the
checkpoints read as before. The optimizer state is therefore replicated, not sharded.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn

from policies.logprobs import packed_logprobs


class PackedLogprobs(nn.Module):
    """packed_logprobs as a module's forward: DDP's hooks run on its wrapper's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, **kw) -> tuple[Tensor, Tensor | None]:
        return packed_logprobs(self.model, input_ids, cu_seqlens, **kw)


class World:
    """This process's rank among `size`, the model's forward for training, and the sum over ranks.

    `World.alone(model)` is the one-rank step (no process group); `World.ddp(model, group)` one of
    the ranks of a torch.distributed group (every rank must build it: DDP broadcasts rank 0's weights).
    """

    def __init__(self, rank: int, size: int, forward: Callable, reduce: Callable[[Tensor], None],
                 no_sync: Callable[[], contextlib.AbstractContextManager]):
        self.rank, self.size, self.forward = rank, size, forward
        self._reduce, self._no_sync = reduce, no_sync

    @classmethod
    def alone(cls, model: nn.Module) -> "World":
        return cls(0, 1, PackedLogprobs(model), lambda t: None, contextlib.nullcontext)

    @classmethod
    def ddp(cls, model: nn.Module, group=None) -> "World":
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        device = next(model.parameters()).device
        wrapped = DistributedDataParallel(PackedLogprobs(model), process_group=group, broadcast_buffers=False,
                                          device_ids=[device] if device.type == "cuda" else None)
        return cls(dist.get_rank(group), dist.get_world_size(group), wrapped,
                   lambda t: dist.all_reduce(t, group=group), wrapped.no_sync)

    def sum(self, t: Tensor) -> Tensor:
        """`t` summed over the ranks, in place (every rank calls it, in the same order)."""
        self._reduce(t)
        return t

    def sync_grads(self, now: bool):
        """Backward inside: gradients are summed over ranks now (the last micro-batch), else accumulated."""
        return contextlib.nullcontext() if now else self._no_sync()


def rank_share(lengths: list[int], max_tokens: int, world: World) -> list[list[int]]:
    """This rank's micro-batches (indices into `lengths`), as many on every rank; [] = an empty one."""
    from tensors.allocator import allocate_micro_batches  # imported late: only training needs it
    return allocate_micro_batches(lengths, max_tokens, n_ranks=world.size)[world.rank]


def zero_step(world: World, input_ids: Tensor) -> None:
    """An empty micro-batch's part in the gradient sum: a forward and backward that add zero."""
    ids = input_ids[:2]
    cu = torch.tensor([0, ids.numel()], dtype=torch.int32, device=ids.device)
    lp, _ = world.forward(ids, cu)
    (lp.sum() * 0.0).backward()

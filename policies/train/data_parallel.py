"""Where a PPO step runs: alone, or as one of N data-parallel learner ranks (the one interface).

Every rank holds the whole batch and deals itself its micro-batches (tensors.allocator with
`n_ranks`); the loss is divided by the minibatch's global loss-token count, so the gradients summed
over ranks are the one-rank gradients. PyTorch does the summing and the sharding: FSDP2
(`fully_shard`, each decoder layer and the rest as the root) shards weights, gradients and the AdamW
state over the ranks; its reduce-scatter averages, which the step undoes by scaling the loss by the
world size. FSDP2 runs on gloo in torch 2.13 (CPU: forward, backward, clipping, the fused AdamW step,
full state dicts), as on nccl, so DDP is not needed on either backend.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from policies.model.logprobs import packed_logprobs


class PackedLogprobs(nn.Module):
    """packed_logprobs as a module's forward: FSDP's hooks (gather the weights, reduce the gradients) run on
    a module's forward, and packed_logprobs reads the head's weight itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, **kw) -> tuple[Tensor, Tensor | None]:
        return packed_logprobs(self.model, input_ids, cu_seqlens, **kw)


class World:
    """This process's rank among `size`, the model's forward for training, and the sum over ranks.

    `World.alone(model)` is the one-rank step (no process group); `World.fsdp(model)` one of the ranks
    of the default torch.distributed group.
    """

    def __init__(self, model: nn.Module, rank: int, size: int, forward: Callable, reduce: Callable[[Tensor], None]):
        self.model, self.rank, self.size, self.forward = model, rank, size, forward
        self._reduce = reduce

    @classmethod
    def alone(cls, model: nn.Module) -> "World":
        return cls(model, 0, 1, PackedLogprobs(model), lambda t: None)

    @classmethod
    def fsdp(cls, model: nn.Module) -> "World":
        """Shard `model` in place over the default process group (every rank calls it, before it makes
        its optimizer: the parameters become DTensor shards)."""
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        for layer in getattr(model.base_model, "layers", ()):
            fully_shard(layer)
        wrapped = fully_shard(PackedLogprobs(model))  # the root: embeddings, final norm, head
        return cls(model, dist.get_rank(), dist.get_world_size(), wrapped, dist.all_reduce)

    def sum(self, t: Tensor) -> Tensor:
        """`t` summed over the ranks, in place (every rank calls it, in the same order)."""
        self._reduce(t)
        return t

    def full_weights(self) -> dict[str, Tensor]:
        """The whole model's weights on the CPU on rank 0, {} elsewhere (a collective: every rank calls)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_optimizer_state(self, optimizer) -> dict:
        """The whole optimizer state, keyed by parameter name, on rank 0 ({} elsewhere; a collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(self.model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Every rank: its shard of a whole optimizer state keyed by parameter name (`optimizer_state_by_name`)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(self.model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state_by_name(model: nn.Module, optimizer) -> dict:
    """An unsharded model's optimizer state keyed by parameter name (what `World.load_optimizer_state` takes)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state_by_name(model: nn.Module, optimizer, state: dict) -> None:
    """An unsharded model's optimizer from a state keyed by parameter name (`World.full_optimizer_state`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def rank_share(lengths: list[int], max_tokens: int, world: World) -> list[list[int]]:
    """This rank's micro-batches (indices into `lengths`), as many on every rank; [] = an empty one."""
    from tensors.allocator import allocate_micro_batches  # imported late: only training needs it
    return allocate_micro_batches(lengths, max_tokens, n_ranks=world.size)[world.rank]


def idle_forward(world: World, input_ids: Tensor) -> Tensor:
    """An empty micro-batch's forward: a sharded model's ranks run it as often as each other (its gathers)."""
    ids = input_ids[:2]
    cu = torch.tensor([0, ids.numel()], dtype=torch.int32, device=ids.device)
    return world.forward(ids, cu)[0]


def zero_step(world: World, input_ids: Tensor) -> None:
    """An empty micro-batch's part in the gradient sum: a forward and backward that add zero."""
    (idle_forward(world, input_ids).sum() * 0.0).backward()

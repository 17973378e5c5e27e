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

    def gather_weights(self, into: nn.Module | None) -> None:
        """The whole weights into `into` (rank 0's unsharded copy; None on the other ranks), a collective:
        one parameter at a time is all-gathered on the ranks' device and copied device to device, so no
        CPU round trip and never more than one whole parameter besides `into`."""
        from torch.distributed.tensor import DTensor
        dst = dict(into.named_parameters()) if into is not None else {}
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if not p.requires_grad:  # frozen (a LoRA run's base): `into` holds it already, it never changes
                    continue
                whole = p.full_tensor() if isinstance(p, DTensor) else p
                if into is not None:
                    dst[name].copy_(whole)
                del whole

    def full_optimizer_state(self, optimizer) -> dict:
        """The whole optimizer state, keyed by parameter name, on rank 0's CPU ({} elsewhere; a collective):
        each tensor is gathered and moved to the CPU before the next, so no GPU holds the whole state."""
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


def whole_optimizer_state(model: nn.Module, optimizer, by_name: dict) -> dict:
    """`optimizer.state_dict()` of the unsharded `model` as it would read after loading `by_name` (a state
    keyed by parameter name, `World.full_optimizer_state`), built without loading it: the tensors stay
    where the gather put them (the CPU) instead of moving to the parameters' device."""
    template = optimizer.state_dict()  # param_groups with the parameters' indices
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    state = {index[n]: s for n, s in by_name["state"].items()}
    groups = [{**g, **{k: v for k, v in named.items() if k != "params"}}
              for g, named in zip(template["param_groups"], by_name["param_groups"])]
    return {"state": state, "param_groups": groups}


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

"""Expert parallelism's collectives on torch.distributed: the process layout, the all-to-all exchange of
expert rows, global sums, and gradient finishing. This module knows tensors and process groups only: it
imports neither the MoE layer nor the gates, which call into it (see parallel.py for the layout and what
each rank holds).

One MoE call, on every rank (the layer's sorted dispatch, with the exchange at its seam):

    x_sorted [A, d], counts [E]   this rank's assignments, sorted by global expert
      -> all_to_all of counts     how many rows every source sends to each of my local experts
      -> all_to_all of rows       uneven splits; rows arrive grouped by source, then by local expert
      -> regroup by local expert, run the E/P local experts on contiguous slices, undo the regrouping
      -> all_to_all back          each row returns to the rank (and position) it came from

The row exchanges are autograd functions whose backward is the reverse exchange (torch's own in
`torch.distributed.nn.functional` is deprecated in torch 2.13). Every rank makes the same collective calls in
the same order whatever its routing, so a rank that sends or receives no rows (or has no tokens at all)
takes part with empty tensors instead of hanging.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nmt_moe.moe.experts import Experts


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's place in the layout (see the module docstring)."""

    size: int  # P: ranks that share one full set of experts
    rank: int  # this rank's index in its expert-parallel group = which shard it holds
    group: Any  # ProcessGroup of the P ranks of this block
    replicas: int  # W / P ranks hold each shard
    replica_group: Any  # ProcessGroup of the ranks holding this shard (None when replicas == 1)
    world_size: int  # W

    def shard(self, num_experts: int) -> slice:
        """The global experts this rank holds."""
        per_rank = num_experts // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def init_expert_parallel(expert_parallel_size: int) -> ExpertParallel:
    """Create the process groups (a collective call: every rank must call it, in the same order)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"expert_parallel_size={expert_parallel_size} needs torch.distributed to be initialised "
            "(train with strategy=ddp on several devices, or under torchrun / SLURM)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    size = expert_parallel_size
    if size < 1 or world % size:
        raise ValueError(f"expert_parallel_size must divide the world size {world}, got {size}")
    replicas = world // size
    group = replica_group = None
    for block in range(replicas):  # new_group is collective: all ranks create all groups
        ranks = list(range(block * size, (block + 1) * size))
        created = dist.new_group(ranks)
        if rank in ranks:
            group = created
    if replicas > 1:
        for shard in range(size):
            ranks = list(range(shard, world, size))
            created = dist.new_group(ranks)
            if rank in ranks:
                replica_group = created
    return ExpertParallel(size, rank % size, group, replicas, replica_group, world)


# --- the exchange ---------------------------------------------------------------------------------------


def run_sharded_experts(experts: Experts, x_sorted: Tensor, counts: Tensor, ep: ExpertParallel) -> Tensor:
    """x_sorted [A, d] sorted by global expert, counts [E] -> expert outputs [A, d] in the same order, the
    experts living on the ranks of `ep.group` (this rank holds `experts`, E/P of them). Rows past
    sum(counts) reach no expert and come back as zeros.

    The uneven all-to-all needs its split sizes on the host: both directions' travel in one device-to-host
    copy, the only synchronisation of the exchange.
    """
    num_local = experts.num_experts
    send_counts = counts.to(torch.long)  # [E] = [P·L]
    recv_counts = torch.empty_like(send_counts)  # [P·L]: from each source, rows for each local expert
    dist.all_to_all_single(recv_counts, send_counts, group=ep.group)
    recv_counts = recv_counts.view(ep.size, num_local)  # [P sources, L local experts]
    splits = torch.stack([send_counts.view(ep.size, num_local).sum(1), recv_counts.sum(1)]).tolist()
    send_splits, recv_splits = splits  # rows to each destination, rows from each source
    sent = sum(send_splits)

    x_recv = exchange(x_sorted[:sent], recv_splits, send_splits, ep.group)  # [R, d], by source, local expert
    local_expert = torch.arange(num_local, device=x_sorted.device).repeat(ep.size)  # [P·L]
    local_expert = local_expert.repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv_splits))
    order = torch.argsort(local_expert, stable=True)  # [R] regroups rows by local expert
    out_local = experts(x_recv.index_select(0, order), recv_counts.sum(0))  # [R, d]
    out_recv = torch.zeros_like(out_local).index_copy(0, order, out_local)  # back to arrival order
    out = exchange(out_recv, send_splits, recv_splits, ep.group)  # [sent, d]
    return torch.cat([out, out.new_zeros(x_sorted.shape[0] - sent, out.shape[1])])


def exchange(x: Tensor, recv_splits: list[int], send_splits: list[int], group: Any) -> Tensor:
    """Differentiable all_to_all of rows with uneven splits: x [sum(send_splits), ...] -> [sum(recv_splits),
    ...]; its backward sends the gradients back the same way."""
    return _AllToAll.apply(x, recv_splits, send_splits, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, group):  # type: ignore[override]
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        recv_splits, send_splits = ctx.splits
        return _AllToAll.apply(grad, send_splits, recv_splits, ctx.group), None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Sum over all ranks; the gradient of every rank's copy flows back to every input (a sum as well)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _AllReduceSum.apply(grad.contiguous())


def sum_over_ranks(x: Tensor) -> Tensor:
    """The sum of `x` over every rank, differentiably (each rank's gradient flows to every input).
    Collective: every rank calls it."""
    return _AllReduceSum.apply(x)


def global_top_m(scores: Tensor, k: int, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The batchwise gate's top m per expert over all ranks' tokens, m = max(1, k·N/E) with N the global
    token count (the sum of every rank's `tokens`; rows that are no token score -inf), as `gates.top_m_mask`
    arguments: each expert's m-th largest score [E], how many of the
    tokens tied at it to take [E], and how many tied tokens lower ranks hold [E] (ties go to earlier tokens).

    The global top m of an expert is among the union of every rank's local top m, so each rank sends only
    those: an all_gather of [m, E] per rank, k·N values, about W·k·N received per rank (no gradient: the mask
    is a hard choice). Collective: every rank calls it, with any number of local tokens (even none).
    """
    num_local, num_experts = scores.shape
    world, rank = dist.get_world_size(), dist.get_rank()
    tokens = tokens.reshape(1).round().long()
    dist.all_reduce(tokens)
    m = max(1, k * int(tokens) // num_experts)  # on the host: a synchronisation (batchwise gate only)
    candidates = scores.new_full((m, num_experts), float("-inf"))  # [m, E], -inf where a rank has < m tokens
    candidates[: min(m, num_local)] = scores.detach().topk(min(m, num_local), dim=0).values
    gathered = [torch.empty_like(candidates) for _ in range(world)]
    dist.all_gather(gathered, candidates)
    kth = torch.cat(gathered).topk(m, dim=0).values[-1]  # [E]

    counts = torch.stack([(scores > kth).sum(0), (scores == kth).sum(0)])  # [2, E] above, tied (this rank)
    every = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    every = torch.stack(every)  # [W, 2, E]
    needed = m - every[:, 0].sum(0)  # [E]
    ties_before = every[:rank, 1].sum(0)  # [E]
    return kth, needed, ties_before


def all_gather_cat(shard: Tensor, group: Any, size: int) -> Tensor:
    """[E/P, ...] shards of the P ranks of `group`, concatenated in rank order -> [E, ...]."""
    parts = [torch.empty_like(shard) for _ in range(size)]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts)


# --- gradients --------------------------------------------------------------------------------------------


def finish_expert_grads(params: Iterable[nn.Parameter], ep: ExpertParallel) -> None:
    """After backward: sum expert-shard gradients over the replicas of the shard and divide by the world
    size, matching DDP's mean over ranks for everything else (see the module docstring)."""
    for p in params:
        if p.grad is None:
            continue
        if ep.replica_group is not None:
            dist.all_reduce(p.grad, group=ep.replica_group)
        p.grad.div_(ep.world_size)


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[nn.Parameter], sharded: Iterable[nn.Parameter], max_norm: float, ep: ExpertParallel
) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model when expert weights are sharded.

    `params`: every parameter this rank holds (replicated and sharded); `sharded`: the expert shards.
    Global norm² = Σ replicated grads² (identical on every rank after DDP) + Σ over the expert-parallel
    group of each shard's grads² (summed, not averaged). Returns the global norm (before clipping).
    """
    params = [p for p in params if p.grad is not None]
    sharded_ids = {id(p) for p in sharded}
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(())
    device = grads[0].device
    replicated_sq = torch.zeros((), device=device)
    sharded_sq = torch.zeros((), device=device)
    for p in params:
        sq = p.grad.detach().float().pow(2).sum()
        if id(p) in sharded_ids:
            sharded_sq += sq
        else:
            replicated_sq += sq
    dist.all_reduce(sharded_sq, group=ep.group)
    total = (replicated_sq + sharded_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # the same formula as torch's clip_grad_norm_
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total

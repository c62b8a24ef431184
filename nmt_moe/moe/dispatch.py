"""Sorted dispatch: group token-expert assignments by expert so each expert runs on one contiguous slice.

The steps, in order, as the layer calls them:

    plan = sort_assignments(expert_index, gate_weight, num_experts)   # who goes where, sorted by expert
    plan, dropped = apply_capacity(plan, capacity)                    # optional: GShard capacity
    x_sorted = x.index_select(0, plan.token)                          # [A, d] gather
    # <- expert parallelism exchanges x_sorted / plan.counts between ranks here (all-to-all) and back:
    #    collectives.run_sharded_experts replaces the next line when the layer's experts are sharded
    out_sorted = experts(x_sorted, plan.counts)                       # [A, d] one GEMM pair per expert
    y = combine(out_sorted, plan, num_tokens)                         # [N, d] weighted scatter-add, fp32

No step builds a dense [tokens, experts, capacity] one-hot tensor, so the cost grows with k, not with E.

Every step keeps static shapes and device tensors, so none waits for the GPU (a host synchronisation
costs more than the small kernels around it): the plan always holds all A = N·k assignments, and the ones
that reach no expert (the -1 slots of the batchwise gate and of masked tokens, and assignments dropped by
capacity) sort to its end under the sentinel key E, with gate weight 0, outside every expert's slice.
The experts return zeros for those rows. Only the CPU loop over experts reads the counts on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """All A assignments, sorted by expert; rows from sum(counts) on reach no expert."""

    token: Tensor  # [A] long: which token (row of x) each sorted assignment reads
    weight: Tensor  # [A] fp32 gate weight of the assignment (0 past the experts' slices)
    expert: Tensor  # [A] long: the expert of each assignment, non-decreasing; E (sentinel) = none
    counts: Tensor  # [E] long, on the device: assignments per expert, the slice lengths

    @property
    def offsets(self) -> Tensor:
        """[E] int32: where each expert's slice ends (cumulative counts), as grouped GEMMs take them."""
        return group_offsets(self.counts)


def group_offsets(counts: Tensor) -> Tensor:
    """[E] int32 cumulative slice ends of `counts` [E]."""
    return torch.cumsum(counts, 0, dtype=torch.int32)


def expert_counts(expert: Tensor, num_experts: int) -> Tensor:
    """[E] long: how many entries of `expert` (any shape, long) name each expert; -1 and E are ignored.

    A scatter-add into E + 1 bins, the last one for "no expert": `torch.bincount` would read the tensor's
    maximum on the host first, and dropping the -1 entries by a boolean index would too.
    """
    flat = expert.reshape(-1)
    bins = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    return counts.scatter_add_(0, bins, torch.ones_like(bins))[:num_experts]


def sort_assignments(expert_index: Tensor, gate_weight: Tensor, num_experts: int) -> DispatchPlan:
    """Flatten [N, k] routing choice-major and stable-sort it by expert.

    Choice-major order (every token's first choice, then every second choice, ...) makes the position inside
    an expert's slice a priority: first choices come before second choices, earlier tokens before later
    ones, which is the order GShard capacity keeps. Entries of -1 (no expert) sort to the end.
    """
    num_tokens, k = expert_index.shape
    expert = expert_index.t().reshape(-1)  # [k·N], choice-major
    key = torch.where(expert >= 0, expert, num_experts)  # [A]: -1 -> sentinel E, after every expert
    weight = torch.where(expert >= 0, gate_weight.t().reshape(-1), 0.0)
    token = torch.arange(num_tokens, device=expert_index.device).repeat(k)
    order = torch.argsort(key, stable=True)
    return DispatchPlan(token[order], weight[order], key[order], expert_counts(key, num_experts))


def expert_capacity(capacity_factor: float, num_tokens: Tensor | int, k: int, num_experts: int) -> Tensor:
    """GShard capacity, ceil(capacity_factor · N · k / E) assignments per expert, as a [] long tensor: N is
    the number of real tokens, which on a GPU stays on the device."""
    tokens = torch.as_tensor(num_tokens, dtype=torch.float64)
    return torch.ceil(capacity_factor * tokens * k / num_experts).clamp(min=1).long()


def apply_capacity(plan: DispatchPlan, capacity: Tensor | int) -> tuple[DispatchPlan, Tensor]:
    """Keep the first `capacity` assignments of each expert's slice; returns the plan and the dropped count.

    Dropped assignments move behind the kept ones (a second stable sort, so the kept keep their order) and
    get weight 0. A dropped assignment contributes nothing to its token's output, so with the model's
    residual connection a token dropped by all its experts passes through unchanged.
    """
    num_experts = plan.counts.shape[0]
    starts = torch.cumsum(plan.counts, 0) - plan.counts  # [E] first sorted position of each expert
    starts = torch.cat([starts, starts.new_zeros(1)])  # [E + 1]: the sentinel never counts as kept
    position = torch.arange(plan.token.numel(), device=plan.token.device) - starts[plan.expert]  # [A]
    routed = plan.expert < num_experts
    keep = routed & (position < capacity)
    dropped = routed.sum() - keep.sum()
    key = torch.where(keep, plan.expert, num_experts)
    order = torch.argsort(key, stable=True)
    weight = torch.where(keep, plan.weight, 0.0)[order]
    kept = DispatchPlan(plan.token[order], weight, key[order], plan.counts.clamp(max=capacity))
    return kept, dropped


def combine(out_sorted: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """[N, d] fp32: Σ over each token's assignments of gate weight · expert output (a scatter-add).

    The sum accumulates in fp32 whatever the experts ran in: in bf16 a token's k contributions would be
    rounded at every addition.
    """
    weighted = out_sorted.float() * plan.weight.float().unsqueeze(-1)  # [A, d]
    zeros = weighted.new_zeros(num_tokens, out_sorted.shape[-1])
    return zeros.index_add(0, plan.token, weighted)

"""Sorted dispatch: group token-expert assignments by expert so each expert runs on one contiguous slice.

The steps, in order, as the layer calls them:

    plan = sort_assignments(expert_index, gate_weight, num_experts)   # who goes where, sorted by expert
    plan, dropped = apply_capacity(plan, capacity)                    # optional: GShard capacity as a mask
    x_sorted = x.index_select(0, plan.token)                          # [A, d] gather
    # <- expert parallelism exchanges x_sorted / plan.counts between ranks here (all-to-all) and back:
    #    parallel.run_sharded_experts replaces the next line when the layer's experts are sharded
    out_sorted = experts(x_sorted, plan.counts)                       # [A, d] one GEMM pair per expert
    y = combine(out_sorted, plan, num_tokens)                         # [N, d] weighted scatter-add

No step builds a dense [tokens, experts, capacity] one-hot tensor, so the cost grows with k, not with E.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DispatchPlan:
    """The A = N·k (or fewer) assignments, sorted by expert."""

    token: Tensor  # [A] long: which token (row of x) each sorted assignment reads
    weight: Tensor  # [A] fp32 gate weight of the assignment
    expert: Tensor  # [A] long: the expert of each assignment (non-decreasing)
    counts: list[int]  # [E] assignments per expert: the slice lengths


def sort_assignments(expert_index: Tensor, gate_weight: Tensor, num_experts: int) -> DispatchPlan:
    """Flatten [N, k] routing choice-major and stable-sort it by expert.

    Choice-major order (every token's first choice, then every second choice, ...) makes the position inside
    an expert's slice a priority: first choices come before second choices, earlier tokens before later
    ones, which is the order GShard capacity keeps. Entries of -1 (no expert) are dropped.
    """
    num_tokens, k = expert_index.shape
    expert = expert_index.t().reshape(-1)  # [k·N], choice-major
    weight = gate_weight.t().reshape(-1)
    token = torch.arange(num_tokens, device=expert_index.device).repeat(k)
    if bool((expert < 0).any()):
        valid = expert >= 0
        expert, weight, token = expert[valid], weight[valid], token[valid]
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=num_experts)
    return DispatchPlan(token[order], weight[order], expert[order], counts.tolist())


def expert_capacity(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """GShard capacity: ceil(capacity_factor · N · k / E) assignments per expert."""
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


def apply_capacity(plan: DispatchPlan, capacity: int) -> tuple[DispatchPlan, Tensor]:
    """Keep the first `capacity` assignments of each expert's slice; returns the plan and the dropped count.

    A dropped assignment contributes nothing to its token's output, so with the model's residual connection
    a token dropped by all its experts passes through unchanged.
    """
    counts = torch.tensor(plan.counts, device=plan.token.device)
    starts = torch.cumsum(counts, 0) - counts  # [E] first sorted position of each expert
    position = torch.arange(plan.token.numel(), device=plan.token.device) - starts[plan.expert]  # [A]
    keep = position < capacity
    dropped = (~keep).sum()
    kept = DispatchPlan(
        plan.token[keep], plan.weight[keep], plan.expert[keep], counts.clamp(max=capacity).tolist()
    )
    return kept, dropped


def combine(out_sorted: Tensor, plan: DispatchPlan, num_tokens: int) -> Tensor:
    """[N, d]: Σ over each token's assignments of gate weight · expert output (a scatter-add)."""
    weighted = out_sorted * plan.weight.to(out_sorted.dtype).unsqueeze(-1)  # [A, d]
    zeros = out_sorted.new_zeros(num_tokens, out_sorted.shape[-1])
    return zeros.index_add(0, plan.token, weighted)

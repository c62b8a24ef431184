"""Routers: each gate maps tokens [N, d_model] (fp32) to the experts they visit and the gate weights.

A gate returns a `Routing` with its balancing statistics as *sums over the tokens* (`stats`: importance,
load estimates, summed router probabilities, token counts) and the unweighted losses computed from them by
its `losses(stats)`. Expert parallelism all-reduces the sums over the ranks and calls `losses` again, so
every loss is the loss of the global batch. The layer weights and sums the losses. `bias` is the loss-free
balancing bias (DeepSeek-V3): it is added to the scores used to *select* experts only, never to the gate
weights. Every gate runs in fp32; the layer disables autocast around it.

`valid` [N] bool (None = all) marks the real tokens: the others (padding) get expert -1 and weight 0 and
count in no statistic. The layer routes every position this way instead of first picking out the real
tokens, which would need their number on the host (a GPU synchronisation); no gate reads a device value on
the host either, except the batchwise gate's padded width on CPU (see `BatchwiseGate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nmt_moe.moe.collectives import global_top_m
from nmt_moe.moe.dispatch import expert_counts
from nmt_moe.moe.losses import (
    batchwise_threshold_sum,
    cv_squared,
    prob_in_top_k,
    router_z_sum,
    softplus_noise_std,
    switch_balance_loss,
)

GATES = ("noisy_topk", "batchwise", "softmax_topk", "switch", "sigmoid", "hierarchical")


@dataclass
class Routing:
    """What a gate decided for N tokens."""

    expert_index: Tensor  # [N, k] long; -1 = no expert (only the batchwise gate pads rows)
    gate_weight: Tensor  # [N, k] fp32; 0 where expert_index is -1
    stats: dict[str, Tensor]  # sums over the N tokens ("importance" [E] always); additive over ranks
    losses: dict[str, Tensor]  # unweighted balancing losses, the gate's `losses(stats)`

    @property
    def importance(self) -> Tensor:
        """[E] fp32: summed gate weights per expert."""
        return self.stats["importance"]


def importance_of(expert_index: Tensor, gate_weight: Tensor, num_experts: int) -> Tensor:
    """[E] fp32: Σ over tokens of each expert's gate weight (differentiable)."""
    index = expert_index.reshape(-1).clamp(min=0)  # padded slots carry weight 0
    return gate_weight.new_zeros(num_experts).index_add(0, index, gate_weight.reshape(-1))


def top_m_mask(scores: Tensor, kth: Tensor, needed: Tensor, ties_before: Tensor) -> Tensor:
    """[N, E] bool: the scores above each expert's m-th score `kth` [E], plus the first `needed` [E] of the
    tokens tied at it, counting `ties_before` [E] tied tokens that come earlier (on lower ranks)."""
    tied = scores == kth  # [N, E]
    tie_rank = ties_before + tied.long().cumsum(0)  # [N, E] 1-based position among the tied tokens
    return (scores > kth) | (tied & (tie_rank <= needed))


def _token_count(x: Tensor, valid: Tensor | None) -> Tensor:
    """[] fp32: the number of real tokens, as a statistic that sums over ranks."""
    return x.new_full((), float(x.shape[0])) if valid is None else valid.sum().float()


def _sum_tokens(values: Tensor, valid: Tensor | None) -> Tensor:
    """values [N, ...] summed over the real tokens -> [...]."""
    if valid is None:
        return values.sum(0)
    return (values * valid.view(-1, *([1] * (values.dim() - 1)))).sum(0)


def _drop_invalid(expert_index: Tensor, gate_weight: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """[N, k] routing with expert -1 and weight 0 on the rows that are not real tokens."""
    if valid is None:
        return expert_index, gate_weight
    row = valid.unsqueeze(1)
    return torch.where(row, expert_index, -1), torch.where(row, gate_weight, 0.0)


def _with_bias(scores: Tensor, bias: Tensor | None) -> Tensor:
    return scores if bias is None else scores + bias


def _router_weight(d_model: int, num_experts: int, zero: bool) -> nn.Parameter:
    weight = torch.zeros(d_model, num_experts)
    if not zero:
        nn.init.normal_(weight, std=d_model**-0.5)
    return nn.Parameter(weight)


class NoisyTopKGate(nn.Module):
    """Shazeer et al. (2017): H = xW_g + N(0,1)·(softplus(xW_noise) + ε), keep the top k, softmax over them.

    Losses: "importance" = CV²(Σ gates per expert), "load" = CV²(smooth load estimate). With `noise=False`
    (and in eval mode) the smooth estimate is undefined and "load" is the CV² of the hard counts.
    W_g and W_noise start at zero as in the paper, so training noise breaks the initial ties.
    """

    def __init__(
        self, d_model: int, num_experts: int, k: int, noise: bool = True, noise_epsilon: float = 1e-2
    ) -> None:
        super().__init__()
        self.num_experts, self.k, self.noise, self.noise_epsilon = num_experts, k, noise, noise_epsilon
        self.w_gate = _router_weight(d_model, num_experts, zero=True)
        self.w_noise = _router_weight(d_model, num_experts, zero=True) if noise else None

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """clean logits, (noisy) logits H and the noise std, each [N, E]; no noise (None) in eval mode, where
        "load" is then the hard counts and decoding skips the noise matmul and the smooth estimate."""
        if self.w_noise is None or not self.training:
            clean = x @ self.w_gate.float()
            return clean, clean, None
        # one GEMM for both: fwd+bwd of x @ [W_g | W_noise] took 4.1-4.6 ms against 13.2-14.3 ms for two
        # (4,096 tokens, 8 experts, docs/SPEED.md); a GEMM this narrow is mostly fixed cost
        both = x @ torch.cat([self.w_gate, self.w_noise], dim=1).float()  # [N, 2E]
        clean, noise_logits = both.split(self.num_experts, dim=1)
        noise_std = softplus_noise_std(noise_logits, self.noise_epsilon)
        return clean, clean + torch.randn_like(clean) * noise_std, noise_std

    def forward(self, x: Tensor, bias: Tensor | None = None, valid: Tensor | None = None) -> Routing:
        clean, noisy, noise_std = self.scores(x)
        selection = _with_bias(noisy, bias)  # [N, E]
        top = selection.topk(self.k, dim=-1).indices  # [N, k]
        gate_weight = noisy.gather(1, top).softmax(dim=-1)  # softmax over the kept logits
        expert_index, gate_weight = _drop_invalid(top, gate_weight, valid)
        importance = importance_of(expert_index, gate_weight, self.num_experts)
        if noise_std is None:
            load = expert_counts(expert_index, self.num_experts).float()
        else:
            selected = torch.zeros_like(selection, dtype=torch.bool).scatter_(1, top, True)
            prob = prob_in_top_k(_with_bias(clean, bias), selection, noise_std, selected, self.k)  # [N, E]
            load = _sum_tokens(prob, valid)
        stats = {"importance": importance, "load": load}  # load [E]: smooth estimate (no noise: hard counts)
        return Routing(expert_index, gate_weight, stats, self.losses(stats))

    def losses(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"importance": cv_squared(stats["importance"]), "load": cv_squared(stats["load"])}


class SoftmaxTopKGate(nn.Module):
    """Softmax over all experts, then top k (GShard / Mixtral); `renormalize=False` with k=1 is Switch.

    Renormalising a single kept probability would make it 1 and cut the router's gradient, which is why the
    Switch gate keeps the raw probability. Losses: "balance" (Switch) and "z" (router z-loss).
    """

    def __init__(self, d_model: int, num_experts: int, k: int, renormalize: bool = True) -> None:
        super().__init__()
        self.num_experts, self.k, self.renormalize = num_experts, k, renormalize
        self.w_gate = _router_weight(d_model, num_experts, zero=False)

    def forward(self, x: Tensor, bias: Tensor | None = None, valid: Tensor | None = None) -> Routing:
        logits = x @ self.w_gate.float()  # [N, E]
        probs = logits.softmax(dim=-1)
        expert_index = _with_bias(probs, bias).topk(self.k, dim=-1).indices  # [N, k]
        gate_weight = probs.gather(1, expert_index)
        if self.renormalize:
            gate_weight = gate_weight / gate_weight.sum(dim=-1, keepdim=True)
        expert_index, gate_weight = _drop_invalid(expert_index, gate_weight, valid)
        stats = {
            "importance": importance_of(expert_index, gate_weight, self.num_experts),
            "prob_sum": _sum_tokens(probs, valid),  # [E]
            "counts": expert_counts(expert_index, self.num_experts).float(),  # [E]
            "tokens": _token_count(x, valid),
            "z_sum": router_z_sum(logits, valid),
        }
        return Routing(expert_index, gate_weight, stats, self.losses(stats))

    def losses(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        balance = switch_balance_loss(stats["prob_sum"], stats["counts"], stats["tokens"], self.k)
        return {"balance": balance, "z": stats["z_sum"] / stats["tokens"].clamp(min=1)}


class SigmoidGate(nn.Module):
    """Sigmoid router over RMS-normalised experts: the gate predicts each expert's output magnitude.

    The layer normalises every expert's output to unit RMS (no gain), so y = Σ_selected σ(xW)_i · ê_i(x)
    and top-k by σ picks the experts with the largest predicted norm: the sparse approximation of the dense
    sum Σ_i σ(xW)_i ê_i(x). Loss "balance": the Switch loss on the per-token normalised scores.
    """

    normalize_expert_output = True

    def __init__(self, d_model: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.w_gate = _router_weight(d_model, num_experts, zero=False)

    def forward(self, x: Tensor, bias: Tensor | None = None, valid: Tensor | None = None) -> Routing:
        scores = torch.sigmoid(x @ self.w_gate.float())  # [N, E]
        expert_index = _with_bias(scores, bias).topk(self.k, dim=-1).indices  # [N, k]
        gate_weight = scores.gather(1, expert_index)  # magnitudes, not renormalised
        expert_index, gate_weight = _drop_invalid(expert_index, gate_weight, valid)
        affinity = scores / scores.sum(dim=-1, keepdim=True)  # [N, E], rows sum to one
        stats = {
            "importance": importance_of(expert_index, gate_weight, self.num_experts),
            "affinity_sum": _sum_tokens(affinity, valid),  # [E]
            "counts": expert_counts(expert_index, self.num_experts).float(),  # [E]
            "tokens": _token_count(x, valid),
        }
        return Routing(expert_index, gate_weight, stats, self.losses(stats))

    def losses(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        balance = switch_balance_loss(stats["affinity_sum"], stats["counts"], stats["tokens"], self.k)
        return {"balance": balance}


class BatchwiseGate(nn.Module):
    """Shazeer et al. (2017) appendix F, strictly balanced gating.

    Training: each expert takes the top m = k·N/E tokens of the batch by softmax gate score, so every expert
    gets exactly m tokens and a token gets k experts on average (any number from 0 to E). Inference: a
    learned per-expert threshold T replaces the batch top-m (token x goes to expert i iff G_σ(x)_i > T_i).
    Gate weights are the softmax scores renormalised over each token's experts. Losses: "importance" and
    "threshold" (the paper's batchwise loss that trains T). Rows of `expert_index` are padded with -1 to
    the largest count.

    Under expert parallelism (`global_batch`, set by `MoELayer.shard`) the batch is the global one:
    N counts every rank's tokens and each expert takes the top m over all of them (exactly, through a
    gather of every rank's local top-m scores, see `collectives.global_top_m`).
    """

    def __init__(self, d_model: int, num_experts: int, k: int) -> None:
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.w_gate = _router_weight(d_model, num_experts, zero=False)
        self.threshold = nn.Parameter(torch.full((num_experts,), 1.0 / num_experts))
        self.global_batch = False  # True while the layer's experts are sharded over ranks

    def use_global_batch(self, on: bool) -> None:
        """Take each expert's top m over every rank's tokens (the layer turns this on while sharded)."""
        self.global_batch = on

    def batch_mask(self, probs: Tensor, valid: Tensor | None) -> Tensor:
        """[N, E] bool: each expert's top m = k·N/E real tokens in the batch (global batch if
        `global_batch`).

        Ties at the m-th score (identical tokens, e.g. every decoder's first step) go to the earlier tokens,
        ranks in rank order, so an expert takes exactly m tokens and a sharded run picks what one process
        picks on the concatenated batch.
        """
        scores = probs if valid is None else probs.masked_fill(~valid.unsqueeze(1), float("-inf"))
        tokens = _token_count(probs, valid)
        if self.global_batch:
            kth, needed, ties_before = global_top_m(scores, self.k, tokens)
        else:
            kth, needed = top_m_threshold(scores, self.k, tokens)
            ties_before = torch.zeros_like(needed)
        mask = top_m_mask(scores, kth, needed, ties_before)
        return mask if valid is None else mask & valid.unsqueeze(1)

    def forward(self, x: Tensor, bias: Tensor | None = None, valid: Tensor | None = None) -> Routing:
        probs = (x @ self.w_gate.float()).softmax(dim=-1)  # [N, E]
        threshold = self.threshold.float()
        batch_mask = self.batch_mask(probs, valid)
        mask = batch_mask if self.training else probs > threshold
        if valid is not None:
            mask = mask & valid.unsqueeze(1)
        kept = probs * mask
        weights = kept / kept.sum(dim=-1, keepdim=True).clamp_min(1e-9)  # [N, E]; rows with no expert stay 0
        order = mask.float().argsort(dim=1, descending=True, stable=True)[:, : _slot_width(mask)]
        expert_index = torch.where(mask.gather(1, order), order, -1)  # [N, width], selected experts first
        gate_weight = weights.gather(1, order)  # 0 in padded slots
        stats = {
            "importance": importance_of(expert_index, gate_weight, self.num_experts),
            "threshold_sum": batchwise_threshold_sum(probs, threshold, batch_mask, valid),
            "tokens": _token_count(x, valid),
        }
        return Routing(expert_index, gate_weight, stats, self.losses(stats))

    def losses(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        return {
            "importance": cv_squared(stats["importance"]),
            "threshold": stats["threshold_sum"] / stats["tokens"].clamp(min=1),
        }


def top_m_threshold(scores: Tensor, k: int, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """The m-th largest score of each expert [E], m = max(1, k·N/E) for the (device) token count N, and how
    many of the tokens tied at it to take [E]. A sort, not topk: topk would need m on the host."""
    num_rows, num_experts = scores.shape
    m = (k * tokens.long() // num_experts).clamp(min=1, max=num_rows)  # [] long
    ranked = scores.sort(dim=0, descending=True).values  # [N, E]
    kth = ranked.gather(0, (m - 1).expand(1, num_experts)).squeeze(0)  # [E]
    return kth, m - (scores > kth).sum(0)


def _slot_width(mask: Tensor) -> int:
    """Slots per token in the batchwise gate's [N, width] routing: on CPU the most experts any token got
    (read on the host), on a GPU all E, which needs no synchronisation but makes the dispatch sort N·E."""
    if mask.is_cuda:
        return mask.shape[1]
    return max(int(mask.sum(dim=1).max()) if mask.shape[0] else 0, 1)


class HierarchicalGate(nn.Module):
    """Shazeer et al. (2017) appendix B, the two-level MoE.

    A primary noisy top-k gate picks `k_group` of `num_groups` groups, and each group's own noisy top-k gate
    picks `k` of its E/num_groups experts; a token visits k_group·k experts with weight
    G_primary(x)_g · G_g(x)_j.

    Losses at both levels: "importance"/"load" on the hierarchical Importance_H and Load_H, where
    Load_H[g, j] = Load_primary[g] · Load_g(X^(g))_j / |X^(g)|, and "importance_primary"/"load_primary".
    All secondary gates are computed as one [d_model, E] matmul, the cost of a flat router.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        k: int,
        num_groups: int,
        k_group: int,
        noise: bool = True,
        noise_epsilon: float = 1e-2,
    ) -> None:
        super().__init__()
        self.num_experts, self.k, self.num_groups, self.k_group = num_experts, k, num_groups, k_group
        self.group_size = num_experts // num_groups
        self.primary = NoisyTopKGate(d_model, num_groups, k_group, noise=noise, noise_epsilon=noise_epsilon)
        self.secondary = NoisyTopKGate(d_model, num_experts, k, noise=noise, noise_epsilon=noise_epsilon)

    def forward(self, x: Tensor, bias: Tensor | None = None, valid: Tensor | None = None) -> Routing:
        n, groups, size = x.shape[0], self.num_groups, self.group_size
        primary = self.primary(x, valid=valid)
        group_index = primary.expert_index.clamp(min=0)  # [N, kg]; rows of padding are dropped at the end
        group_weight = primary.gate_weight  # [N, kg], 0 on padding
        in_group = torch.zeros(n, groups, dtype=torch.bool, device=x.device).scatter_(1, group_index, True)
        if valid is not None:
            in_group &= valid.unsqueeze(1)

        clean, noisy, noise_std = (
            t if t is None else t.view(n, groups, size) for t in self.secondary.scores(x)
        )
        selection = _with_bias(noisy, None if bias is None else bias.view(groups, size))  # [N, G, P]
        local_index = selection.topk(self.k, dim=-1).indices  # [N, G, k], for every group
        local_weight = noisy.gather(2, local_index).softmax(dim=-1)  # [N, G, k]

        chosen = group_index.unsqueeze(-1).expand(n, self.k_group, self.k)  # [N, kg, k]
        width = self.k_group * self.k  # explicit, not -1: N may be 0 on an expert-parallel rank
        expert_index = (chosen * size + local_index.gather(1, chosen)).reshape(n, width)  # [N, kg·k]
        gate_weight = (group_weight.unsqueeze(-1) * local_weight.gather(1, chosen)).reshape(n, width)
        expert_index, gate_weight = _drop_invalid(expert_index, gate_weight, valid)
        stats = {
            "importance": importance_of(expert_index, gate_weight, self.num_experts),
            "importance_primary": primary.stats["importance"],  # [G]
            "load_primary": primary.stats["load"],  # [G] smooth estimate (hard counts if no noise)
        }
        if noise_std is None:
            stats["load"] = expert_counts(expert_index, self.num_experts).float()  # [E] hard counts
        else:
            selected = torch.zeros_like(selection, dtype=torch.bool).scatter_(2, local_index, True)
            biased_clean = _with_bias(clean, None if bias is None else bias.view(groups, size))
            secondary_prob = prob_in_top_k(biased_clean, selection, noise_std, selected, self.k)  # [N, G, P]
            stats["secondary_load"] = (secondary_prob * in_group.unsqueeze(-1)).sum(0)  # [G, P] over X^(g)
            stats["group_tokens"] = in_group.sum(0).float()  # [G] = |X^(g)|
        return Routing(expert_index, gate_weight, stats, self.losses(stats))

    def losses(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Load_H[g, j] = Load_primary[g] · Load_g(X^(g))_j / |X^(g)|, from the (global) sums."""
        if "load" in stats:  # no noise: the hard counts
            load = stats["load"]
        else:
            group_tokens = stats["group_tokens"].clamp(min=1).unsqueeze(-1)  # [G, 1]
            load = stats["load_primary"].unsqueeze(-1) * stats["secondary_load"] / group_tokens  # [G, P]
        return {
            "importance": cv_squared(stats["importance"]),
            "load": cv_squared(load),
            "importance_primary": cv_squared(stats["importance_primary"]),
            "load_primary": cv_squared(stats["load_primary"]),
        }

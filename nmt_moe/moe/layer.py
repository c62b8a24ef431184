"""MoELayer: route tokens with a gate, run the chosen experts through the sorted dispatch, combine.

The layer has no residual connection of its own: the model adds one around it. Its forward and backward
never wait for the GPU to hand a value to the host (with the "grouped" expert backend, without expert
parallelism): padding is routed to no expert rather than picked out, and the dispatch keeps static shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from nmt_moe.moe.collectives import ExpertParallel, all_gather_cat, run_sharded_experts, sum_over_ranks
from nmt_moe.moe.config import GateName, MoEConfig, check_moe_arguments
from nmt_moe.moe.dispatch import apply_capacity, combine, expert_capacity, expert_counts, sort_assignments
from nmt_moe.moe.experts import ExpertBackend, Experts, FeedForward
from nmt_moe.moe.gates import (
    BatchwiseGate,
    HierarchicalGate,
    NoisyTopKGate,
    Routing,
    SigmoidGate,
    SoftmaxTopKGate,
)


@dataclass
class MoEOutput:
    """Everything one MoE call produced. The routing of every position of x is in the `*_by_position`
    fields; `expert_index` and `gate_weight` pick out the unmasked tokens, in order."""

    y: Tensor  # same shape as x; zeros at masked positions
    aux_loss: Tensor  # scalar, already weighted; 0 in eval mode
    expert_index_by_position: Tensor  # [M, k] long over x's M positions; -1 where masked (batchwise: and
    #                                   in the padding of a variable count)
    gate_weight_by_position: Tensor  # [M, k] fp32, 0 wherever expert_index_by_position is -1
    token_mask: Tensor | None  # [M] bool: the mask the layer was called with, flattened
    load: Tensor  # [E] long: assignments routed to each expert (before capacity)
    importance: Tensor  # [E] fp32: summed gate weights per expert
    losses: dict[str, Tensor] = field(default_factory=dict)  # unweighted components, for logging
    dropped: Tensor = field(
        default_factory=lambda: torch.zeros((), dtype=torch.long)
    )  # assignments over capacity

    @property
    def expert_index(self) -> Tensor:
        """[routed_tokens, k]: the unmasked tokens' experts (picking them out reads the mask on the host)."""
        return _unmasked(self.expert_index_by_position, self.token_mask)

    @property
    def gate_weight(self) -> Tensor:
        """[routed_tokens, k]: the unmasked tokens' gate weights."""
        return _unmasked(self.gate_weight_by_position, self.token_mask)


def _unmasked(per_position: Tensor, mask: Tensor | None) -> Tensor:
    return per_position if mask is None else per_position[mask]


class MoELayer(nn.Module):
    """Sparsely-gated Mixture-of-Experts FFN layer (Shazeer et al., 2017) with a choice of gates.

    Args:
        d_model: token width. d_hidden: each expert's hidden width. num_experts: routed experts E.
        k: experts per token (hierarchical: per chosen group, so a token visits k_group·k experts).
        gate: "noisy_topk" | "batchwise" | "softmax_topk" | "switch" (k must be 1) | "sigmoid" |
            "hierarchical".
        activation: expert FFN activation, "relu" or "swiglu". dropout: on the experts' hidden activations.
        ffn_bias: give experts (and shared experts) biases; off by default, as in the paper's experts.
        w_importance, w_load: weights of the importance / load CV² losses (noisy_topk, batchwise,
            hierarchical).
        w_balance, w_z: weights of the Switch balance loss and router z-loss (softmax_topk, switch, sigmoid).
        w_threshold: weight of the batchwise gate's threshold loss.
        noise, noise_epsilon: tunable gating noise of noisy_topk / hierarchical
            (std = softplus(xW_noise) + ε).
        capacity_factor: None = dropless; else each expert takes at most ceil(cf·N·k/E) assignments.
        loss_free_bias, bias_update_rate: DeepSeek-V3 balancing; call `update_bias()` after each
            optimizer step.
        num_shared_experts: always-on experts of width d_hidden added to every token's output.
        num_groups, k_group: hierarchical gate only: E experts in num_groups groups, k_group groups per token.
        expert_backend: "grouped" runs each GEMM of all experts as one grouped GEMM (no host
            synchronisation; fast on bf16 H100/H200/B200-class GPUs), "loop" one GEMM pair per expert (on
            CPU over worker threads), "auto" the grouped one where it has its fast path, else the loop.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: int = 2,
        gate: GateName = "noisy_topk",
        activation: Literal["relu", "swiglu"] = "relu",
        dropout: float = 0.0,
        ffn_bias: bool = False,
        w_importance: float = 0.01,
        w_load: float = 0.01,
        w_balance: float = 0.01,
        w_z: float = 0.0,
        w_threshold: float = 0.01,
        noise: bool = True,
        noise_epsilon: float = 1e-2,
        capacity_factor: float | None = None,
        loss_free_bias: bool = False,
        bias_update_rate: float = 1e-3,
        num_shared_experts: int = 0,
        num_groups: int = 1,
        k_group: int = 1,
        expert_backend: ExpertBackend = "auto",
    ) -> None:
        super().__init__()
        check_moe_arguments(locals())
        self.d_model, self.num_experts, self.k, self.gate_name = d_model, num_experts, k, gate
        self.capacity_factor, self.bias_update_rate = capacity_factor, bias_update_rate
        self.experts_per_token = k * k_group if gate == "hierarchical" else k
        self.loss_weights = {
            "importance": w_importance,
            "load": w_load,
            "importance_primary": w_importance,
            "load_primary": w_load,
            "balance": w_balance,
            "z": w_z,
            "threshold": w_threshold,
        }
        self.gate = _build_gate(gate, d_model, num_experts, k, noise, noise_epsilon, num_groups, k_group)
        self.normalize_expert_output = getattr(self.gate, "normalize_expert_output", False)
        self.experts = Experts(
            num_experts, d_model, d_hidden, activation, dropout, bias=ffn_bias, backend=expert_backend
        )
        self.shared = (
            FeedForward(d_model, num_shared_experts * d_hidden, activation, dropout, bias=ffn_bias)
            if num_shared_experts
            else None
        )
        self.loss_free_bias = loss_free_bias
        if loss_free_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts))  # saved: inference routes with it
            self.register_buffer("load_since_update", torch.zeros(num_experts), persistent=False)
        self.expert_parallel: ExpertParallel | None = None  # set by `shard`

    @classmethod
    def from_config(cls, d_model: int, config: MoEConfig) -> MoELayer:
        """The layer `config` describes, on tokens of width d_model."""
        return cls(d_model, **vars(config))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> MoEOutput:
        """x [..., d_model]; mask [...] bool, True = real token (padding is neither routed nor counted)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x: last dimension is {x.shape[-1]}, expected d_model={self.d_model}")
        if mask is not None and (mask.shape != x.shape[:-1] or mask.dtype != torch.bool):
            raise ValueError(
                f"mask: expected bool of shape {tuple(x.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}"
            )
        flat = x.reshape(-1, self.d_model)  # [M, d]
        valid = None if mask is None else mask.reshape(-1)  # [M]; padding is routed to no expert
        if flat.shape[0] == 0 and self.expert_parallel is None:  # expert parallel: join the collectives
            return self._empty_output(x)

        with torch.autocast(device_type=x.device.type, enabled=False):  # gating math in fp32
            bias = self.expert_bias if self.loss_free_bias else None
            routing = self.gate(flat.float(), bias, valid=valid)
        load = expert_counts(routing.expert_index, self.num_experts)  # [E]
        if self.expert_parallel is not None:  # statistics and balancing losses of the global batch
            routing, load = _global_routing(routing, load, self.gate.losses)
        if self.loss_free_bias and self.training:
            self.load_since_update += load
        routed, dropped = self._run_experts(flat, routing, valid)  # [M, d] fp32, zeros at padding
        if self.shared is not None:
            shared = self.shared(flat)
            routed = routed + (shared if valid is None else torch.where(valid.unsqueeze(1), shared, 0))
        y = routed.to(x.dtype)  # under autocast the experts ran in the autocast dtype

        if self.training:
            aux_loss = torch.stack(
                [self.loss_weights[name] * value for name, value in routing.losses.items()]
            ).sum()
        else:
            aux_loss = torch.zeros((), device=x.device)
        losses = {name: value.detach() for name, value in routing.losses.items()}
        return MoEOutput(
            y=y.reshape(x.shape),
            aux_loss=aux_loss,
            expert_index_by_position=routing.expert_index,
            gate_weight_by_position=routing.gate_weight,
            token_mask=valid,
            load=load,
            importance=routing.importance.detach(),
            losses=losses,
            dropped=dropped,
        )

    def _empty_output(self, x: Tensor) -> MoEOutput:
        """x has no positions: nothing is routed; y = x · 0 keeps the output in x's autograd graph."""
        zero = torch.zeros((), device=x.device)
        return MoEOutput(
            y=x * 0,
            aux_loss=zero,
            expert_index_by_position=torch.zeros(
                0, self.experts_per_token, dtype=torch.long, device=x.device
            ),
            gate_weight_by_position=torch.zeros(0, self.experts_per_token, device=x.device),
            token_mask=None,
            load=torch.zeros(self.num_experts, dtype=torch.long, device=x.device),
            importance=torch.zeros(self.num_experts, device=x.device),
            dropped=torch.zeros((), dtype=torch.long, device=x.device),
        )

    def _run_experts(self, tokens: Tensor, routing: Routing, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """Sorted dispatch: sort, (capacity), gather, experts, scatter-add. tokens [M, d], valid [M] ->
        [M, d] fp32 and the dropped count."""
        num_tokens = tokens.shape[0]
        plan = sort_assignments(routing.expert_index, routing.gate_weight, self.num_experts)
        dropped = torch.zeros((), dtype=torch.long, device=tokens.device)
        if self.capacity_factor is not None:
            real = num_tokens if valid is None else valid.sum()
            capacity = expert_capacity(self.capacity_factor, real, self.experts_per_token, self.num_experts)
            plan, dropped = apply_capacity(plan, capacity.to(tokens.device))
        x_sorted = tokens.index_select(0, plan.token)  # [A, d]
        if self.expert_parallel is None:
            out_sorted = self.experts(x_sorted, plan.counts)  # [A, d]
        else:  # the experts live on several ranks: all-to-all there and back
            out_sorted = run_sharded_experts(self.experts, x_sorted, plan.counts, self.expert_parallel)
        if self.normalize_expert_output:  # sigmoid gate: unit-RMS expert outputs, the gate sets the magnitude
            out_sorted = out_sorted * torch.rsqrt(out_sorted.pow(2).mean(-1, keepdim=True) + 1e-6)
        return combine(out_sorted, plan, num_tokens), dropped

    def shard(self, ep: ExpertParallel, name: str = "MoELayer") -> None:
        """Keep only this rank's share of the experts and exchange rows with the other ranks of `ep` from
        now on (see parallel.py for the layout). All ranks must hold the same full weights before."""
        if self.expert_parallel is not None:
            return  # already sharded
        if self.capacity_factor is not None:
            raise ValueError(f"{name}: expert parallelism needs dropless routing (capacity_factor=None)")
        if self.num_experts % ep.size:
            raise ValueError(
                f"{name}: num_experts={self.num_experts} is not divisible by expert_parallel_size={ep.size}"
            )
        self.experts.keep_shard(ep.shard(self.num_experts))
        self.expert_parallel = ep
        if isinstance(self.gate, BatchwiseGate):  # its top-m per expert is taken over all ranks' tokens
            self.gate.use_global_batch(True)

    def unshard(self) -> None:
        """Gather the full expert bank from the ranks of the expert-parallel group and run locally again
        (collective); `shard` afterwards restores the identical shard."""
        ep = self.expert_parallel
        if ep is None:
            return
        self.experts.restore_full(lambda shard: all_gather_cat(shard, ep.group, ep.size))
        self.expert_parallel = None
        if isinstance(self.gate, BatchwiseGate):
            self.gate.use_global_batch(False)

    @torch.no_grad()
    def update_bias(self, load: Tensor | None = None) -> None:
        """Loss-free balancing: raise the bias of underloaded experts and lower it for overloaded ones by
        `bias_update_rate`, from the load seen since the last call (no change when none was seen, or when
        loss_free_bias is off; decided on the device, without a synchronisation). `load` [E] replaces that
        count, e.g. with its sum over data-parallel ranks."""
        if not self.loss_free_bias:
            return
        load = self.load_since_update if load is None else load
        seen = (load.sum() > 0).to(load.dtype)
        self.expert_bias += seen * self.bias_update_rate * torch.sign(load.mean() - load)
        self.load_since_update.zero_()


def moe_layers(module: nn.Module) -> Iterator[tuple[str, MoELayer]]:
    """(qualified name, layer) for every MoELayer in `module`, itself included (name "")."""
    for name, child in module.named_modules():
        if isinstance(child, MoELayer):
            yield name, child


def _global_routing(
    routing: Routing, load: Tensor, losses_of: Callable[[dict[str, Tensor]], dict[str, Tensor]]
) -> tuple[Routing, Tensor]:
    """The routing's statistics, balancing losses and hard load counts over the global batch (all ranks).

    Every sum in `routing.stats` and the [E] counts `load` travel in one all-reduce with autograd, so every
    rank holds the global sums and the losses `losses_of(stats)` (the gate's `losses`) computed from them;
    their gradients reach each rank's gate through its own tokens. The counts travel as fp32, exact up to
    2^24 assignments per expert per call. Collective: every rank calls it once per MoE call.
    """
    names = list(routing.stats)
    parts = [routing.stats[name].reshape(-1).float() for name in names] + [load.float()]
    summed = sum_over_ranks(torch.cat(parts)).split([part.numel() for part in parts])
    stats = {
        name: value.view(routing.stats[name].shape) for name, value in zip(names, summed[:-1], strict=True)
    }
    global_load = summed[-1].detach().round().to(load.dtype)  # [E]
    return Routing(routing.expert_index, routing.gate_weight, stats, losses_of(stats)), global_load


def _build_gate(
    gate: str, d_model: int, num_experts: int, k: int, noise: bool, eps: float, num_groups: int, k_group: int
) -> nn.Module:
    if gate == "noisy_topk":
        return NoisyTopKGate(d_model, num_experts, k, noise=noise, noise_epsilon=eps)
    if gate == "batchwise":
        return BatchwiseGate(d_model, num_experts, k)
    if gate in ("softmax_topk", "switch"):
        return SoftmaxTopKGate(d_model, num_experts, k, renormalize=gate == "softmax_topk")
    if gate == "sigmoid":
        return SigmoidGate(d_model, num_experts, k)
    return HierarchicalGate(d_model, num_experts, k, num_groups, k_group, noise=noise, noise_epsilon=eps)

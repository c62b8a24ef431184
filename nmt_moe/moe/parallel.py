"""Expert parallelism over a whole model: each rank holds a shard of every MoE layer's experts.

The layout (Shazeer et al., 2017, section 3.1: data parallel for everything but the experts, model parallel
for the experts). With W ranks and expert-parallel size P (W divisible by P):

    expert-parallel groups   consecutive blocks of P ranks {0..P-1}, {P..2P-1}, ...; rank i of a block
                             holds experts [i·E/P, (i+1)·E/P) of every MoE layer
    replica groups           the W/P ranks that hold the same shard (data-parallel copies of one shard)

Each layer shards itself (`MoELayer.shard` / `unshard`) and exchanges rows with the all-to-all of
`collectives.py`; this module applies that to every layer of a model and handles what spans the model:
which parameters are sharded, and checkpoints.

Gradients. DDP averages replicated parameters over the W ranks, i.e. it differentiates mean_r L_r. A
local expert's gradient after backward is Σ over the ranks of its group of ∂L_r/∂W (their rows came to it),
so `collectives.finish_expert_grads` sums it over the replica group and divides by W: the same mean.
Gradient clipping uses the true global norm (`collectives.clip_grad_norm_`).

Global batch statistics. Every gate reports its balancing statistics as sums over its tokens
(`Routing.stats`); the layer all-reduces them over the whole world (differentiably, in one collective) and
recomputes the losses from the sums, so every gate's losses and hard load counts are those of the global
batch (and the loss-free bias, updated from the global load, stays identical on every rank). The batchwise
gate's top-m per expert is global too (`collectives.global_top_m`).

Checkpoints hold full [E, ...] expert tensors (`gather_expert_state`), so they do not depend on the layout;
`shard_expert_state` slices them for this rank on load: re-sharding to any P, including one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from nmt_moe.moe.collectives import ExpertParallel, all_gather_cat
from nmt_moe.moe.layer import MoELayer, moe_layers

__all__ = [
    "expert_parameter_names",
    "gather_expert_state",
    "gather_optimizer_state",
    "moe_layers",
    "shard_expert_state",
    "shard_experts",
    "shard_optimizer_state",
    "sharded_parameters",
    "unshard_experts",
]


def expert_parameter_names(module: nn.Module) -> list[str]:
    """Names (as in `module.named_parameters()`) of every MoE layer's expert weights: the sharded ones."""
    return [
        f"{name}.experts.{param}" if name else f"experts.{param}"
        for name, layer in moe_layers(module)
        for param, _ in layer.experts.named_parameters()
    ]


def shard_experts(module: nn.Module, ep: ExpertParallel) -> None:
    """Shard every MoE layer of `module` over `ep` (see `MoELayer.shard`)."""
    for name, layer in moe_layers(module):
        layer.shard(ep, name or "MoELayer")


def unshard_experts(module: nn.Module) -> None:
    """Gather every MoE layer's full expert bank onto this rank and run locally again (collective).

    Used around evaluation, where ranks decode different numbers of steps and could not meet in all_to_all.
    `shard_experts` afterwards restores the identical shard.
    """
    for _, layer in moe_layers(module):
        layer.unshard()


def sharded_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The expert weights of the MoE layers that are currently sharded."""
    return [
        p
        for _, layer in moe_layers(module)
        if layer.expert_parallel is not None
        for p in layer.experts.parameters()
    ]


# --- checkpoints --------------------------------------------------------------------------------------------


def gather_expert_state(state_dict: dict[str, Tensor], module: nn.Module, prefix: str = "") -> None:
    """Replace this rank's expert shards in `state_dict` (keys `prefix` + parameter name) by the full
    [E, ...] tensors gathered from the expert-parallel group (collective: every rank calls it)."""
    for name, layer in moe_layers(module):
        ep = layer.expert_parallel
        if ep is None:
            continue
        for param, _ in layer.experts.named_parameters():
            key = f"{prefix}{name}.experts.{param}"
            state_dict[key] = all_gather_cat(state_dict[key], ep.group, ep.size)


def shard_expert_state(state_dict: dict[str, Tensor], module: nn.Module, prefix: str = "") -> None:
    """Slice the full [E, ...] expert tensors in `state_dict` to the shards `module` holds (in place).

    A checkpoint written with any layout loads into any other, including one process (nothing to do).
    """
    for name, layer in moe_layers(module):
        ep = layer.expert_parallel
        if ep is None:
            continue
        for param, _ in layer.experts.named_parameters():
            key = f"{prefix}{name}.experts.{param}"
            if key in state_dict and state_dict[key].shape[0] == layer.num_experts:
                state_dict[key] = state_dict[key][ep.shard(layer.num_experts)].clone()


def _optimizer_shard_states(
    optimizer_state: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module
) -> Iterator[tuple[dict[str, Any], MoELayer]]:
    """(state entry of `optimizer_state`, its layer) for every sharded expert parameter."""
    owner = {
        id(p): layer
        for _, layer in moe_layers(module)
        if layer.expert_parallel
        for p in layer.experts.parameters()
    }
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in owner and index in optimizer_state["state"]:
                # state_dict() shares each entry with the live optimizer.state: copy it, or a checkpoint's
                # gathered [E, ...] moments would replace the live shard's and break the next step
                entry = optimizer_state["state"][index] = dict(optimizer_state["state"][index])
                yield entry, owner[id(p)]
            index += 1


def gather_optimizer_state(
    optimizer_state: dict[str, Any], optimizer: torch.optim.Optimizer, module: nn.Module
) -> None:
    """Full [E, ...] tensors for the per-expert optimizer state (Adam moments, Adafactor factors) of the
    expert shards in `optimizer_state` (an `optimizer.state_dict()`); collective."""
    for entry, layer in _optimizer_shard_states(optimizer_state, optimizer, module):
        ep = layer.expert_parallel
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == layer.experts.num_experts:
                entry[key] = all_gather_cat(value, ep.group, ep.size)


def shard_optimizer_state(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """Slice full [E, ...] per-expert optimizer state (as a checkpoint holds it, after
    `optimizer.load_state_dict`) to this rank's shards, in the live optimizer."""
    for _, layer in moe_layers(module):
        if layer.expert_parallel is None:
            continue
        shard = layer.expert_parallel.shard(layer.num_experts)
        for p in layer.experts.parameters():
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, Tensor) and value.dim() and value.shape[0] == layer.num_experts:
                    state[key] = value[shard].clone()

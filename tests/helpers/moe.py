"""Builders and references the MoE tests share."""

from __future__ import annotations

import torch
from torch import Tensor

from nmt_moe.moe import MoELayer
from nmt_moe.moe.experts import Experts, _activate


def random_router_layer(
    d_model: int, d_hidden: int, num_experts: int, config: dict, seed: int = 0
) -> MoELayer:
    """A layer whose routers are random (not the paper's zero init) so routing differs between tokens."""
    torch.manual_seed(seed)
    layer = MoELayer(d_model, d_hidden, num_experts, **config)
    with torch.no_grad():
        for name, param in layer.gate.named_parameters():
            if name.endswith(("w_gate", "w_noise")):
                param.normal_(std=0.5)
        if layer.loss_free_bias:
            layer.expert_bias.normal_(std=0.3)
    return layer


def expert_forward(experts: Experts, x: Tensor, expert: int) -> Tensor:
    """One expert on x [..., d] with plain autograd ops (no dropout): the slow reference for tests."""
    pre = x @ experts.w_in[expert]
    if experts.b_in is not None:
        pre = pre + experts.b_in[expert]
    out = _activate(pre, experts.activation) @ experts.w_out[expert]
    return out if experts.b_out is None else out + experts.b_out[expert]

"""Builders the MoE tests share."""

from __future__ import annotations

import torch

from nmt_moe.moe import MoELayer


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

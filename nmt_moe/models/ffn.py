"""The layers that sit between LSTM layers: a sparse MoE layer, its dense twin, and how both are applied.

Both are applied "convolutionally": to every real position of a layer's output at once, with a residual
connection and dropout. Padding is passed as a mask, so it is never routed to an expert (MoE) and its
positions are left unchanged (dense).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

FFN_TYPES = ("moe", "dense", "none")


def build_ffn(
    ffn: str, d_model: int, *, num_experts: int, k: int, gate: str, d_hidden: int, options: dict[str, Any]
) -> nn.Module:
    """A MoELayer, or the dense FeedForward of the same active size (hidden k * d_hidden)."""
    from nmt_moe.moe import FeedForward, MoELayer  # the moe package is the layer below models

    if ffn == "moe":
        return MoELayer(
            d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, k=k, gate=gate, **options
        )
    if ffn == "dense":
        return FeedForward(d_model, k * d_hidden)
    raise ValueError(f"ffn must be 'moe' or 'dense' to build a layer, got {ffn!r}")


def apply_ffn(layer: nn.Module, x: Tensor, mask: Tensor, dropout: nn.Module) -> tuple[Tensor, Any]:
    """x [B, T, D], mask [B, T] (True = real) -> (x + dropout(layer(x)) [B, T, D], MoEOutput or None)."""
    from nmt_moe.moe import MoELayer

    if isinstance(layer, MoELayer):
        out = layer(x, mask=mask)  # routes only the real tokens; out.y is zero at padding
        return x + dropout(out.y), out
    y = layer(x) * mask.unsqueeze(-1).to(x.dtype)  # [B, T, D]; padding left unchanged
    return x + dropout(y), None

"""The layers that sit between LSTM layers: a sparse MoE layer, its dense twin, and how both are applied.

Both are applied "convolutionally": to every real position of a layer's output at once, with a residual
connection and dropout. Padding is passed as a mask, so it is never routed to an expert (MoE) and its
positions are left unchanged (dense).
"""

from __future__ import annotations

from torch import Tensor, nn

from nmt_moe.moe import FeedForward, MoEConfig, MoELayer, MoEOutput

FFN_TYPES = ("moe", "dense", "none")


def build_ffn(ffn: str, d_model: int, moe: MoEConfig) -> nn.Module:
    """A MoELayer, or the dense FeedForward of the same active size: hidden = d_hidden times the experts a
    token visits (k; k * k_group for the hierarchical gate; plus any shared experts)."""
    if ffn == "moe":
        return MoELayer.from_config(d_model, moe)
    if ffn == "dense":
        per_token = moe.experts_per_token + moe.num_shared_experts
        return FeedForward(
            d_model,
            per_token * moe.d_hidden,
            activation=moe.activation,
            bias=moe.ffn_bias,  # match the experts, which are bias-free by default
        )
    raise ValueError(f"ffn must be 'moe' or 'dense' to build a layer, got {ffn!r}")


def apply_ffns_after(
    layer_number: int,
    positions: list[int],
    ffns: nn.ModuleList,
    x: Tensor,
    mask: Tensor,
    dropout: nn.Module,
    outputs: dict[str, MoEOutput],
    prefix: str,
) -> Tensor:
    """Applies the FFN layers placed after LSTM layer `layer_number` (ffns[i] sits after positions[i]) to
    x [B, T, D] with mask [B, T]; records each MoE output as outputs[f"{prefix}.moe{i}"]."""
    for i, position in enumerate(positions):
        if position == layer_number:
            x, out = apply_ffn(ffns[i], x, mask, dropout)
            if out is not None:
                outputs[f"{prefix}.moe{i}"] = out
    return x


def apply_ffn(
    layer: nn.Module, x: Tensor, mask: Tensor, dropout: nn.Module
) -> tuple[Tensor, MoEOutput | None]:
    """x [B, T, D], mask [B, T] (True = real) -> (x + dropout(layer(x)) [B, T, D], MoEOutput or None)."""
    if isinstance(layer, MoELayer):
        out = layer(x, mask=mask)  # routes only the real tokens; out.y is zero at padding
        return x + dropout(out.y), out
    y = layer(x) * mask.unsqueeze(-1).to(x.dtype)  # [B, T, D]; padding left unchanged
    return x + dropout(y), None

"""Sparsely-gated Mixture-of-Experts layers (Shazeer et al., 2017), usable on their own."""

from nmt_moe.moe.config import MoEConfig
from nmt_moe.moe.experts import Experts, FeedForward
from nmt_moe.moe.gates import GATES, Routing
from nmt_moe.moe.layer import MoELayer, MoEOutput, moe_layers

__all__ = ["GATES", "Experts", "FeedForward", "MoEConfig", "MoELayer", "MoEOutput", "Routing", "moe_layers"]

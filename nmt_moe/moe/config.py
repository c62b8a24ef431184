"""`MoEConfig`: every knob of an MoE layer as one typed record, so a YAML recipe (and `--print_config`)
lists them all with their defaults, and `MoELayer.from_config(d_model, config)` builds the layer.

The fields are MoELayer's `__init__` arguments less `d_model` (which the surrounding model supplies), in
the same order and with the same defaults, except that `num_experts` and `d_hidden` have defaults here
(the model's defaults: 8 experts of hidden width 512). A test keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from nmt_moe.moe.experts import ACTIVATIONS, EXPERT_BACKENDS, ExpertBackend
from nmt_moe.moe.gates import GATES

GateName = Literal["noisy_topk", "batchwise", "softmax_topk", "switch", "sigmoid", "hierarchical"]


@dataclass
class MoEConfig:
    """The settings of one MoE layer (see MoELayer for what each does).

    d_hidden: each expert's hidden width. num_experts: routed experts E. k: experts per token
        (hierarchical: per chosen group).
    gate: "noisy_topk" | "batchwise" | "softmax_topk" | "switch" | "sigmoid" | "hierarchical" (a plain
        string, so a wrong name is reported in one line naming the choices, not by the argument parser).
    activation: "relu" | "swiglu". dropout: on the experts' hidden activations. ffn_bias: experts with biases.
    w_importance, w_load, w_balance, w_z, w_threshold: auxiliary loss weights.
    noise, noise_epsilon: gating noise of noisy_topk / hierarchical.
    capacity_factor: None = dropless. loss_free_bias, bias_update_rate: DeepSeek-V3 balancing.
    num_shared_experts: always-on experts. num_groups, k_group: the hierarchical gate's groups.
    expert_backend: "auto" | "grouped" | "loop".
    """

    d_hidden: int = 512
    num_experts: int = 8
    k: int = 2
    gate: str = "noisy_topk"
    activation: Literal["relu", "swiglu"] = "relu"
    dropout: float = 0.0
    ffn_bias: bool = False
    w_importance: float = 0.01
    w_load: float = 0.01
    w_balance: float = 0.01
    w_z: float = 0.0
    w_threshold: float = 0.01
    noise: bool = True
    noise_epsilon: float = 1e-2
    capacity_factor: float | None = None
    loss_free_bias: bool = False
    bias_update_rate: float = 1e-3
    num_shared_experts: int = 0
    num_groups: int = 1
    k_group: int = 1
    expert_backend: ExpertBackend = "auto"

    @property
    def experts_per_token(self) -> int:
        """Routed experts a token visits: k, or k per chosen group with the hierarchical gate."""
        return self.k * self.k_group if self.gate == "hierarchical" else self.k

    def check(self, d_model: int) -> None:
        """Raise ValueError naming the first bad setting as MoELayer(d_model, ...) would, building nothing."""
        check_moe_arguments({"d_model": d_model, **vars(self)})


def check_moe_arguments(args: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first bad argument of MoELayer (`args`: its keyword arguments)."""

    def bad(name: str, why: str) -> None:
        raise ValueError(f"{name}: {why}, got {args[name]!r}")

    for name in ("d_model", "d_hidden", "num_experts", "k", "num_groups", "k_group"):
        if not isinstance(args[name], int) or args[name] < 1:
            bad(name, "must be a positive integer")
    gate, k, num_experts = args["gate"], args["k"], args["num_experts"]
    if gate not in GATES:
        bad("gate", f"must be one of {GATES}")
    if args["activation"] not in ACTIVATIONS:
        bad("activation", f"must be one of {ACTIVATIONS}")
    if args["expert_backend"] not in EXPERT_BACKENDS:
        bad("expert_backend", f"must be one of {EXPERT_BACKENDS}")
    if gate == "hierarchical":
        if num_experts % args["num_groups"]:
            bad("num_groups", f"must divide num_experts={num_experts}")
        if args["k_group"] > args["num_groups"]:
            bad("k_group", f"must be <= num_groups={args['num_groups']}")
        if k > num_experts // args["num_groups"]:
            bad("k", f"must be <= experts per group ({num_experts // args['num_groups']})")
    else:
        if k > num_experts:
            bad("k", f"must be <= num_experts={num_experts}")
        if args["num_groups"] != 1 or args["k_group"] != 1:
            bad("num_groups" if args["num_groups"] != 1 else "k_group", "only applies to gate='hierarchical'")
    if gate == "switch" and k != 1:
        bad("k", "must be 1 for gate='switch' (use softmax_topk for k > 1)")
    if gate == "batchwise" and args["loss_free_bias"]:
        bad("loss_free_bias", "has no effect with gate='batchwise' (each expert already takes its top m)")
    if not 0.0 <= args["dropout"] < 1.0:
        bad("dropout", "must be in [0, 1)")
    for name in ("w_importance", "w_load", "w_balance", "w_z", "w_threshold"):
        if args[name] < 0:
            bad(name, "must be >= 0")
    if args["noise_epsilon"] <= 0:
        bad("noise_epsilon", "must be > 0")
    if args["capacity_factor"] is not None and args["capacity_factor"] <= 0:
        bad("capacity_factor", "must be > 0 or None (dropless)")
    if args["bias_update_rate"] <= 0:
        bad("bias_update_rate", "must be > 0")
    if args["num_shared_experts"] < 0:
        bad("num_shared_experts", "must be >= 0")

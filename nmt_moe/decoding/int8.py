"""`nmt-moe translate --int8`: dynamic int8 quantisation of a loaded model for CPU decoding.

Weights of every LSTM, LSTMCell and Linear layer (torch.ao dynamic quantisation) and of every MoE expert
(`Int8Experts`, swapped in for `Experts` at load time) are stored as int8 with one scale per output
channel; activations are quantised per call from their observed range, so no calibration data is needed.
What stays float32: embeddings, the MoE routers (raw parameters, not Linear layers: routing decisions
are what a sparse model is most sensitive to), the attention softmax, log-softmax and all search scores.

Why dynamic int8 rather than bf16 here: bfloat16 is emulated (slower than float32) on CPUs without
avx512_bf16/AMX, while int8 GEMMs (fbgemm / oneDNN) run on any AVX2 CPU. On CPUs without VNNI the int8
kernels multiply in 16-bit lanes that saturate, so activations use a 7-bit range (`reduce_range`), as
torch.ao's own dynamic modules do on x86.

The module is separate from nmt_moe.moe on purpose: it reads `Experts`' public stacked weights
(`w_in` [E, d, h_in], `w_out` [E, h, d], optional `b_in` / `b_out`) and never changes the MoE code.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

from nmt_moe.moe import Experts


def _quantize_rows(weight: Tensor) -> Tensor:
    """weight [out, in] float -> qint8 with a symmetric scale per output row (zero point 0)."""
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()  # [out]
    zero = torch.zeros(weight.size(0), dtype=torch.long)
    return torch.quantize_per_channel(weight.contiguous(), scale, zero, 0, torch.qint8)


def _pack(weight: Tensor, bias: Tensor | None) -> Tensor:
    """A packed int8 GEMM operand for y = x @ weight.T + bias (weight [out, in])."""
    return torch.ops.quantized.linear_prepack(_quantize_rows(weight), bias)


class Int8Experts(nn.Module):
    """Drop-in for `Experts` in eval mode: each expert's two GEMMs in int8 (dynamic activations)."""

    def __init__(self, experts: Experts) -> None:
        super().__init__()
        self.num_experts, self.activation = experts.num_experts, experts.activation
        w_in, w_out = experts.w_in.detach().float(), experts.w_out.detach().float()  # [E,d,h_in], [E,h,d]
        b_in = getattr(experts, "b_in", None)
        b_out = getattr(experts, "b_out", None)
        with warnings.catch_warnings():  # torch >= 2.10 flags quantised tensors as deprecated; they work
            warnings.simplefilter("ignore", UserWarning)
            self._packed_in = [
                _pack(w_in[e].t(), None if b_in is None else b_in[e].detach().float())
                for e in range(self.num_experts)
            ]
            self._packed_out = [
                _pack(w_out[e].t(), None if b_out is None else b_out[e].detach().float())
                for e in range(self.num_experts)
            ]

    def forward(self, x_sorted: Tensor, counts: Tensor | Sequence[int]) -> Tensor:
        """x_sorted [A, d] sorted by expert; counts [E] slice lengths (a tensor or a list, sum <= A) -> [A, d]
        float32. Rows past the last slice (assignments that reach no expert) come out as zeros, as from
        `Experts`."""
        counts = counts.tolist() if isinstance(counts, Tensor) else list(counts)
        if len(counts) != self.num_experts or sum(counts) > x_sorted.shape[0]:
            raise ValueError(f"counts must have {self.num_experts} entries summing to <= {x_sorted.shape[0]}")
        x = x_sorted.float().contiguous()
        out = torch.empty_like(x)
        out[sum(counts) :] = 0
        start = 0
        for e, count in enumerate(counts):
            if count:
                rows = slice(start, start + count)
                pre = torch.ops.quantized.linear_dynamic(x[rows], self._packed_in[e], True)  # [n_e, h_in]
                out[rows] = torch.ops.quantized.linear_dynamic(
                    _activate(pre, self.activation), self._packed_out[e], True
                )
            start += count
        return out


def _activate(pre: Tensor, activation: str) -> Tensor:
    """relu(pre), or for swiglu silu(gate) * up with pre = [gate | up] (as the float experts)."""
    if activation == "relu":
        return F.relu(pre)
    gate, up = pre.chunk(2, dim=-1)
    return F.silu(gate) * up


def swap_experts(model: nn.Module) -> int:
    """Replaces every `Experts` submodule by an `Int8Experts` in place; returns how many were swapped."""
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, Experts)]
    for name, module in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, Int8Experts(module))
    return len(targets)


def quantize_int8(model: nn.Module) -> nn.Module:
    """The model (changed in place, put in eval mode) with int8 LSTM, LSTMCell, Linear and expert weights.

    For CPU inference only: the quantised modules have no backward and run on the CPU.
    """
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("int8 decoding runs on the CPU: load the model with --device cpu")
    model.eval()
    swap_experts(model)
    spec = {nn.Linear: per_channel_dynamic_qconfig, nn.LSTM: default_dynamic_qconfig,
            nn.LSTMCell: default_dynamic_qconfig}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model

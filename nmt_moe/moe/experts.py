"""Expert FFNs with stacked weights, and the dense FFN they are compared against.

`Experts` keeps all experts' weights in single tensors ([E, d_model, d_hidden], ...) and runs each expert on
its contiguous slice of the expert-sorted tokens, with one of two backends:

- "grouped": each GEMM of all experts is one `torch.nn.functional.grouped_mm` over the sorted rows, with the
  slice ends as device-side int32 offsets: a few kernels per layer whatever E is, and no host
  synchronisation. Its fast path needs bf16 on a GPU of compute capability 9.0 or 10.0 (H100, H200,
  B200); it also runs on CPU (at about the loop's speed there), which is how the tests check its math.
- "loop": one autograd node (`_SortedExpertFFN`) that loops over experts with plain GEMMs writing straight
  into preallocated outputs and gradient buffers, on CPU spread over single-threaded workers. It reads the
  counts on the host. Doing the same with autograd ops would index the stacked weights per expert inside the
  graph (backward cost O(E²)), or unbind them and pay a stack of E gradient copies plus cat/split copies.

"auto" (the default) picks "grouped" where its fast path exists and "loop" elsewhere.
Rows past the last slice (assignments that reach no expert, see dispatch.py) come out as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt_moe.moe.cpu_threads import for_each_expert
from nmt_moe.moe.dispatch import group_offsets

ACTIVATIONS = ("relu", "swiglu")
EXPERT_BACKENDS = ("auto", "grouped", "loop")
ExpertBackend = Literal["auto", "grouped", "loop"]


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activate(pre: Tensor, activation: str) -> Tensor:
    """relu(pre), or for swiglu silu(gate) · up with pre = [gate | up]."""
    if activation == "relu":
        return F.relu(pre)
    gate, up = pre.chunk(2, dim=-1)
    return F.silu(gate) * up


def _activation_backward(grad: Tensor, pre: Tensor, activation: str) -> Tensor:
    """d loss / d pre, given d loss / d activation."""
    if activation == "relu":  # `pre` may be relu's output (the same sign pattern); `grad` is overwritten
        return torch.ops.aten.threshold_backward.grad_input(grad, pre, 0, grad_input=grad)
    gate, up = pre.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_gate = grad * up * sig * (1 + gate * (1 - sig))
    return torch.cat([grad_gate, grad * silu], dim=-1)


def _slices(counts: list[int]) -> list[tuple[int, slice]]:
    """(expert, rows) for each expert with at least one assignment."""
    out, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            out.append((expert, slice(start, start + count)))
        start += count
    return out


class _SortedExpertFFN(torch.autograd.Function):
    """out[rows_e] = act(x[rows_e] W_in[e] + b_in[e]) W_out[e] + b_out[e] per expert e (biases optional).

    Each expert's rows go through both GEMMs (and, in backward, all four) before the next expert's, while
    its activations are still in cache: 3-7% faster than one pass of all experts per GEMM at 8-32 experts.
    On CPU, with many experts, they are shared out over single-threaded workers (`cpu_threads`).
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out, b_out, counts, activation, dropout_mask):  # type: ignore[override]
        parts = _slices(counts)
        pre = x.new_empty(x.shape[0], w_in.shape[-1])  # [A, h_in]; relu: overwritten by relu(pre)
        out = x.new_empty(x.shape[0], w_out.shape[-1])  # [A, d]

        def expert_forward(e: int, rows: slice) -> None:
            pre_e = _linear(x[rows], w_in[e], None if b_in is None else b_in[e], out=pre[rows])
            hidden_e = pre_e.relu_() if activation == "relu" else _activate(pre_e, activation)  # [n_e, h]
            if dropout_mask is not None:
                hidden_e = hidden_e * dropout_mask[rows]
            _linear(hidden_e, w_out[e], None if b_out is None else b_out[e], out=out[rows])

        for_each_expert(parts, expert_forward, x.device)
        out[sum(counts) :] = 0  # rows that reach no expert
        ctx.save_for_backward(x, pre, w_in, w_out, dropout_mask)
        ctx.parts, ctx.activation, ctx.has_bias = parts, activation, b_in is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, pre, w_in, w_out, dropout_mask = ctx.saved_tensors
        parts, activation = ctx.parts, ctx.activation
        grad_out = grad_out.contiguous()
        grad_w_in, grad_w_out = _grad_buffer(w_in, parts), _grad_buffer(w_out, parts)
        grad_b_in = _grad_buffer(w_in[:, 0], parts) if ctx.has_bias else None  # [E, h_in]
        grad_b_out = _grad_buffer(w_out[:, 0], parts) if ctx.has_bias else None  # [E, d]
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None

        def expert_backward(e: int, rows: slice) -> None:
            pre_e, g = pre[rows], grad_out[rows]
            hidden_e = pre_e if activation == "relu" else _activate(pre_e, activation)  # swiglu: recomputed
            if dropout_mask is not None:
                hidden_e = hidden_e * dropout_mask[rows]
            torch.mm(hidden_e.t(), g, out=grad_w_out[e])
            if grad_b_out is not None:
                torch.sum(g, 0, out=grad_b_out[e])
            grad_hidden = torch.mm(g, w_out[e].t())  # [n_e, h]
            if dropout_mask is not None:
                grad_hidden.mul_(dropout_mask[rows])
            grad_pre = _activation_backward(grad_hidden, pre_e, activation)  # [n_e, h_in]
            torch.mm(x[rows].t(), grad_pre, out=grad_w_in[e])
            if grad_b_in is not None:
                torch.sum(grad_pre, 0, out=grad_b_in[e])
            if grad_x is not None:
                torch.mm(grad_pre, w_in[e].t(), out=grad_x[rows])

        for_each_expert(parts, expert_backward, x.device)
        if grad_x is not None:
            grad_x[parts[-1][1].stop if parts else 0 :] = 0
        return grad_x, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def grouped_expert_ffn(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    offsets: Tensor,
    activation: str,
    dropout_mask: Tensor | None,
) -> Tensor:
    """The loop's math as two grouped GEMMs over x [A, d] (rows sorted by expert, `offsets` [E] int32 slice
    ends) -> [A, d], with plain autograd ops; nothing here reads a device value on the host.

    grouped_mm leaves the rows past the last offset unwritten, in its output and in x's gradient: the two
    `where`s turn both into zeros (a `where` passes no gradient to the branch it did not take).
    """
    rows, d_model = x.shape
    valid = (torch.arange(rows, device=x.device) < offsets[-1]).unsqueeze(1)  # [A, 1]
    x = torch.where(valid, x, 0)
    x, w_in, b_in, w_out, b_out, dropout_mask = _pad_for_grouped_mm(
        x, w_in, b_in, w_out, b_out, dropout_mask, activation
    )
    pre = F.grouped_mm(x, w_in, offs=offsets)  # [A, h_in]
    if b_in is not None:
        pre = pre + _bias_per_row(b_in, offsets, rows)
    act = _activate(pre, activation)  # [A, h]
    if dropout_mask is not None:
        act = act * dropout_mask
    out = F.grouped_mm(act, w_out, offs=offsets)  # [A, d]
    if b_out is not None:
        out = out + _bias_per_row(b_out, offsets, rows)
    out = out[:, :d_model] if out.shape[1] != d_model else out  # drop the alignment padding
    return torch.where(valid, out, 0)


def _bias_per_row(bias: Tensor, offsets: Tensor, rows: int) -> Tensor:
    """[A, h]: each sorted row's expert bias (zeros past the last slice), from bias [E, h]."""
    row = torch.arange(rows, device=bias.device, dtype=offsets.dtype)
    expert = torch.searchsorted(offsets, row, right=True)  # [A] in [0, E]; E past the last slice
    return F.pad(bias, (0, 0, 0, 1)).index_select(0, expert)


def _pad_for_grouped_mm(
    x: Tensor,
    w_in: Tensor,
    b_in: Tensor | None,
    w_out: Tensor,
    b_out: Tensor | None,
    dropout_mask: Tensor | None,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """Zero-pad d_model and d_hidden to the 16-byte stride multiple grouped_mm requires (a no-op for the
    usual widths: any multiple of 8). Zero columns stay zero through relu and swiglu (silu(0)·0)."""
    align = 16 // x.element_size()
    d_model, hidden = w_out.shape[2], w_out.shape[1]
    pad_d, pad_h = -d_model % align, -hidden % align
    if not pad_d and not pad_h:
        return x, w_in, b_in, w_out, b_out, dropout_mask
    halves = 2 if activation == "swiglu" else 1  # swiglu's w_in is [gate | up]: pad each half
    experts = w_in.shape[0]
    w_in = F.pad(w_in.reshape(experts, d_model, halves, hidden), (0, pad_h, 0, 0, 0, pad_d))
    w_in = w_in.reshape(experts, d_model + pad_d, halves * (hidden + pad_h))
    if b_in is not None:
        b_in = F.pad(b_in.reshape(experts, halves, hidden), (0, pad_h)).reshape(experts, -1)
    w_out = F.pad(w_out, (0, pad_d, 0, pad_h))
    b_out = None if b_out is None else F.pad(b_out, (0, pad_d))
    mask = None if dropout_mask is None else F.pad(dropout_mask, (0, pad_h))
    return F.pad(x, (0, pad_d)), w_in, b_in, w_out, b_out, mask


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """out = x @ weight (+ bias), written in place; returns `out`."""
    if bias is None:
        return torch.mm(x, weight, out=out)
    return torch.addmm(bias, x, weight, out=out)


def _grad_buffer(like: Tensor, parts: list[tuple[int, slice]]) -> Tensor:
    """Gradient buffer shaped like `like` [E, ...]: zeros for unused experts, the rest gets overwritten."""
    grad = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    used = torch.zeros(like.shape[0], dtype=torch.bool)
    used[[e for e, _ in parts]] = True
    if not bool(used.all()):
        grad[~used.to(like.device)] = 0
    return grad


class Experts(nn.Module):
    """E expert FFNs (ReLU or SwiGLU) with stacked weights; runs expert-sorted tokens slice by slice.

    Experts have no biases by default, like the paper's implementation (tensor2tensor's ffn_expert_fn).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: str = "relu",
        dropout: float = 0.0,
        bias: bool = False,
        backend: ExpertBackend = "auto",
    ) -> None:
        super().__init__()
        _check_activation(activation)
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"expert_backend must be one of {EXPERT_BACKENDS}, got {backend!r}")
        self.num_experts, self.activation, self.dropout = num_experts, activation, dropout
        self.backend = backend
        d_in = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, d_in))  # [E, d, h_in]
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))  # [E, h, d]
        self.b_in = nn.Parameter(torch.empty(num_experts, d_in)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self._cast_cache: tuple[tuple, list[Tensor | None]] | None = None  # see _weights_as
        self.reset_parameters()

    def keep_shard(self, experts: slice) -> None:
        """Keep only `experts` of the stacked weights, in place: the Parameter objects stay, so an optimizer
        built before or after sees the same ones."""
        for param in self.parameters():
            param.data = param.data[experts].clone()
        self.num_experts = experts.stop - experts.start

    def restore_full(self, gather: Callable[[Tensor], Tensor]) -> None:
        """Replace each shard [E_local, ...] by `gather(shard)`, the full [E, ...] tensor."""
        for param in self.parameters():
            param.data = gather(param.data)
        self.num_experts = self.w_in.shape[0]

    def reset_parameters(self) -> None:
        """nn.Linear's default initialisation, per expert."""
        for weight, bias in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(weight.shape[1])
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)

    def forward(self, x_sorted: Tensor, counts: Tensor | list[int]) -> Tensor:
        """x_sorted [A, d] sorted by expert, counts [E] slice lengths (sum <= A; a long tensor, or a list)
        -> [A, d]."""
        if len(counts) != self.num_experts:
            raise ValueError(f"counts must have {self.num_experts} entries, got {len(counts)}")
        device_type = x_sorted.device.type
        if torch.is_autocast_enabled(device_type):  # the custom function is opaque to autocast: cast here
            x_sorted = x_sorted.to(torch.get_autocast_dtype(device_type))
        dtype = x_sorted.dtype
        params = self._weights_as(dtype)
        mask = None
        if self.training and self.dropout > 0:
            hidden = self.w_out.shape[1]
            keep = 1.0 - self.dropout
            mask = torch.empty(x_sorted.shape[0], hidden, dtype=dtype, device=x_sorted.device)
            mask = mask.bernoulli_(keep).div_(keep)
        with torch.autocast(device_type, enabled=False):
            if self.uses_grouped_gemm(x_sorted):
                offsets = group_offsets(torch.as_tensor(counts, device=x_sorted.device))
                return grouped_expert_ffn(x_sorted, *params, offsets, self.activation, mask)
            # the loop slices on the host (on a GPU: one synchronisation)
            host_counts = counts.tolist() if isinstance(counts, Tensor) else counts
            return _SortedExpertFFN.apply(x_sorted.contiguous(), *params, host_counts, self.activation, mask)

    def uses_grouped_gemm(self, x: Tensor) -> bool:
        """The backend for input `x`: "auto" takes grouped GEMMs where they have their fast path."""
        if self.backend != "auto":
            return self.backend == "grouped"
        if not x.is_cuda or x.dtype != torch.bfloat16:
            return False
        return torch.cuda.get_device_capability(x.device)[0] in (9, 10)  # sm90 / sm100 CUTLASS kernels

    def _weights_as(self, dtype: torch.dtype) -> list[Tensor | None]:
        """(w_in, b_in, w_out, b_out) in `dtype`. Without autograd (decoding under bf16 autocast) the cast
        copies are kept until a weight changes, as autocast keeps those of nn.Linear; otherwise a decoder
        would re-cast every expert at every step."""
        params = (self.w_in, self.b_in, self.w_out, self.b_out)
        if all(p is None or p.dtype == dtype for p in params):
            return list(params)
        if torch.is_grad_enabled():  # training: the cast belongs in the graph, and the weights move each step
            self._cast_cache = None
            return [None if p is None else p.to(dtype) for p in params]
        key = (dtype, *((id(p), p.data_ptr(), p._version) for p in params if p is not None))
        if self._cast_cache is None or self._cast_cache[0] != key:
            self._cast_cache = (key, [None if p is None else p.detach().to(dtype) for p in params])
        return self._cast_cache[1]


class FeedForward(nn.Module):
    """Dense FFN, d_model -> d_hidden -> d_model: the dense baseline and the shared experts."""

    def __init__(
        self, d_model: int, d_hidden: int, activation: str = "relu", dropout: float = 0.0, bias: bool = True
    ) -> None:
        super().__init__()
        _check_activation(activation)
        self.activation = activation
        self.w_in = nn.Linear(d_model, 2 * d_hidden if activation == "swiglu" else d_hidden, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.w_out = nn.Linear(d_hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_model] -> [..., d_model]."""
        return self.w_out(self.dropout(_activate(self.w_in(x), self.activation)))

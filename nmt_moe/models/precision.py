"""bf16 on CPUs without bf16 instructions: oneDNN has no bf16 LSTM there and fails inside `nn.LSTM`.

On such a CPU (no AVX512-BF16 or AMX) bf16 would not be faster anyway, so a bf16 autocast requested around
the model runs it in float32 instead, with one warning, rather than stopping training or translation.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch


@functools.cache
def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN (and so the LSTM) can run bf16 on this CPU."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def fp32_where_bf16_is_missing(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that turns a CPU bf16 autocast off on CPUs without bf16 kernels (else does nothing)."""
    if device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return contextlib.nullcontext()
    if torch.get_autocast_dtype("cpu") != torch.bfloat16 or cpu_has_bf16_kernels():
        return contextlib.nullcontext()
    _warn_once()
    return torch.autocast("cpu", enabled=False)


@functools.cache
def _warn_once() -> None:
    warnings.warn(
        "this CPU has no bf16 instructions (AVX512-BF16 / AMX), which oneDNN's bf16 LSTM needs: "
        "the model runs in float32 instead",
        stacklevel=3,
    )

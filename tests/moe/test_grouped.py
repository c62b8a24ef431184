"""The GPU path's math on CPU: grouped-GEMM experts equal the per-expert loop, the static-shape dispatch plan
equals the old one, and MoELayer's forward and backward read nothing from the device on the host."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.moe import random_router_layer
from torch.overrides import TorchFunctionMode

from nmt_moe.moe import MoELayer, gates
from nmt_moe.moe.dispatch import apply_capacity, combine, sort_assignments

D_MODEL, D_HIDDEN, NUM_EXPERTS = 16, 24, 8

CONFIGS = {
    "noisy_topk": dict(gate="noisy_topk", k=2),
    "noisy_no_noise": dict(gate="noisy_topk", k=2, noise=False),
    "batchwise": dict(gate="batchwise", k=2),
    "softmax_topk": dict(gate="softmax_topk", k=2, w_z=0.01),
    "switch_shared": dict(gate="switch", k=1, num_shared_experts=1),
    "sigmoid": dict(gate="sigmoid", k=3),
    "hierarchical": dict(gate="hierarchical", k=2, num_groups=4, k_group=2),
    "capacity": dict(gate="softmax_topk", k=2, capacity_factor=0.5),
    "swiglu_bias_dropout_lossfree": dict(
        gate="noisy_topk", k=2, activation="swiglu", ffn_bias=True, dropout=0.2, loss_free_bias=True
    ),
}


def make_pair(config: dict, d_model: int = D_MODEL, d_hidden: int = D_HIDDEN) -> tuple[MoELayer, MoELayer]:
    """The same layer twice, with the loop and the grouped backend; random routers so tokens differ."""
    loop, grouped = (
        random_router_layer(d_model, d_hidden, NUM_EXPERTS, {**config, "expert_backend": backend})
        for backend in ("loop", "grouped")
    )
    return loop, grouped


def run(
    layer: MoELayer, x: torch.Tensor, mask: torch.Tensor | None, seed: int = 1
) -> dict[str, torch.Tensor]:
    """Forward and backward with fixed randomness; the output, losses and every gradient."""
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = layer(x, mask=mask)
    grad_y = torch.randn_like(out.y)
    ((out.y * grad_y).sum() + out.aux_loss).backward()
    result = {"y": out.y.detach(), "aux_loss": out.aux_loss.detach(), "load": out.load, "x.grad": x.grad}
    result.update({f"{n}.grad": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    layer.zero_grad()
    return result


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_grouped_backend_equals_the_loop_in_outputs_and_every_gradient(name: str, training: bool) -> None:
    loop, grouped = make_pair(CONFIGS[name])
    loop.train(training), grouped.train(training)
    x = torch.randn(5, 7, D_MODEL)
    mask = torch.arange(7).expand(5, 7) < torch.tensor([7, 3, 5, 1, 6]).unsqueeze(1)  # padded batch
    for m in (None, mask):
        expected, actual = run(loop, x, m), run(grouped, x, m)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
        if m is not None:
            assert torch.all(actual["y"][~mask] == 0)  # padding gets no output


def test_grouped_backend_with_empty_experts_and_unaligned_widths() -> None:
    """Three tokens, k = 2, eight experts: most experts get no row (zero gradient, as in the loop); widths
    that are no multiple of 4 floats are padded for grouped_mm's 16-byte strides."""
    loop, grouped = make_pair(dict(gate="softmax_topk", k=2, ffn_bias=True), d_model=6, d_hidden=10)
    x = torch.randn(3, 6)
    expected, actual = run(loop, x, None), run(grouped, x, None)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    unused = expected["load"] == 0
    assert unused.any() and torch.all(actual["experts.w_in.grad"][unused] == 0)


def test_grouped_backend_in_bf16_matches_the_loop_in_bf16() -> None:
    """bf16 under autocast, as on a GPU: both backends round alike, so they agree to bf16 precision (as a
    relative norm: single elements of a bf16 gradient can differ more)."""
    loop, grouped = make_pair(dict(gate="noisy_topk", k=2))
    x = torch.randn(64, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = run(loop, x, None), run(grouped, x, None)
    assert actual["y"].dtype == torch.float32  # the layer returns x's dtype; combine summed in fp32
    for key in expected:
        error = (actual[key].float() - expected[key].float()).norm() / expected[key].float().norm().clamp(
            min=1e-9
        )
        assert error < 2e-2, key


def old_plan(expert_index: torch.Tensor, gate_weight: torch.Tensor, num_experts: int, capacity: int | None):
    """The dispatch plan as it was built before it kept static shapes (boolean indexing, host counts)."""
    num_tokens, k = expert_index.shape
    expert = expert_index.t().reshape(-1)
    weight = gate_weight.t().reshape(-1)
    token = torch.arange(num_tokens).repeat(k)
    valid = expert >= 0
    expert, weight, token = expert[valid], weight[valid], token[valid]
    order = torch.argsort(expert, stable=True)
    token, weight, expert = token[order], weight[order], expert[order]
    counts = torch.bincount(expert, minlength=num_experts)
    if capacity is not None:
        starts = torch.cumsum(counts, 0) - counts
        keep = torch.arange(token.numel()) - starts[expert] < capacity
        token, weight, expert, counts = token[keep], weight[keep], expert[keep], counts.clamp(max=capacity)
    return token, weight, expert, counts


@pytest.mark.parametrize("capacity", [None, 1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_new_plan_equals_the_old_one(seed: int, capacity: int | None) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_tokens, k, num_experts = 40, 3, 6
    expert_index = torch.randint(-1, num_experts, (num_tokens, k), generator=generator)  # -1: no expert
    gate_weight = torch.rand(num_tokens, k, generator=generator) * (expert_index >= 0)
    plan = sort_assignments(expert_index, gate_weight, num_experts)
    if capacity is not None:
        plan, dropped = apply_capacity(plan, capacity)
    token, weight, expert, counts = old_plan(expert_index, gate_weight, num_experts, capacity)
    kept = int(counts.sum())
    assert plan.token.shape == (num_tokens * k,)  # static: every assignment, the unrouted at the end
    assert torch.equal(plan.counts, counts)
    assert torch.equal(plan.offsets, torch.cumsum(counts, 0).int())
    assert torch.equal(plan.token[:kept], token) and torch.equal(plan.expert[:kept], expert)
    assert torch.equal(plan.weight[:kept], weight)
    assert torch.all(plan.expert[kept:] == num_experts) and torch.all(plan.weight[kept:] == 0)
    if capacity is not None:
        assert int(dropped) == int((expert_index >= 0).sum()) - kept


def test_combine_accumulates_in_fp32() -> None:
    """Under bf16 a token's contributions are summed in fp32: 256 + 1 + 1 is 258, not bf16's 256."""
    plan = sort_assignments(torch.tensor([[0, 1, 2]]), torch.ones(1, 3), 3)
    out_sorted = torch.tensor([[256.0], [1.0], [1.0]], dtype=torch.bfloat16)
    y = combine(out_sorted, plan, num_tokens=1)
    assert y.dtype == torch.float32 and float(y) == 258.0


def test_bad_expert_backend_is_named() -> None:
    with pytest.raises(ValueError, match="expert_backend"):
        MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, expert_backend="fused")


class _NoHostReads(TorchFunctionMode):
    """Raise on every call that, on a GPU, would make the host wait for the device."""

    BANNED = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.Tensor.masked_select,
        torch.masked_select,
        torch.bincount,
        torch.Tensor.bincount,
        torch.unique,
        torch.Tensor.cpu,
    }

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.BANNED:
            raise AssertionError(f"host read: {func.__name__}")
        if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs:
            raise AssertionError("host read: repeat_interleave without output_size")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _has_bool_index(args[1]):
            raise AssertionError(f"host read: boolean-mask {func.__name__}")
        return func(*args, **kwargs)


def _has_bool_index(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_layer_reads_nothing_on_the_host_with_grouped_experts(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU stand-in for torch.cuda.set_sync_debug_mode("error"): forward, backward and the loss-free bias
    update of every gate, with padding, make none of the calls that synchronise on a GPU. The batchwise
    gate's slot width is a host read on CPU only (on a GPU it is E): patched to the GPU rule here."""
    monkeypatch.setattr(gates, "_slot_width", lambda mask: mask.shape[1])
    _, layer = make_pair(CONFIGS[name])
    x = torch.randn(4, 6, D_MODEL, requires_grad=True)
    mask = torch.arange(6).expand(4, 6) < torch.tensor([6, 2, 4, 5]).unsqueeze(1)
    for training in (True, False):
        layer.train(training)
        with _NoHostReads():
            out = layer(x, mask=mask)
            (out.y.sum() + out.aux_loss).backward()
            layer.update_bias()


@pytest.mark.parametrize(
    "read",
    [
        lambda t: bool(t.sum() > 0),
        lambda t: t.sum().item(),
        lambda t: t[t > 0],
        lambda t: t.long().bincount(),
        lambda t: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0])),
    ],
    ids=["bool", "item", "mask-index", "bincount", "repeat_interleave"],
)
def test_the_host_read_guard_catches_what_it_claims_to(read) -> None:
    with pytest.raises(AssertionError, match="host read"), _NoHostReads():
        read(torch.randn(8).abs())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_cuda_forward_backward_never_synchronises(name: str) -> None:
    """Every gate's forward+backward in bf16 on CUDA under torch's sync debug mode (an error on any
    synchronisation); the grouped backend is what "auto" picks on sm90/sm100 GPUs."""
    _, layer = make_pair(CONFIGS[name])
    layer = layer.cuda()
    x = torch.randn(4, 6, D_MODEL, device="cuda", requires_grad=True)
    mask = torch.arange(6, device="cuda").expand(4, 6) < torch.tensor([6, 2, 4, 5], device="cuda")[:, None]
    layer(x, mask=mask)  # warm-up: lazy CUDA initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for training in (True, False):
            layer.train(training)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x, mask=mask)
            (out.y.float().sum() + out.aux_loss).backward()
            layer.update_bias()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(float(out.y.float().sum()))

"""Sorted dispatch and the stacked-expert autograd function."""

from __future__ import annotations

import pytest
import torch
from helpers.moe import expert_forward

from nmt_moe.moe import Experts
from nmt_moe.moe.dispatch import apply_capacity, combine, expert_capacity, sort_assignments
from nmt_moe.moe.experts import _SortedExpertFFN


def test_sort_assignments_groups_by_expert_choice_major_and_drops_padding() -> None:
    expert_index = torch.tensor([[2, 0], [0, 1], [2, -1]])
    gate_weight = torch.tensor([[0.6, 0.4], [0.7, 0.3], [1.0, 0.0]])
    plan = sort_assignments(expert_index, gate_weight, num_experts=4)
    assert plan.counts.tolist() == [2, 1, 2, 0]
    assert plan.expert.tolist() == [0, 0, 1, 2, 2, 4]  # the -1 slot sorts last, under the sentinel E = 4
    assert plan.token.tolist() == [
        1,
        0,
        1,
        0,
        2,
        2,
    ]  # expert 0: token 1's first choice before token 0's second
    assert plan.weight.tolist() == pytest.approx([0.7, 0.4, 0.3, 0.6, 1.0, 0.0])


def test_apply_capacity_keeps_the_first_assignments_of_each_expert() -> None:
    expert_index = torch.tensor([[0, 1], [0, 1], [0, 2], [1, 0]])
    plan = sort_assignments(expert_index, torch.ones(4, 2), num_experts=3)
    kept, dropped = apply_capacity(plan, capacity=2)
    assert kept.counts.tolist() == [2, 2, 1]
    # expert 0 saw first choices of tokens 0, 1, 2, then token 3's second choice: keeps tokens 0 and 1
    assert kept.token.tolist()[:5] == [0, 1, 3, 0, 2]
    assert kept.expert.tolist()[5:] == [3, 3, 3] and kept.weight.tolist()[5:] == [0, 0, 0]  # dropped: last
    assert int(dropped) == 3
    assert expert_capacity(1.25, num_tokens=100, k=2, num_experts=8) == 32


def test_combine_is_a_weighted_scatter_add() -> None:
    plan = sort_assignments(torch.tensor([[1, 0], [0, 1]]), torch.tensor([[0.25, 0.75], [0.5, 0.5]]), 2)
    out_sorted = torch.arange(4.0).unsqueeze(1)  # the expert output of each sorted assignment
    y = combine(out_sorted, plan, num_tokens=2)
    # choice-major sort: (e0, t1, .5) (e0, t0, .75) (e1, t0, .25) (e1, t1, .5)
    assert y.squeeze(1).tolist() == pytest.approx([0.75 * 1 + 0.25 * 2, 0.5 * 0 + 0.5 * 3])


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_sorted_expert_function_gradients_match_finite_differences(
    activation: str, dropout: bool, bias: bool
) -> None:
    torch.manual_seed(0)
    experts = Experts(num_experts=4, d_model=3, d_hidden=5, activation=activation, bias=bias).double()
    counts = [3, 0, 2, 4]  # an expert without tokens must get a zero gradient
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    hidden = experts.w_out.shape[1]
    mask = (torch.rand(9, hidden) > 0.3).double() / 0.7 if dropout else None
    params = (experts.w_in, experts.b_in, experts.w_out, experts.b_out)

    def run(x, w_in, b_in, w_out, b_out):
        return _SortedExpertFFN.apply(x, w_in, b_in, w_out, b_out, counts, activation, mask)

    assert torch.autograd.gradcheck(run, (x, *params))
    run(x, *params).sum().backward()
    for param in (p for p in params if p is not None):
        assert torch.all(param.grad[1] == 0) and torch.any(param.grad[0] != 0)


def test_experts_forward_equals_each_expert_on_its_slice() -> None:
    torch.manual_seed(0)
    experts = Experts(num_experts=3, d_model=4, d_hidden=6, bias=True)
    x = torch.randn(7, 4)
    counts = [2, 4, 1]
    out = experts(x, counts)
    expected = torch.cat(
        [
            expert_forward(experts, x[0:2], 0),
            expert_forward(experts, x[2:6], 1),
            expert_forward(experts, x[6:], 2),
        ]
    )
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="counts"):
        experts(x, [2, 4])


def test_expert_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    experts = Experts(num_experts=2, d_model=4, d_hidden=64, dropout=0.5)
    x = torch.randn(6, 4)
    assert not torch.equal(experts(x, [3, 3]), experts(x, [3, 3]))
    experts.eval()
    torch.testing.assert_close(experts(x, [3, 3]), experts.eval()(x, [3, 3]))
    torch.testing.assert_close(experts(x, [3, 3])[:3], expert_forward(experts, x[:3], 0))


def test_experts_run_in_the_autocast_dtype() -> None:
    experts = Experts(num_experts=2, d_model=4, d_hidden=8)
    x = torch.randn(5, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = experts(x, [2, 3])
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert experts.w_in.grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_bf16_weight_copies_are_reused_without_autograd_until_a_weight_changes() -> None:
    """Decoding under autocast casts the expert weights once, not at every step, and never serves stale."""
    torch.manual_seed(0)
    experts = Experts(num_experts=2, d_model=4, d_hidden=8)
    x = torch.randn(5, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = experts(x, [2, 3])
        cached = experts._cast_cache[1]
        torch.testing.assert_close(experts(x, [2, 3]), first, rtol=0, atol=0)
        assert all(a is b for a, b in zip(experts._cast_cache[1], cached, strict=True))  # no new cast
        experts.w_out.mul_(2)  # an optimizer step or load_state_dict changes a weight in place
        torch.testing.assert_close(experts(x, [2, 3]).float(), 2 * first.float(), rtol=1e-2, atol=1e-2)
        assert experts._cast_cache[1][2] is not cached[2]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # with autograd: no cache, the cast is in the graph
        experts(x, [2, 3])
    assert experts._cast_cache is None

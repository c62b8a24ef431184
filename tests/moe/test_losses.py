"""Balancing losses: hand-computed values, the smooth load estimate, and balance on a toy problem."""

from __future__ import annotations

import math

import pytest
import torch

from nmt_moe.moe import MoELayer
from nmt_moe.moe.gates import NoisyTopKGate
from nmt_moe.moe.losses import (
    batchwise_threshold_sum,
    cv_squared,
    prob_in_top_k,
    router_z_sum,
    switch_balance_loss,
)


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_cv_squared_by_hand_and_its_gradient_is_finite_at_perfect_balance() -> None:
    assert float(cv_squared(torch.tensor([1.0, 2.0, 3.0]))) == pytest.approx((2 / 3) / 4)
    balanced = torch.full((4,), 2.5, requires_grad=True)
    loss = cv_squared(balanced)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.all(torch.isfinite(balanced.grad))


def test_prob_in_top_k_uses_the_kth_largest_noisy_score_excluding_the_expert() -> None:
    clean = torch.tensor([[0.5, 0.0, -0.5]])
    noisy = torch.tensor([[1.0, 0.2, -1.0]])
    std = torch.tensor([[1.0, 2.0, 0.5]])
    selected = torch.tensor([[True, False, False]])  # k = 1: expert 0 is in
    prob = prob_in_top_k(clean, noisy, std, selected, k=1)
    # expert 0 (in): threshold is the 2nd largest (0.2); experts 1, 2 (out): the largest (1.0)
    expected = [phi((0.5 - 0.2) / 1.0), phi((0.0 - 1.0) / 2.0), phi((-0.5 - 1.0) / 0.5)]
    assert prob[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_switch_balance_loss_and_z_loss_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    load = torch.tensor([2, 1, 1])  # k = 2: four assignments
    mean_prob = [0.4, 0.4, 0.2]
    expected = 3 * (2 / 4 * mean_prob[0] + 1 / 4 * mean_prob[1] + 1 / 4 * mean_prob[2])
    assert float(switch_balance_loss(probs.sum(0), load, torch.tensor(2.0), k=2)) == pytest.approx(expected)
    uniform = torch.full((8, 4), 0.25)
    balanced = switch_balance_loss(uniform.sum(0), torch.tensor([4, 4, 4, 4]), torch.tensor(8.0), k=2)
    assert float(balanced) == pytest.approx(1.0)
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    expected_z_sum = math.log(2) ** 2 + (1 + math.log(2)) ** 2
    assert float(router_z_sum(logits)) == pytest.approx(expected_z_sum)


def test_batchwise_threshold_sum_by_hand() -> None:
    scores = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    batch_mask = torch.tensor([[True, False], [False, True]])
    assert float(batchwise_threshold_sum(scores, torch.tensor([0.5, 0.5]), batch_mask)) == 0.0
    # T_0 = 0.2 also lets token 1 into expert 0: (1 - 0) · (0.3 - 0.2)
    assert float(batchwise_threshold_sum(scores, torch.tensor([0.2, 0.5]), batch_mask)) == pytest.approx(0.1)


def test_noisy_topk_losses_equal_hand_computed_values_on_a_fixed_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gate = NoisyTopKGate(d_model=2, num_experts=3, k=1).train()
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)  # the noise draw is 0: H = xW_g
    with torch.no_grad():
        gate.w_gate.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]))
        gate.w_noise.zero_()  # std = softplus(0) + 0.01
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    routing = gate(x)
    assert routing.expert_index.tolist() == [[0], [1]]
    assert routing.gate_weight.tolist() == [[1.0], [1.0]]  # softmax over one kept logit
    assert routing.losses["importance"].item() == pytest.approx(
        cv_squared(torch.tensor([1.0, 1.0, 0.0])).item()
    )
    std = math.log(2) + 0.01
    # token 0: H = [2, 0, -2]; token 1: H = [0, 1, 0]
    load = [
        phi((2 - 0) / std) + phi((0 - 1) / std),
        phi((0 - 2) / std) + phi((1 - 0) / std),
        phi((-2 - 2) / std) + phi((0 - 1) / std),
    ]
    assert routing.stats["load"].tolist() == pytest.approx(load, abs=1e-6)
    assert routing.losses["load"].item() == pytest.approx(cv_squared(torch.tensor(load)).item(), rel=1e-5)
    # eval mode has no noise, so no smooth estimate: "load" is the hard counts
    assert gate.eval()(x).stats["load"].tolist() == [1.0, 1.0, 0.0]


def test_smooth_load_estimate_tracks_the_true_top_k_counts() -> None:
    torch.manual_seed(0)
    gate = NoisyTopKGate(d_model=16, num_experts=8, k=2).train()
    with torch.no_grad():
        gate.w_gate.normal_(std=0.3)
        gate.w_noise.normal_(std=0.3)
    x = torch.randn(4096, 16)
    estimates, counts = [], []
    for _ in range(10):  # average over noise draws: the estimate is the expectation of the count
        routing = gate(x)
        estimates.append(routing.stats["load"].detach())
        counts.append(torch.bincount(routing.expert_index.reshape(-1), minlength=8).float())
    estimate, count = torch.stack(estimates).mean(0), torch.stack(counts).mean(0)
    assert float(count.std() / count.mean()) > 0.1  # the experts are not trivially balanced
    relative = (estimate - count).abs() / count
    assert float(relative.max()) < 0.03, relative


@pytest.mark.parametrize(
    "config",
    [
        dict(gate="noisy_topk", k=2),
        dict(gate="noisy_topk", k=2, noise=False),
        dict(gate="softmax_topk", k=2, loss_free_bias=True),
        dict(gate="switch", k=1),
        dict(gate="sigmoid", k=3),
        dict(gate="hierarchical", k=2, num_groups=2, k_group=1),
        dict(gate="hierarchical", k=2, num_groups=2, k_group=1, noise=False, loss_free_bias=True),
    ],
    ids=[
        "noisy_topk",
        "topk_no_noise",
        "softmax_topk_bias",
        "switch",
        "sigmoid",
        "hierarchical",
        "hier_bias",
    ],
)
def test_losses_of_summed_stats_of_two_parts_equal_the_losses_of_the_whole_batch(config: dict) -> None:
    """What expert parallelism relies on: each rank's gate returns sums over its tokens, the ranks add them
    up, and `gate.losses` of the sums is the loss of the concatenated batch. Eval mode samples no noise but
    still computes the noisy gates' smooth load estimates, so both sides see the same routing."""
    torch.manual_seed(0)
    layer = MoELayer(8, 8, 8, **config).eval()
    with torch.no_grad():
        for param in layer.gate.parameters():
            param.normal_(std=0.5)
        if layer.loss_free_bias:
            layer.expert_bias.normal_(std=0.3)
    bias = layer.expert_bias if layer.loss_free_bias else None
    x = torch.randn(40, 8)
    with torch.no_grad():
        whole = layer.gate(x, bias)
        parts = [layer.gate(x[:15], bias), layer.gate(x[15:], bias)]
    summed = {name: parts[0].stats[name] + parts[1].stats[name] for name in whole.stats}
    losses = layer.gate.losses(summed)
    assert losses.keys() == whole.losses.keys()
    assert all(float(value) > 1e-3 for value in whole.losses.values())  # nothing trivially zero
    for name, value in whole.losses.items():
        torch.testing.assert_close(losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    local = layer.gate.losses(parts[0].stats)  # one part alone gives other losses
    assert any(abs(float(local[name] - value)) > 1e-4 for name, value in whole.losses.items())


def load_cv_after_training(**layer_kwargs) -> float:
    """Fit a toy regression with a router that starts collapsed onto experts 0 and 1; return load CV."""
    torch.manual_seed(0)
    d_model, num_experts = 8, 8
    layer = MoELayer(d_model, 16, num_experts, k=2, **layer_kwargs)
    with torch.no_grad():
        layer.gate.w_gate.normal_(std=0.1)
        layer.gate.w_gate[0, :2] += 3.0  # feature 0 is constant 1: every token prefers experts 0 and 1
    target = torch.nn.Linear(d_model, d_model)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.02)
    for _ in range(150):
        x = torch.randn(256, d_model)
        x[:, 0] = 1.0
        out = layer(x)
        loss = (out.y - target(x).detach()).pow(2).mean() + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        layer.update_bias()
    layer.eval()
    x = torch.randn(2048, d_model)
    x[:, 0] = 1.0
    load = layer(x).load.float()
    return float(load.std(unbiased=False) / load.mean())


@pytest.mark.parametrize(
    "balanced",
    [
        dict(gate="noisy_topk", w_importance=0.1, w_load=0.1),
        dict(gate="softmax_topk", w_balance=0.1),
        dict(gate="sigmoid", w_balance=0.0, loss_free_bias=True, bias_update_rate=0.01),
    ],
    ids=["noisy_topk_losses", "switch_balance_loss", "loss_free_bias"],
)
def test_balancing_keeps_the_load_even_where_it_collapses_without(balanced: dict) -> None:
    unbalanced = {**balanced, "loss_free_bias": False}
    unbalanced.update({w: 0.0 for w in ("w_importance", "w_load", "w_balance") if w in balanced})
    collapsed = load_cv_after_training(**unbalanced)
    assert collapsed > 1.0
    assert load_cv_after_training(**balanced) < 0.4

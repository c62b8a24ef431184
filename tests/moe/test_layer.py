"""MoELayer against a slow per-token reference, for every gate, plus masking, gradients and validation."""

from __future__ import annotations

import dataclasses
import inspect
from collections import Counter

import pytest
import torch
from helpers.moe import expert_forward, random_router_layer

from nmt_moe.moe import FeedForward, MoEConfig, MoELayer

D_MODEL, D_HIDDEN, NUM_EXPERTS = 16, 24, 8

GATE_CONFIGS = {
    "noisy_topk": dict(gate="noisy_topk", k=2),
    "batchwise": dict(gate="batchwise", k=2),
    "softmax_topk": dict(gate="softmax_topk", k=2),
    "switch": dict(gate="switch", k=1),
    "sigmoid": dict(gate="sigmoid", k=3),
    "hierarchical": dict(gate="hierarchical", k=2, num_groups=4, k_group=2),
    "noisy_swiglu_shared_bias": dict(
        gate="noisy_topk", k=2, activation="swiglu", num_shared_experts=1, loss_free_bias=True, ffn_bias=True
    ),
}


def make_layer(config: dict, seed: int = 0) -> MoELayer:
    return random_router_layer(D_MODEL, D_HIDDEN, NUM_EXPERTS, config, seed)


def reference(layer: MoELayer, tokens: torch.Tensor, expert_index: torch.Tensor, gate_weight: torch.Tensor):
    """Loop over tokens and apply each selected expert with its gate weight (padding slots are -1)."""
    rows = []
    for x, experts, weights in zip(tokens, expert_index.tolist(), gate_weight, strict=True):
        y = torch.zeros(D_MODEL)
        for expert, weight in zip(experts, weights, strict=True):
            if expert < 0:
                continue
            out = expert_forward(layer.experts, x, expert)
            if layer.normalize_expert_output:
                out = out / out.pow(2).mean().add(1e-6).sqrt()
            y = y + weight * out
        if layer.shared is not None:
            y = y + layer.shared(x)
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(GATE_CONFIGS))
def test_output_equals_slow_reference_and_masked_tokens_are_not_routed(name: str, training: bool) -> None:
    layer = make_layer(GATE_CONFIGS[name]).train(training)
    x = torch.randn(4, 9, D_MODEL)
    mask = torch.rand(4, 9) > 0.3
    out = layer(x, mask)

    assert out.y.shape == x.shape
    assert torch.all(out.y[~mask] == 0)
    routed = x[mask]  # [N, d] in order
    assert out.expert_index.shape[0] == routed.shape[0] == out.gate_weight.shape[0]
    expected = reference(layer, routed, out.expert_index, out.gate_weight)
    torch.testing.assert_close(out.y[mask], expected, atol=1e-5, rtol=1e-5)

    valid = out.expert_index[out.expert_index >= 0]
    assert torch.equal(out.load, torch.bincount(valid, minlength=NUM_EXPERTS))
    assert int(out.load.sum()) == valid.numel()
    assert int(out.dropped) == 0
    if training:
        assert out.aux_loss.requires_grad and float(out.aux_loss.detach()) > 0
    else:
        assert float(out.aux_loss) == 0.0


@pytest.mark.parametrize("name", [n for n in GATE_CONFIGS if n != "batchwise"])
def test_each_token_gets_exactly_k_distinct_experts(name: str) -> None:
    layer = make_layer(GATE_CONFIGS[name])
    out = layer(torch.randn(64, D_MODEL))
    assert out.expert_index.shape == (64, layer.experts_per_token)
    assert all(len(set(row)) == layer.experts_per_token for row in out.expert_index.tolist())
    assert int(out.expert_index.min()) >= 0 and int(out.expert_index.max()) < NUM_EXPERTS


def test_batchwise_gate_gives_every_expert_exactly_m_tokens_in_training() -> None:
    layer = make_layer(GATE_CONFIGS["batchwise"])
    out = layer(torch.randn(64, D_MODEL))
    m = 2 * 64 // NUM_EXPERTS
    assert out.load.tolist() == [m] * NUM_EXPERTS
    per_token = (out.expert_index >= 0).sum(1)
    assert float(per_token.float().mean()) == 2.0  # k on average, varying per token
    torch.testing.assert_close(out.gate_weight.sum(1)[per_token > 0], torch.ones(int((per_token > 0).sum())))


def test_batchwise_gate_breaks_ties_at_the_mth_score_in_favour_of_earlier_tokens() -> None:
    layer = make_layer(GATE_CONFIGS["batchwise"])
    base = torch.randn(7, D_MODEL)
    x = base[torch.arange(64) % 7]  # 7 distinct tokens, each repeated 9 or 10 times: ties everywhere
    out = layer(x)
    m = 2 * 64 // NUM_EXPERTS
    assert out.load.tolist() == [m] * NUM_EXPERTS  # exactly m per expert despite the ties
    probs = (x @ layer.gate.w_gate).softmax(-1)
    for expert in range(NUM_EXPERTS):
        taken = (out.expert_index == expert).any(1).nonzero().squeeze(1).tolist()
        kth = probs[:, expert].topk(m).values[-1]
        tied = (probs[:, expert] == kth).nonzero().squeeze(1).tolist()
        above = int((probs[:, expert] > kth).sum())
        assert [t for t in taken if t in tied] == tied[: m - above]  # the earliest of the tied tokens


def test_batchwise_gate_uses_learned_thresholds_at_inference() -> None:
    layer = make_layer(GATE_CONFIGS["batchwise"]).eval()
    x = torch.randn(32, D_MODEL)
    probs = (x @ layer.gate.w_gate).softmax(-1)
    out = layer(x)
    chosen = torch.zeros(32, NUM_EXPERTS, dtype=torch.bool)
    for row, experts in enumerate(out.expert_index.tolist()):
        chosen[row, [e for e in experts if e >= 0]] = True
    assert torch.equal(chosen, probs > layer.gate.threshold)


def test_hierarchical_gate_picks_k_experts_in_each_of_k_group_groups() -> None:
    layer = make_layer(GATE_CONFIGS["hierarchical"])
    out = layer(torch.randn(50, D_MODEL))
    groups = out.expert_index // (NUM_EXPERTS // 4)  # [N, kg·k]
    for row in groups.tolist():
        assert sorted(Counter(row).values()) == [2, 2]  # k_group = 2 groups, k = 2 experts in each
    assert set(out.losses) == {"importance", "load", "importance_primary", "load_primary"}


@pytest.mark.parametrize("name", list(GATE_CONFIGS))
def test_eval_mode_is_deterministic(name: str) -> None:
    layer = make_layer(GATE_CONFIGS[name]).eval()
    x = torch.randn(30, D_MODEL)
    first, second = layer(x), layer(x)
    assert torch.equal(first.y, second.y)
    assert torch.equal(first.expert_index, second.expert_index)


@pytest.mark.parametrize("name", list(GATE_CONFIGS))
def test_gradients_reach_the_router_and_only_the_selected_experts(name: str) -> None:
    layer = make_layer(GATE_CONFIGS[name])
    x = torch.randn(1, D_MODEL)  # one token, so some experts stay unused (batchwise still feeds all)
    out = layer(x)
    out.y.pow(2).sum().backward()  # task loss only: the router must learn through the gate weights
    for pname, param in layer.gate.named_parameters():
        if pname.endswith(("w_gate", "w_noise")):
            assert param.grad is not None and float(param.grad.abs().sum()) > 0, pname
    used = out.load > 0
    assert 0 < int(used.sum()) <= NUM_EXPERTS if name == "batchwise" else int(used.sum()) < NUM_EXPERTS
    experts = layer.experts
    for param in (p for p in (experts.w_in, experts.w_out, experts.b_in, experts.b_out) if p is not None):
        per_expert = param.grad.reshape(NUM_EXPERTS, -1).abs().sum(1)
        assert torch.all(per_expert[used] > 0) and torch.all(per_expert[~used] == 0)


def test_batchwise_threshold_learns_through_the_aux_loss() -> None:
    layer = make_layer(GATE_CONFIGS["batchwise"])
    layer(torch.randn(64, D_MODEL)).aux_loss.backward()
    assert float(layer.gate.threshold.grad.abs().sum()) > 0


def test_softmax_topk_with_all_experts_equals_the_dense_softmax_mixture() -> None:
    layer = make_layer(dict(gate="softmax_topk", k=NUM_EXPERTS))
    x = torch.randn(20, D_MODEL)
    probs = (x @ layer.gate.w_gate).softmax(-1)  # [N, E]
    dense = sum(probs[:, e : e + 1] * expert_forward(layer.experts, x, e) for e in range(NUM_EXPERTS))
    torch.testing.assert_close(layer(x).y, dense, atol=1e-5, rtol=1e-5)


def test_noisy_topk_weights_are_a_softmax_over_the_kept_logits() -> None:
    layer = make_layer(dict(gate="noisy_topk", k=2)).eval()  # eval: no noise, H = xW_g
    x = torch.randn(10, D_MODEL)
    logits = x @ layer.gate.w_gate
    top = logits.topk(2, dim=-1)
    out = layer(x)
    assert torch.equal(out.expert_index, top.indices)
    torch.testing.assert_close(out.gate_weight, top.values.softmax(-1))


def test_loss_free_bias_changes_selection_but_not_gate_weights() -> None:
    layer = make_layer(dict(gate="softmax_topk", k=2, loss_free_bias=True)).eval()
    x = torch.randn(10, D_MODEL)
    with torch.no_grad():
        layer.expert_bias.zero_()
        layer.expert_bias[[3, 5]] = 10.0  # forces experts 3 and 5 for every token
    out = layer(x)
    assert torch.equal(out.expert_index.sort(1).values, torch.tensor([[3, 5]] * 10))
    probs = (x @ layer.gate.w_gate).softmax(-1)[:, [3, 5]]
    torch.testing.assert_close(
        out.gate_weight.sort(1).values, (probs / probs.sum(1, keepdim=True)).sort(1).values
    )


def test_update_bias_moves_against_the_load_seen_since_the_last_call() -> None:
    layer = make_layer(dict(gate="softmax_topk", k=1, loss_free_bias=True, bias_update_rate=0.1))
    with torch.no_grad():
        layer.expert_bias.zero_()
        layer.expert_bias[0] = 5.0  # every token goes to expert 0
    layer(torch.randn(16, D_MODEL))
    layer.update_bias()
    expected = torch.full((NUM_EXPERTS,), 0.1)
    expected[0] = 5.0 - 0.1
    torch.testing.assert_close(layer.expert_bias, expected)
    layer.update_bias()  # nothing seen since: no change
    torch.testing.assert_close(layer.expert_bias, expected)


def test_capacity_drops_the_overflow_assignments_keeping_first_choices_first() -> None:
    layer = make_layer(dict(gate="softmax_topk", k=2, capacity_factor=0.5))
    x = torch.randn(40, D_MODEL)
    out = layer(x)
    capacity = 5  # ceil(0.5 · 40 tokens · k=2 / 8 experts)
    kept = torch.zeros_like(out.expert_index, dtype=torch.bool)
    taken = [0] * NUM_EXPERTS
    for choice in range(2):  # first choices of all tokens, then second choices
        for token in range(40):
            expert = int(out.expert_index[token, choice])
            if taken[expert] < capacity:
                taken[expert] += 1
                kept[token, choice] = True
    assert int(out.dropped) == int((~kept).sum()) > 0
    expected = reference(layer, x, torch.where(kept, out.expert_index, -1), out.gate_weight)
    torch.testing.assert_close(out.y, expected, atol=1e-5, rtol=1e-5)


def test_fully_masked_input_gives_zeros_and_no_load() -> None:
    layer = make_layer(GATE_CONFIGS["noisy_topk"])
    x = torch.randn(2, 3, D_MODEL, requires_grad=True)
    out = layer(x, torch.zeros(2, 3, dtype=torch.bool))
    assert torch.all(out.y == 0) and int(out.load.sum()) == 0 and out.expert_index.shape == (0, 2)


def test_gating_runs_in_fp32_for_bfloat16_input() -> None:
    layer = make_layer(GATE_CONFIGS["noisy_topk"]).to(torch.bfloat16)
    out = layer(torch.randn(8, D_MODEL, dtype=torch.bfloat16))
    assert out.y.dtype == torch.bfloat16 and out.gate_weight.dtype == torch.float32


def test_feed_forward_is_the_dense_baseline() -> None:
    ffn = FeedForward(D_MODEL, D_HIDDEN, activation="swiglu")
    x = torch.randn(5, D_MODEL)
    gate, up = ffn.w_in(x).chunk(2, -1)
    torch.testing.assert_close(ffn(x), ffn.w_out(torch.nn.functional.silu(gate) * up))


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(k=9), "k"),
        (dict(gate="top2"), "gate"),
        (dict(gate="switch", k=2), "k"),
        (dict(activation="gelu"), "activation"),
        (dict(gate="hierarchical", num_groups=3), "num_groups"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(num_groups=2), "num_groups"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs: dict, argument: str) -> None:
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, **kwargs)


def test_input_width_mismatch_names_d_model() -> None:
    layer = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS)
    with pytest.raises(ValueError, match="d_model"):
        layer(torch.randn(3, D_MODEL + 1))
    with pytest.raises(ValueError, match="^mask:"):
        layer(torch.randn(3, D_MODEL), torch.ones(4, dtype=torch.bool))


def test_config_mirrors_the_layer_arguments() -> None:
    """MoEConfig holds MoELayer's arguments less d_model, in order, with the layer's defaults (it adds the
    model's defaults for the two the layer requires): the two cannot drift apart."""
    parameters = inspect.signature(MoELayer.__init__).parameters
    fields = {f.name: f for f in dataclasses.fields(MoEConfig)}
    assert list(fields) == [name for name in parameters if name not in ("self", "d_model")]
    config = MoEConfig()
    for name, parameter in parameters.items():
        if parameter.default is not inspect.Parameter.empty:
            assert getattr(config, name) == parameter.default, name
    assert (config.num_experts, config.d_hidden) == (8, 512)


@pytest.mark.parametrize("name", list(GATE_CONFIGS))
def test_layer_from_config_is_the_layer_from_arguments(name: str) -> None:
    options = GATE_CONFIGS[name]
    config = MoEConfig(d_hidden=D_HIDDEN, num_experts=NUM_EXPERTS, **options)
    torch.manual_seed(0)
    from_config = MoELayer.from_config(D_MODEL, config)
    torch.manual_seed(0)
    from_arguments = MoELayer(D_MODEL, D_HIDDEN, NUM_EXPERTS, **options)
    state, expected = from_config.state_dict(), from_arguments.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value)
    x = torch.randn(6, D_MODEL)
    from_config.eval(), from_arguments.eval()
    torch.testing.assert_close(from_config(x).y, from_arguments(x).y)


def test_config_check_names_the_bad_setting_without_building() -> None:
    with pytest.raises(ValueError, match="^k:"):
        MoEConfig(num_experts=4, k=5).check(D_MODEL)
    with pytest.raises(ValueError, match="^d_model:"):
        MoEConfig().check(0)

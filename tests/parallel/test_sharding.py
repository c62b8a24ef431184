"""Expert sharding and re-sharding math in one process (the multi-process tests are in
tests/parallel/test_distributed.py and test_cli.py, behind the `distributed` marker)."""

from __future__ import annotations

import pytest
import torch

from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoEConfig, MoELayer, collectives, parallel
from nmt_moe.moe.collectives import ExpertParallel


def layout(rank: int, size: int = 2) -> ExpertParallel:
    """A layout as `init_expert_parallel` builds it, without process groups (sharding needs none)."""
    return ExpertParallel(size=size, rank=rank, group=None, replicas=1, replica_group=None, world_size=size)


def small_config() -> Seq2SeqConfig:
    return Seq2SeqConfig(20, embed_dim=8, hidden_size=8, encoder_layers=3, encoder_moe_after=[1, 2],
                         moe=MoEConfig(num_experts=4, d_hidden=6))  # fmt: skip


def small_model() -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(small_config())


def test_shards_cover_the_experts_in_rank_order() -> None:
    assert [layout(r, 4).shard(8) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


def test_shard_experts_keeps_this_ranks_rows_in_the_same_parameters() -> None:
    full = small_model()
    names = parallel.expert_parameter_names(full)
    assert names == [
        "encoder.moe.0.experts.w_in", "encoder.moe.0.experts.w_out", "encoder.moe.1.experts.w_in",
        "encoder.moe.1.experts.w_out", "decoder.moe.0.experts.w_in", "decoder.moe.0.experts.w_out",
    ]  # fmt: skip
    shards = []
    for rank in range(2):
        model = small_model()
        before = {name: p for name, p in model.named_parameters()}
        parallel.shard_experts(model, layout(rank))
        after = dict(model.named_parameters())
        assert all(after[name] is before[name] for name in before)  # an optimizer keeps working
        assert parallel.sharded_parameters(model) == [after[name] for name in names]
        for _, layer in parallel.moe_layers(model):
            assert layer.experts.num_experts == 2 and layer.num_experts == 4
        shards.append(model.state_dict())
    full_state = full.state_dict()
    for key, value in full_state.items():
        if key in names:  # the ranks' rows, concatenated, are the full bank
            assert shards[0][key].shape[0] == 2
            torch.testing.assert_close(torch.cat([shards[0][key], shards[1][key]]), value, rtol=0, atol=0)
        else:  # everything else is replicated untouched
            torch.testing.assert_close(shards[1][key], value, rtol=0, atol=0)


def test_a_full_checkpoint_reshards_to_any_layout() -> None:
    full_state = {f"model.{k}": v for k, v in small_model().state_dict().items()}
    for size in (1, 2, 4):
        for rank in range(size):
            model = small_model()
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            if size > 1:
                parallel.shard_experts(model, layout(rank, size))
            state = dict(full_state)
            parallel.shard_expert_state(state, model, prefix="model.")
            model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})  # strict
            w_in = model.encoder.moe[0].experts.w_in
            expected = full_state["model.encoder.moe.0.experts.w_in"][layout(rank, size).shard(4)]
            torch.testing.assert_close(w_in.detach(), expected, rtol=0, atol=0)


def test_full_optimizer_state_is_sliced_to_the_shard() -> None:
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.tensor([[5, 6, 3]]), torch.tensor([3]), torch.tensor([[2, 5, 6]])).logits.sum().backward()
    optimizer.step()
    full = optimizer.state_dict()
    parallel.shard_experts(model, layout(1))
    optimizer.load_state_dict(full)  # what resuming does: full [E, ...] moments for the [E/2, ...] shards
    parallel.shard_optimizer_state(optimizer, model)
    w_out = model.decoder.moe[0].experts.w_out
    assert optimizer.state[w_out]["exp_avg"].shape == w_out.shape
    index = [id(p) for group in optimizer.param_groups for p in group["params"]].index(id(w_out))
    torch.testing.assert_close(optimizer.state[w_out]["exp_avg"], full["state"][index]["exp_avg"][2:4])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity_factor": 1.0}, "dropless"),
        ({"num_experts": 3, "k": 1}, "num_experts=3 is not divisible by expert_parallel_size=2"),
    ],
)
def test_layers_that_cannot_be_sharded_are_named(kwargs: dict, message: str) -> None:
    layer = MoELayer(**{"d_model": 4, "d_hidden": 4, "num_experts": 4, "k": 2, **kwargs})
    with pytest.raises(ValueError, match=message):
        parallel.shard_experts(layer, layout(0))


def test_sharding_a_batchwise_layer_makes_its_top_m_global() -> None:
    layer = MoELayer(d_model=4, d_hidden=4, num_experts=4, k=2, gate="batchwise")
    assert not layer.gate.global_batch
    parallel.shard_experts(layer, layout(0))
    assert layer.gate.global_batch  # unshard_experts clears it (tests/parallel/test_distributed.py)


def test_expert_parallel_needs_torch_distributed() -> None:
    with pytest.raises(RuntimeError, match="expert_parallel_size=2 needs torch.distributed"):
        collectives.init_expert_parallel(2)


def test_translation_module_rejects_a_bad_expert_parallel_size() -> None:
    from nmt_moe.training.module import TranslationModule

    with pytest.raises(ValueError, match="expert_parallel_size must be >= 1"):
        TranslationModule(small_config(), expert_parallel_size=0)

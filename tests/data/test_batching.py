"""Token-bucketed batch sampler: coverage, budget, per-rank shares, resume, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from nmt_moe.data.batching import (
    TokenBatchSampler,
    bucket_batches,
    collate_pairs,
    padding_fraction,
    split_for_ranks,
)
from nmt_moe.data.tokenizer import PAD_ID


def _lengths(n: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 60, size=n)
    tgt = np.clip(src + rng.integers(-5, 8, size=n), 3, None)
    return src, tgt


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


@pytest.mark.parametrize("max_tokens", [70, 500, 4096])
def test_every_pair_once_and_budget_kept(max_tokens: int) -> None:
    src, tgt = _lengths()
    sampler = TokenBatchSampler(src, tgt, max_tokens, seed=3)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(_flat(batches)) == list(range(len(src)))
        for batch in batches:
            assert len(batch) * max(src[batch].max(), tgt[batch].max()) <= max_tokens


def test_epochs_reshuffle_deterministically_from_seed() -> None:
    src, tgt = _lengths()
    a, b = TokenBatchSampler(src, tgt, 500, seed=1), TokenBatchSampler(src, tgt, 500, seed=1)
    first = list(a)
    assert first == list(b)
    a.set_epoch(1)
    assert list(a) != first
    assert list(TokenBatchSampler(src, tgt, 500, seed=2)) != first


def test_unshuffled_batches_follow_length_order() -> None:
    src, tgt = _lengths()
    batches = list(TokenBatchSampler(src, tgt, 500, shuffle=False))
    firsts = [src[batch[0]] for batch in batches]
    assert firsts == sorted(firsts)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_shares_disjoint_equal_and_cover_epoch(world_size: int) -> None:
    src, tgt = _lengths(997)
    shares = []
    for rank in range(world_size):
        sampler = TokenBatchSampler(src, tgt, 700, seed=5, rank=rank, world_size=world_size)
        sampler.set_epoch(2)
        shares.append(list(sampler))
    assert len({len(share) for share in shares}) == 1  # same batch count on every rank
    flat = [set(_flat(share)) for share in shares]
    for i in range(world_size):
        for j in range(i + 1, world_size):
            assert not flat[i] & flat[j]
    assert sorted(_flat([b for share in shares for b in share])) == list(range(len(src)))


def test_split_for_ranks_splits_largest_until_divisible() -> None:
    batches = [np.arange(0, 4), np.arange(4, 5), np.arange(5, 6)]
    out = split_for_ranks(batches, 2)
    assert len(out) == 4 and sorted(np.concatenate(out).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="equal number of batches"):
        split_for_ranks([np.arange(1)], 2)


def test_pair_over_budget_is_an_error_not_truncated() -> None:
    with pytest.raises(ValueError, match="pair 1 has 50 tokens, more than max_tokens=40"):
        bucket_batches(np.array([5, 50]), np.array([5, 6]), 40)
    # evaluation keeps it, alone in its batch; the others still respect the budget
    batches = bucket_batches(np.array([5, 50, 6, 7]), np.array([5, 6, 6, 6]), 21, allow_oversize=True)
    assert sorted(b.tolist() for b in batches) == [[0, 2, 3], [1]]


def test_sampler_resume_gives_same_remaining_batches() -> None:
    src, tgt = _lengths()
    sampler = TokenBatchSampler(src, tgt, 500, seed=7)
    sampler.set_epoch(3)
    iterator = iter(sampler)
    seen = [next(iterator) for _ in range(5)]
    state = sampler.state_dict()
    rest = list(iterator)

    fresh = TokenBatchSampler(src, tgt, 500, seed=7)
    fresh.load_state_dict(state)
    fresh.set_epoch(3)  # Lightning sets the (same) epoch again on resume
    assert list(fresh) == rest
    assert sorted(_flat(seen + rest)) == list(range(len(src)))
    fresh.set_epoch(4)  # the next epoch starts from its beginning
    assert len(list(fresh)) == len(fresh)


def test_resume_refuses_other_world_size() -> None:
    src, tgt = _lengths()
    state = TokenBatchSampler(src, tgt, 500, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size=2"):
        TokenBatchSampler(src, tgt, 500).load_state_dict(state)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, src: np.ndarray, tgt: np.ndarray) -> None:
        self.src, self.tgt = src, tgt

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict:
        return {
            "src_ids": [5] * (int(self.src[i]) - 1) + [3],
            "tgt_ids": [2] + [6] * (int(self.tgt[i]) - 2) + [3],
            "index": i,
        }


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resumes_mid_epoch(num_workers: int) -> None:
    src, tgt = _lengths(400)

    def loader() -> StatefulDataLoader:
        sampler = TokenBatchSampler(src, tgt, 300, seed=11)
        sampler.set_epoch(1)
        return StatefulDataLoader(
            _Pairs(src, tgt), batch_sampler=sampler, collate_fn=collate_pairs, num_workers=num_workers
        )

    full = [b["index"].tolist() for b in loader()]
    first = loader()
    iterator = iter(first)
    head = [next(iterator)["index"].tolist() for _ in range(7)]
    state = first.state_dict()
    del iterator, first

    resumed = loader()
    resumed.load_state_dict(state)
    tail = [b["index"].tolist() for b in resumed]
    assert head + tail == full


def test_collate_pads_right_with_pad_id() -> None:
    batch = collate_pairs(
        [
            {"src_ids": [7, 3], "tgt_ids": [2, 8, 9, 3], "index": 4},
            {"src_ids": [7, 7, 7, 3], "tgt_ids": [2, 3], "index": 0},
        ]
    )
    assert batch["src"].tolist() == [[7, 3, PAD_ID, PAD_ID], [7, 7, 7, 3]]
    assert batch["tgt"].tolist() == [[2, 8, 9, 3], [2, 3, PAD_ID, PAD_ID]]
    assert batch["src_lengths"].tolist() == [2, 4]
    assert batch["index"].tolist() == [4, 0]
    assert all(t.dtype == torch.long for t in batch.values())


def test_padding_fraction_counts_pad_positions() -> None:
    src, tgt = np.array([2, 4]), np.array([3, 3])
    # one batch: src tensor 2x4 (6 real), tgt tensor 2x3 (6 real) -> 2 pads of 14
    assert padding_fraction([np.array([0, 1])], src, tgt) == pytest.approx(2 / 14)

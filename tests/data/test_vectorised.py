"""Vectorised batch planning and padding statistics equal the pair-by-pair Python loops they replace."""

from __future__ import annotations

import time

import numpy as np
import pytest

from nmt_moe.data.batching import TokenBatchSampler, bucket_batches, padding_fraction


def reference_bucket_batches(
    src: np.ndarray, tgt: np.ndarray, max_tokens: int, rng: np.random.Generator | None, allow_oversize: bool
) -> list[np.ndarray]:
    """The loop bucket_batches used before it was vectorised (kept verbatim as the specification)."""
    src, tgt = np.asarray(src, dtype=np.int64), np.asarray(tgt, dtype=np.int64)
    longest = np.maximum(src, tgt)
    if len(longest) and longest.max() > max_tokens and not allow_oversize:
        raise ValueError("over budget")
    tiebreak = rng.permutation(len(longest)) if rng is not None else np.arange(len(longest))
    order = np.lexsort((tiebreak, tgt, src))
    batches: list[np.ndarray] = []
    start, widest = 0, 0
    for position, index in enumerate(order.tolist()):
        wider = max(widest, int(longest[index]))
        if (position - start + 1) * wider > max_tokens and position > start:
            batches.append(order[start:position])
            start, wider = position, int(longest[index])
        widest = wider
    if start < len(order):
        batches.append(order[start:])
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def reference_padding_fraction(batches: list[np.ndarray], src: np.ndarray, tgt: np.ndarray) -> float:
    real = padded = 0
    for batch in batches:
        s, t = src[batch], tgt[batch]
        real += int(s.sum() + t.sum())
        padded += len(batch) * int(s.max() + t.max())
    return 1.0 - real / padded if padded else 0.0


def _case(seed: int) -> tuple[np.ndarray, np.ndarray, int, bool, bool]:
    """A random corpus shape: sizes from 0 to 3000 pairs, narrow or wide length spreads, any budget."""
    rng = np.random.default_rng(seed)
    n = int(rng.choice([0, 1, 2, 7, 100, 3000]))
    top = int(rng.choice([3, 20, 300]))
    src = rng.integers(1, top + 1, size=n)
    tgt = np.clip(src + rng.integers(-top // 3 - 1, top // 3 + 2, size=n), 1, None)
    allow_oversize = bool(rng.integers(2))
    widest = int(np.maximum(src, tgt).max()) if n else 1
    low = 1 if allow_oversize else widest
    max_tokens = int(rng.integers(low, max(low, widest * 40) + 1))
    return src, tgt, max_tokens, allow_oversize, bool(rng.integers(2))


@pytest.mark.parametrize("seed", range(300))
def test_vectorised_plan_equals_reference_loop(seed: int) -> None:
    src, tgt, max_tokens, allow_oversize, shuffle = _case(seed)
    got = bucket_batches(
        src, tgt, max_tokens, np.random.default_rng(seed) if shuffle else None, allow_oversize
    )
    want = reference_bucket_batches(
        src, tgt, max_tokens, np.random.default_rng(seed) if shuffle else None, allow_oversize
    )
    assert [b.tolist() for b in got] == [b.tolist() for b in want]
    assert padding_fraction(got, src, tgt) == reference_padding_fraction(want, src, tgt)


def test_padding_fraction_of_arbitrary_batches_equals_reference() -> None:
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(1, 80, size=5000), rng.integers(1, 80, size=5000)
    cuts = np.sort(rng.choice(np.arange(1, 5000), size=300, replace=False))
    batches = np.split(rng.permutation(5000), cuts)
    assert padding_fraction(batches, src, tgt) == reference_padding_fraction(batches, src, tgt)
    assert padding_fraction([], src, tgt) == 0.0


def test_epoch_plan_of_a_million_pairs_takes_seconds() -> None:
    rng = np.random.default_rng(0)
    src = rng.integers(3, 120, size=1_000_000)
    tgt = np.clip(src + rng.integers(-10, 10, size=src.shape), 3, None)
    sampler = TokenBatchSampler(src, tgt, 4096, seed=0)
    start = time.perf_counter()
    batches = sampler.batches()
    seconds = time.perf_counter() - start
    assert sum(map(len, batches)) == 1_000_000
    print(f"epoch plan of 1M pairs: {seconds:.2f} s")
    assert seconds < 10, f"epoch plan of 1M pairs took {seconds:.1f} s"


@pytest.mark.parametrize("top", [5, 300, 70_000])  # 70,000 does not fit the packed key: lexsort path
def test_length_order_equals_lexsort(top: int) -> None:
    from nmt_moe.data.batching import _length_order

    rng = np.random.default_rng(top)
    src, tgt = rng.integers(1, top, size=20_000), rng.integers(1, top, size=20_000)
    tiebreak = rng.permutation(20_000)
    assert (_length_order(src, tgt, tiebreak) == np.lexsort((tiebreak, tgt, src))).all()
    got = bucket_batches(src, tgt, 10, np.random.default_rng(1), allow_oversize=True)
    want = reference_bucket_batches(src, tgt, 10, np.random.default_rng(1), allow_oversize=True)
    assert [b.tolist() for b in got] == [b.tolist() for b in want]

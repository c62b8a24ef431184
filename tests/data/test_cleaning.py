"""Cleaning filters: each switchable, each counted."""

from __future__ import annotations

import hashlib

import datasets
import numpy as np
import pytest

from nmt_moe.data.cleaning import (
    CleaningConfig,
    clean_text,
    filter_lengths,
    first_occurrences,
    normalize_whitespace,
)


def _pairs(*pairs: tuple[str, str]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"src": [p[0] for p in pairs], "tgt": [p[1] for p in pairs]})


def test_normalize_whitespace() -> None:
    assert normalize_whitespace("  a\t b\u00a0 c \n") == "a b c"


def test_text_filters_count_what_they_drop() -> None:
    ds = _pairs(("a  b", "x y"), ("a b", "x  y"), ("  ", "z"), ("c", ""), ("d", "w"), ("d", "w"))
    kept, dropped = clean_text(ds, CleaningConfig(dedup=True))
    assert dropped == {"empty": 2, "duplicate": 2}
    assert list(zip(kept["src"], kept["tgt"], strict=True)) == [("a b", "x y"), ("d", "w")]


def test_filters_switch_off() -> None:
    ds = _pairs((" a ", "b"), ("", "c"))
    kept, dropped = clean_text(ds, CleaningConfig(normalize_whitespace=False, drop_empty=False))
    assert dropped == {} and kept["src"][:] == [" a ", ""]


def test_length_and_ratio_filters() -> None:
    ds = datasets.Dataset.from_dict({"src_len": [5, 40, 5, 10], "tgt_len": [6, 6, 30, 12]})
    kept, dropped = filter_lengths(ds, CleaningConfig(max_tokens_per_sentence=32, max_length_ratio=3.0))
    assert dropped == {"too_long": 1, "length_ratio": 1}  # 40 tokens; then 30 vs 5
    assert kept["src_len"][:] == [5, 10]
    kept, dropped = filter_lengths(ds, CleaningConfig(max_tokens_per_sentence=20))
    assert dropped == {"too_long": 2} and kept["src_len"][:] == [5, 10]


def test_bad_knobs_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_length_ratio"):
        CleaningConfig(max_length_ratio=0.5)
    with pytest.raises(ValueError, match="max_tokens_per_sentence"):
        CleaningConfig(max_tokens_per_sentence=2)


def _first_occurrences_loop(hashes: list[str]) -> list[int]:
    """The dedup filter's earlier Python loop, kept verbatim as the reference."""
    seen: set[str] = set()
    keep = []
    for index, value in enumerate(hashes):
        if value not in seen:
            seen.add(value)
            keep.append(index)
    return keep


def _hex_pair_hashes(src: list[str], tgt: list[str]) -> list[str]:
    """The earlier hash: hex BLAKE2b-128 of `source<TAB>target`."""
    return [
        hashlib.blake2b(f"{s}\t{t}".encode(), digest_size=16).hexdigest()
        for s, t in zip(src, tgt, strict=True)
    ]


@pytest.mark.parametrize("seed", range(200))
def test_first_occurrences_equal_the_loop(seed: int) -> None:
    """Random (hi, lo) pairs with many repeats, ties in hi alone and in lo alone: same rows kept."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 300))
    hi = rng.integers(-3, 3, size=n) * (1 << 62)  # [n] few values, spanning the int64 range
    lo = rng.integers(-2, 3, size=n)  # [n]
    expected = _first_occurrences_loop([f"{a},{b}" for a, b in zip(hi.tolist(), lo.tolist(), strict=True)])
    assert first_occurrences(hi, lo).tolist() == expected


@pytest.mark.parametrize("seed", range(40))
def test_dedup_keeps_what_the_loop_kept(seed: int) -> None:
    """clean_text's dedup on random pairs (tabs, spaces, repeats; normalisation off so they survive)
    keeps exactly the rows the earlier hash + loop kept, in order."""
    rng = np.random.default_rng(seed)
    pieces = ["a", "b", "a b", "a\tb", " ", "ü", ""]
    n = int(rng.integers(1, 120))
    src = ["".join(rng.choice(pieces, size=int(rng.integers(1, 3)))) for _ in range(n)]
    tgt = ["".join(rng.choice(pieces, size=int(rng.integers(1, 3)))) for _ in range(n)]
    config = CleaningConfig(normalize_whitespace=False, drop_empty=False, dedup=True)
    kept, dropped = clean_text(datasets.Dataset.from_dict({"src": src, "tgt": tgt}), config)
    expected = _first_occurrences_loop(_hex_pair_hashes(src, tgt))
    assert list(zip(kept["src"], kept["tgt"], strict=True)) == [(src[i], tgt[i]) for i in expected]
    assert dropped == {"duplicate": n - len(expected)}

"""Cleaning filters: each switchable, each counted."""

from __future__ import annotations

import datasets
import pytest

from nmt_moe.data.cleaning import CleaningConfig, clean_text, filter_lengths, normalize_whitespace


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

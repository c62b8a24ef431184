"""Corpus cleaning filters, each one switchable, each one counted.

Text filters run before SentencePiece training (whitespace, empty pairs, duplicates); length filters run on
the encoded pairs, so "too long" is measured in the same tokens the batch budget counts. Every filter
reports how many pairs it dropped, in the order the filters ran.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets
import numpy as np

from nmt_moe.data.columns import read_columns


@dataclass(frozen=True)
class CleaningConfig:
    """Cleaning knobs. Lengths count tokens as in the batch tensors: source + EOS, BOS + target + EOS."""

    normalize_whitespace: bool = True
    drop_empty: bool = True
    dedup: bool = False
    max_tokens_per_sentence: int | None = 256
    max_length_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_tokens_per_sentence is not None and self.max_tokens_per_sentence < 3:
            raise ValueError(
                f"max_tokens_per_sentence must be >= 3 (BOS, EOS, one token), "
                f"got {self.max_tokens_per_sentence}"
            )
        if self.max_length_ratio is not None and self.max_length_ratio < 1.0:
            raise ValueError(f"max_length_ratio must be >= 1, got {self.max_length_ratio}")


def normalize_whitespace(text: str) -> str:
    """Strip and collapse any run of Unicode whitespace (tabs, NBSP, ...) to one space."""
    return " ".join(text.split())


def _normalize_batch(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    return {
        "src": [normalize_whitespace(s) for s in batch["src"]],
        "tgt": [normalize_whitespace(t) for t in batch["tgt"]],
    }


def _not_empty(batch: dict[str, list[str]]) -> list[bool]:
    return [bool(s.strip()) and bool(t.strip()) for s, t in zip(batch["src"], batch["tgt"], strict=True)]


def _pair_hash(batch: dict[str, list[str]]) -> dict[str, list[int]]:
    """A 128-bit BLAKE2b digest of each `source<TAB>target`, as two int64 halves (numpy-sortable)."""
    digests = [
        hashlib.blake2b(f"{s}\t{t}".encode(), digest_size=16).digest()
        for s, t in zip(batch["src"], batch["tgt"], strict=True)
    ]
    return {
        "hash_hi": [int.from_bytes(d[:8], "little", signed=True) for d in digests],
        "hash_lo": [int.from_bytes(d[8:], "little", signed=True) for d in digests],
    }


HASH_FEATURES = datasets.Features({"hash_hi": datasets.Value("int64"), "hash_lo": datasets.Value("int64")})


def normalize(ds: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
    return ds.map(_normalize_batch, batched=True, num_proc=num_proc, desc="normalize whitespace")


def first_occurrences(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """Ascending indices [K] of the first row of each distinct (hi, lo) pair among rows [N].

    A stable sort puts equal pairs next to each other in row order, so each run's first element is
    the earliest occurrence; then the kept rows are put back in corpus order.
    """
    order = np.lexsort((lo, hi))  # [N] stable: ties keep row order
    ordered_hi, ordered_lo = hi[order], lo[order]
    starts = np.ones(len(order), dtype=bool)  # [N] first of its run in sorted order
    starts[1:] = (ordered_hi[1:] != ordered_hi[:-1]) | (ordered_lo[1:] != ordered_lo[:-1])
    return np.sort(order[starts])


def clean_text(
    ds: datasets.Dataset, config: CleaningConfig, num_proc: int | None = None
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Apply the text filters; returns the kept pairs and {filter: pairs dropped}."""
    dropped: dict[str, int] = {}
    if config.normalize_whitespace:
        ds = normalize(ds, num_proc)
    if config.drop_empty:
        before = len(ds)
        ds = ds.filter(_not_empty, batched=True, num_proc=num_proc, desc="drop empty pairs")
        dropped["empty"] = before - len(ds)
    if config.dedup:
        before = len(ds)
        hashes = ds.map(
            _pair_hash,
            batched=True,
            num_proc=num_proc,
            remove_columns=ds.column_names,
            features=HASH_FEATURES,
            desc="hash pairs",
        )
        digest = read_columns(hashes, ["hash_hi", "hash_lo"])
        ds = ds.select(first_occurrences(digest["hash_hi"], digest["hash_lo"]))
        dropped["duplicate"] = before - len(ds)
    return ds, dropped


def length_mask(
    src_len: np.ndarray, tgt_len: np.ndarray, config: CleaningConfig
) -> tuple[np.ndarray, dict[str, int]]:
    """Pairs to keep [N] (bool) under the length cap, then the ratio, with the drops of each in turn."""
    keep = np.ones(len(src_len), dtype=bool)
    dropped: dict[str, int] = {}
    if config.max_tokens_per_sentence is not None:
        keep = (src_len <= config.max_tokens_per_sentence) & (tgt_len <= config.max_tokens_per_sentence)
        dropped["too_long"] = int((~keep).sum())
    if config.max_length_ratio is not None:
        longer, shorter = np.maximum(src_len, tgt_len), np.minimum(src_len, tgt_len)
        ratio_ok = longer <= config.max_length_ratio * shorter
        dropped["length_ratio"] = int((keep & ~ratio_ok).sum())
        keep &= ratio_ok
    return keep, dropped


def filter_lengths(
    ds: datasets.Dataset, config: CleaningConfig, num_proc: int | None = None
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Drop encoded pairs over the length cap, then over the length ratio; needs `src_len`/`tgt_len`.

    Decided on whole numpy columns (one Arrow read), not row by row; `num_proc` is unused.
    """
    del num_proc
    columns = read_columns(ds, ["src_len", "tgt_len"])
    keep, dropped = length_mask(columns["src_len"], columns["tgt_len"], config)
    if keep.all():
        return ds, dropped
    return ds.select(np.flatnonzero(keep)), dropped

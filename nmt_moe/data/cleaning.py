"""Corpus cleaning filters, each one switchable, each one counted.

Text filters run before SentencePiece training (whitespace, empty pairs, duplicates); length filters run on
the encoded pairs, so "too long" is measured in the same tokens the batch budget counts. Every filter
reports how many pairs it dropped, in the order the filters ran.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets


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


def _pair_hash(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    return {
        "pair_hash": [
            hashlib.blake2b(f"{s}\t{t}".encode(), digest_size=16).hexdigest()
            for s, t in zip(batch["src"], batch["tgt"], strict=True)
        ]
    }


def normalize(ds: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
    return ds.map(_normalize_batch, batched=True, num_proc=num_proc, desc="normalize whitespace")


def _first_occurrences(hashes: list[str]) -> list[int]:
    seen: set[str] = set()
    keep = []
    for index, value in enumerate(hashes):
        if value not in seen:
            seen.add(value)
            keep.append(index)
    return keep


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
            _pair_hash, batched=True, num_proc=num_proc, remove_columns=ds.column_names, desc="hash pairs"
        )
        ds = ds.select(_first_occurrences(hashes["pair_hash"]))
        dropped["duplicate"] = before - len(ds)
    return ds, dropped


def _length_ok(batch: dict[str, list[int]], max_len: int | None, max_ratio: float | None) -> list[bool]:
    keep = []
    for s, t in zip(batch["src_len"], batch["tgt_len"], strict=True):
        ok = max_len is None or (s <= max_len and t <= max_len)
        if ok and max_ratio is not None:
            ok = max(s, t) <= max_ratio * min(s, t)
        keep.append(ok)
    return keep


def filter_lengths(
    ds: datasets.Dataset, config: CleaningConfig, num_proc: int | None = None
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Drop encoded pairs over the length cap, then over the length ratio; needs `src_len`/`tgt_len`."""
    dropped: dict[str, int] = {}
    if config.max_tokens_per_sentence is not None:
        before = len(ds)
        ds = ds.filter(
            _length_ok,
            batched=True,
            num_proc=num_proc,
            fn_kwargs={"max_len": config.max_tokens_per_sentence, "max_ratio": None},
            desc="drop long pairs",
        )
        dropped["too_long"] = before - len(ds)
    if config.max_length_ratio is not None:
        before = len(ds)
        ds = ds.filter(
            _length_ok,
            batched=True,
            num_proc=num_proc,
            fn_kwargs={"max_len": None, "max_ratio": config.max_length_ratio},
            desc="drop pairs over length ratio",
        )
        dropped["length_ratio"] = before - len(ds)
    return ds, dropped

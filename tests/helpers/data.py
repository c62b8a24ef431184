"""Synthetic corpora the data, training and recipe tests write, and the SentencePiece sample as strings."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import datasets

from nmt_moe.data.pipeline import _sample_arrays

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pu", "gra", "sho", "tek", "bel"]


def write_corpus(
    directory: Path, name: str, n: int, seed: int, langs: tuple[str, str] = ("en", "de"), min_words: int = 1
) -> str:
    """n synthetic pairs (target = source words reversed, spelled backwards) at directory/name.{src,tgt}."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(150)]
    src_lines, tgt_lines = [], []
    for _ in range(n):
        sentence = [rng.choice(words) for _ in range(rng.randint(min_words, 14))]
        src_lines.append(" ".join(sentence))
        tgt_lines.append(" ".join(w[::-1] for w in reversed(sentence)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.{langs[0]}").write_text("\n".join(src_lines) + "\n", encoding="utf-8")
    (directory / f"{name}.{langs[1]}").write_text("\n".join(tgt_lines) + "\n", encoding="utf-8")
    return str(directory / name)


def write_wmt_layout(directory: Path, src: str, tgt: str, lines: int = 300) -> None:
    """A toy word-for-word language pair in WMT file layout: train, newstest2013, newstest2014."""
    rng = random.Random(0)
    words = "the a man woman dog cat red big small house park runs sees eats in and with ball".split()
    lexicon = {w: w[::-1] + "x" for w in words}
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", lines), ("newstest2013", 30), ("newstest2014", 30)):
        pairs = [[rng.choice(words) for _ in range(rng.randint(3, 9))] for _ in range(n)]
        (directory / f"{name}.{src}").write_text("".join(" ".join(p).capitalize() + " .\n" for p in pairs))
        translated = (" ".join(lexicon[w] for w in p).capitalize() + " .\n" for p in pairs)
        (directory / f"{name}.{tgt}").write_text("".join(translated))


def spm_sample(ds: datasets.Dataset, columns: tuple[str, ...], size: int, seed: int) -> Iterator[str]:
    """The SentencePiece sample (see `_sample_arrays`) as Python strings, in the order it is drawn."""
    for array in _sample_arrays(ds, columns, size, seed):
        yield from array.to_pylist()

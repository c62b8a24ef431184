"""Writes the synthetic copy task of the tiny_copy recipe: the target is the source sentence itself.

Sentences are 3-6 words drawn from 32 made-up syllables, so a SentencePiece unigram model of 56 pieces holds
every word as one piece and the task is a pure sequence copy.
Usage: `python recipes/tiny_copy/make_data.py data/tiny_copy`.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

WORDS = (
    "lo ve zi pi lu pa ne te si me po bo le su fe ku di fa ga ko ze fi bi ba gi la be vo ri re fu pu".split()
)
SIZES = {"train": 2000, "valid": 100, "test": 100}


def write_copy_task(out_dir: str | Path, seed: int = 0, src_lang: str = "src", tgt_lang: str = "tgt") -> Path:
    """Writes `<split>.<src_lang>` and `<split>.<tgt_lang>` for train/valid/test; returns `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, size in SIZES.items():
        lines = [" ".join(rng.choices(WORDS, k=rng.randint(3, 6))) for _ in range(size)]
        text = "\n".join(lines) + "\n"
        (out / f"{split}.{src_lang}").write_text(text)
        (out / f"{split}.{tgt_lang}").write_text(text)
    return out


if __name__ == "__main__":
    write_copy_task(sys.argv[1] if len(sys.argv) > 1 else "data/tiny_copy")

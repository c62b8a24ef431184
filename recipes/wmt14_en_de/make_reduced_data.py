"""A WMT'14-shaped corpus for `run.sh --reduced`, built deterministically from Multi30k.

Writes DIR/train.{en,TGT} (`--pairs` lines, each 1-3 random Multi30k training pairs joined, the same draws
on both sides: `scripts/bench_data.py`'s builder), DIR/newstest2013.* from Multi30k val and
DIR/newstest2014.* from Multi30k test_2016_flickr: the file layout run.sh reads for WMT'14. The two test
sets are built the same way as the training set (as many lines as the Multi30k split has sentences, each
1-3 of its pairs drawn at random and joined; seeds seed+1 and seed+2), so training, validation and test
lines have the same shape, as in real WMT where a line may hold several sentences. Their sentences come
from Multi30k's val and test splits only, so they stay disjoint from the training lines. A model trained
on joined lines and tested on single sentences (the previous layout) learns to run on past the end of a
sentence: its hypotheses were 1.6x the references' length (README.md, "WMT'14 on GPUs").

    python recipes/wmt14_en_de/make_reduced_data.py DIR --tgt de [--pairs 100000] [--multi30k PATH]

Bad input (a missing Multi30k file, a bad language or count): one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MULTI30K = REPO.parent / "shared" / "data" / "multi30k"


def bench_data() -> ModuleType:
    """scripts/bench_data.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "scripts" / "bench_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_reduced_data(out: Path, multi30k: Path, tgt: str, pairs: int, seed: int = 0) -> Path:
    """The WMT layout under `out` (see the module docstring); deterministic in its arguments."""
    out.mkdir(parents=True, exist_ok=True)
    make_corpus = bench_data().make_corpus
    make_corpus(multi30k / "train.en", multi30k / f"train.{tgt}", pairs, out / "train", seed)
    tests = (("val", "newstest2013"), ("test_2016_flickr", "newstest2014"))
    for offset, (split, name) in enumerate(tests, start=1):
        src, ref = multi30k / f"{split}.en", multi30k / f"{split}.{tgt}"
        lines = len(src.read_text(encoding="utf-8").splitlines())
        make_corpus(src, ref, lines, out / name, seed + offset)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="directory to write the WMT-layout files to")
    parser.add_argument("--tgt", required=True, help="target language: de or fr (the source is en)")
    parser.add_argument("--pairs", type=int, default=100_000, help="training lines (default 100000)")
    parser.add_argument("--multi30k", type=Path, default=DEFAULT_MULTI30K, help="Multi30k directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        print(f"make_reduced_data: error: --pairs must be >= 1, got {args.pairs}", file=sys.stderr)
        return 2
    needed = [args.multi30k / f"{split}.{lang}" for split in ("train", "val", "test_2016_flickr")
              for lang in ("en", args.tgt)]  # fmt: skip
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        print(f"make_reduced_data: error: missing Multi30k file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    make_reduced_data(args.out, args.multi30k, args.tgt, args.pairs, args.seed)
    print(f"wrote {args.pairs} training pairs and newstest2013/2014 (en-{args.tgt}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

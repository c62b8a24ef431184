"""scripts/bench_data.py: the WMT-sized corpus it builds is deterministic and made of Multi30k pairs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench_module():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("bench_data", REPO / "scripts" / "bench_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_data"] = module
    spec.loader.exec_module(module)
    return module


def test_recombined_corpus_is_deterministic_and_parallel(multi30k: Path, tmp_path: Path) -> None:
    bench = _bench_module()
    src, tgt = multi30k / "train.en", multi30k / "train.de"
    a = bench.make_corpus(src, tgt, 3000, tmp_path / "a" / "x")
    b = bench.make_corpus(src, tgt, 3000, tmp_path / "b" / "x")
    for lang in ("en", "de"):
        assert Path(f"{a}.{lang}").read_bytes() == Path(f"{b}.{lang}").read_bytes()
    en = Path(f"{a}.en").read_text(encoding="utf-8").splitlines()
    de = Path(f"{a}.de").read_text(encoding="utf-8").splitlines()
    assert len(en) == len(de) == 3000
    pairs = dict(
        zip(
            src.read_text(encoding="utf-8").splitlines(),
            tgt.read_text(encoding="utf-8").splitlines(),
            strict=True,
        )
    )
    first = en[0]
    assert any(first.startswith(s) and de[0].startswith(pairs[s]) for s in pairs if s)  # joined real pairs

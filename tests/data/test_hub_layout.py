"""The hub route, offline, against a local directory laid out like `wmt/wmt14`: Parquet shards named by
config and split, and a README whose `configs:` maps them. Same pairs as text files -> same data."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nmt_moe.data.pipeline import PipelineConfig, prepare
from nmt_moe.data.sources import load_hub

README = """---
dataset_info:
- config_name: de-en
  features:
  - name: translation
    dtype:
      translation:
        languages:
        - de
        - en
configs:
- config_name: de-en
  data_files:
  - split: train
    path: de-en/train-*
  - split: validation
    path: de-en/validation-*
  - split: test
    path: de-en/test-*
---
# A local stand-in for wmt/wmt14 (same layout, tiny)
"""

WORDS = ["haus", "baum", "katze", "hund", "rot", "blau", "gross", "klein", "und", "der", "ein", "see"]


def _pairs(n: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        de = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
        rows.append({"de": de, "en": " ".join(w[::-1] for w in de.split())})
    return rows


def write_hub_layout(root: Path, splits: dict[str, list[dict[str, str]]], shards: int = 3) -> Path:
    """root/README.md + root/de-en/{split}-0000i-of-0000n.parquet, rows split over `shards` files."""
    (root / "de-en").mkdir(parents=True)
    (root / "README.md").write_text(README)
    for split, rows in splits.items():
        n = shards if split == "train" else 1
        step = -(-len(rows) // n)
        for i in range(n):
            table = pa.table({"translation": rows[i * step : (i + 1) * step]})
            pq.write_table(table, root / "de-en" / f"{split}-{i:05d}-of-{n:05d}.parquet")
    return root


def write_text(prefix: Path, rows: list[dict[str, str]]) -> str:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for lang in ("en", "de"):
        Path(f"{prefix}.{lang}").write_text("".join(r[lang] + "\n" for r in rows), encoding="utf-8")
    return str(prefix)


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, list[dict[str, str]]]:
    rng = random.Random(0)
    return {"train": _pairs(900, rng), "validation": _pairs(30, rng), "test": _pairs(20, rng)}


def test_local_hub_directory_loads_offline(tmp_path: Path, corpus: dict) -> None:
    root = write_hub_layout(tmp_path / "wmt14", corpus)
    ds = load_hub(str(root), "de-en", "train", "en", "de", cache_dir=tmp_path / "hf")
    assert ds["src"][:] == [r["en"] for r in corpus["train"]]  # shards read in order
    assert ds["tgt"][:] == [r["de"] for r in corpus["train"]]


def test_hub_layout_prepares_the_same_data_as_text_files(tmp_path: Path, corpus: dict) -> None:
    root = write_hub_layout(tmp_path / "wmt14", corpus)
    text = {
        split: write_text(tmp_path / "text" / split, rows)
        for split, rows in (
            ("train", corpus["train"]),
            ("valid", corpus["validation"]),
            ("test", corpus["test"]),
        )
    }
    common = dict(src_lang="en", tgt_lang="de", vocab_size=40, spm_model_type="unigram", spm_num_threads=2)
    hub = prepare(PipelineConfig(hub_dataset=str(root), hub_config="de-en", **common), tmp_path / "c1")
    local = prepare(
        PipelineConfig(train=(text["train"],), valid=text["valid"], test=text["test"], **common),
        tmp_path / "c2",
    )
    assert (hub.path / "tokenizer.model").read_bytes() == (local.path / "tokenizer.model").read_bytes()
    for split in ("train", "valid", "test"):
        a, b = hub.split(split), local.split(split)
        assert a is not None and b is not None
        assert a.features == b.features
        assert a.to_dict() == b.to_dict()
    assert hub.summary["splits"] == local.summary["splits"]


def test_local_hub_directory_files_key_the_cache(tmp_path: Path, corpus: dict) -> None:
    root = write_hub_layout(tmp_path / "wmt14", corpus)
    config = PipelineConfig(src_lang="en", tgt_lang="de", hub_dataset=str(root), hub_config="de-en")
    before = config.cache_key()
    shard = root / "de-en" / "test-00000-of-00001.parquet"
    pq.write_table(pa.table({"translation": corpus["test"][:5]}), shard)
    assert config.cache_key() != before

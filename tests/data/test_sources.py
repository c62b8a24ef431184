"""Local and hub corpus sources: formats, and clear errors for bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from nmt_moe.data import sources
from nmt_moe.data.sources import CorpusError, load_hub, load_local


def _write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def test_prefix_pairs_in_order(tmp_path: Path) -> None:
    _write(tmp_path / "train.en", "a cat\nthe dog\n")
    _write(tmp_path / "train.de", "eine Katze\nder Hund\n")
    ds = load_local(tmp_path / "train", "en", "de", cache_dir=tmp_path / "c")
    assert ds["src"][:] == ["a cat", "the dog"]
    assert ds["tgt"][:] == ["eine Katze", "der Hund"]


def test_tsv_and_jsonl(tmp_path: Path) -> None:
    _write(tmp_path / "pairs.tsv", "a cat\teine Katze\nthe dog\tder Hund\n")
    ds = load_local(tmp_path / "pairs.tsv", "en", "de", cache_dir=tmp_path / "c")
    assert list(zip(ds["src"], ds["tgt"], strict=True)) == [("a cat", "eine Katze"), ("the dog", "der Hund")]
    rows = [{"de": "eine Katze", "en": "a cat"}, {"translation": {"en": "the dog", "de": "der Hund"}}]
    _write(tmp_path / "pairs.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_local(tmp_path / "pairs.jsonl", "en", "de", cache_dir=tmp_path / "c")
    assert list(zip(ds["src"], ds["tgt"], strict=True)) == [("a cat", "eine Katze"), ("the dog", "der Hund")]


def test_line_count_mismatch_names_both_files_and_counts(tmp_path: Path) -> None:
    src = _write(tmp_path / "x.en", "a\nb\nc\n")
    tgt = _write(tmp_path / "x.de", "a\nb\n")
    with pytest.raises(CorpusError) as error:
        load_local(tmp_path / "x", "en", "de", cache_dir=tmp_path / "c")
    assert f"{src} has 3 lines" in str(error.value) and f"{tgt} has 2" in str(error.value)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    _write(tmp_path / "x.en", "a\nb\nc\n")
    bad = _write(tmp_path / "x.de", b"a\nb\n\xff\xfe c\n")
    with pytest.raises(CorpusError, match=f"{bad}:3: invalid UTF-8"):
        load_local(tmp_path / "x", "en", "de", cache_dir=tmp_path / "c")


def test_missing_files_and_malformed_rows(tmp_path: Path) -> None:
    _write(tmp_path / "x.en", "a\n")
    with pytest.raises(FileNotFoundError, match=r"missing: .*x\.de"):
        load_local(tmp_path / "x", "en", "de")
    _write(tmp_path / "bad.tsv", "ok\tgut\nno tab here\n")
    with pytest.raises(CorpusError, match=r"bad\.tsv:2: expected 2 tab-separated fields"):
        load_local(tmp_path / "bad.tsv", "en", "de", cache_dir=tmp_path / "c")
    _write(tmp_path / "bad.jsonl", '{"en": "a", "fr": "b"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:1: expected string values for keys 'en' and 'de'"):
        load_local(tmp_path / "bad.jsonl", "en", "de", cache_dir=tmp_path / "c")


def test_hub_offline_fails_at_once_saying_to_pass_local_files(monkeypatch: pytest.MonkeyPatch) -> None:
    # conftest sets HF_HUB_OFFLINE=1: an uncached hub set must fail fast with the hint.
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="pass local files"):
        load_hub("wmt/wmt14", "de-en", "valid", "en", "de")
    assert time.perf_counter() - start < 15


def test_hub_unreachable_fails_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_hub_offline", lambda: False)
    monkeypatch.setattr(sources, "_hub_reachable", lambda timeout=3.0: False)

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_dataset must not be called without a network")

    monkeypatch.setattr(sources.datasets, "load_dataset", never)
    with pytest.raises(ConnectionError, match="cannot reach huggingface.co .* pass local files"):
        load_hub("wmt/wmt16", "ro-en", "train", "en", "ro")


def test_hub_rows_become_src_tgt(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = datasets.Dataset.from_dict(
        {"translation": [{"de": "Hallo", "en": "Hello"}, {"de": "Welt", "en": "World"}]}
    )
    seen = {}

    def fake_load(name: str, config: str, split: str, cache_dir: object = None) -> datasets.Dataset:
        seen.update(name=name, config=config, split=split)
        return rows

    monkeypatch.setattr(sources.datasets, "load_dataset", fake_load)
    ds = load_hub("wmt/wmt14", "de-en", "valid", "de", "en")
    assert seen == {"name": "wmt/wmt14", "config": "de-en", "split": "validation"}
    assert ds["src"][:] == ["Hallo", "Welt"] and ds["tgt"][:] == ["Hello", "World"]
    with pytest.raises(ValueError, match="does not hold the pair en-ro"):
        load_hub("wmt/wmt14", "de-en", "train", "en", "ro")

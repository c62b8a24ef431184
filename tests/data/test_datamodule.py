"""TranslationDataModule end to end on corpora the tests write, plus Multi30k where present."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import pytest
from helpers.data import write_corpus

from nmt_moe.data import pipeline
from nmt_moe.data.cleaning import CleaningConfig
from nmt_moe.data.datamodule import TranslationDataModule
from nmt_moe.data.pipeline import PipelineConfig
from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, lang_token


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, str]:
    return {
        "train": write_corpus(tmp_path / "corpus", "train", 600, seed=0),
        "valid": write_corpus(tmp_path / "corpus", "valid", 50, seed=1),
        "test": write_corpus(tmp_path / "corpus", "test", 40, seed=2),
    }


PIPELINE_KEYS = {f.name for f in dataclasses.fields(PipelineConfig)}
CLEANING_KEYS = {f.name for f in dataclasses.fields(CleaningConfig)}


def data_module(**settings: object) -> TranslationDataModule:
    """The data module of flat settings (the tests vary one at a time): each goes to its section."""
    pipeline = {key: settings.pop(key) for key in list(settings) if key in PIPELINE_KEYS}
    cleaning = {key: settings.pop(key) for key in list(settings) if key in CLEANING_KEYS}
    return TranslationDataModule(PipelineConfig(**pipeline, cleaning=CleaningConfig(**cleaning)), **settings)


def make_dm(corpus: dict[str, str], cache: Path, **overrides: object) -> TranslationDataModule:
    settings: dict = dict(
        src_lang="en",
        tgt_lang="de",
        cache_dir=str(cache),
        vocab_size=200,
        spm_model_type="bpe",
        max_tokens=300,
    )
    settings.update(corpus)
    settings.update(overrides)
    dm = data_module(**settings)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _strip(row: list[int]) -> list[int]:
    return [t for t in row if t not in (PAD_ID, BOS_ID, EOS_ID)]


def test_eval_batches_match_the_format_and_references(corpus: dict[str, str], tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path / "cache")
    refs, srcs = dm.references("valid"), dm.sources("valid")
    assert refs[0] == Path(corpus["valid"] + ".de").read_text().splitlines()[0]
    seen = []
    for batch in dm.val_dataloader():
        src, lengths, tgt = batch["src"], batch["src_lengths"], batch["tgt"]
        assert src.dtype == tgt.dtype == lengths.dtype == batch["index"].dtype
        for i, index in enumerate(batch["index"].tolist()):
            n = int(lengths[i])
            assert (
                src[i, n - 1] == EOS_ID and (src[i, n:] == PAD_ID).all() and (src[i, : n - 1] > EOS_ID).all()
            )
            row = tgt[i].tolist()
            assert row[0] == BOS_ID and row[len(_strip(row)) + 1] == EOS_ID
            assert dm.tokenizer.decode([_strip(row)]) == [refs[index]]
            assert dm.tokenizer.decode([_strip(src[i].tolist())]) == [srcs[index]]
            seen.append(index)
    assert sorted(seen) == list(range(50))


def test_train_epoch_covers_every_pair_once_within_budget(corpus: dict[str, str], tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path / "cache")
    loader = dm.train_dataloader()
    seen = []
    for batch in loader:
        assert batch["src"].shape[0] * max(batch["src"].shape[1], batch["tgt"].shape[1]) <= 300
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(600))
    assert dm.prepared is not None and dm.prepared.summary["splits"]["train"]["pairs"] == 600


def test_second_run_is_a_cache_hit(
    corpus: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = make_dm(corpus, tmp_path / "cache")
    assert first.prepared is not None and not first.prepared.from_cache

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("SentencePiece retrained on an identical run")

    monkeypatch.setattr(pipeline, "train_tokenizer", no_training)
    monkeypatch.setattr(pipeline, "_build", no_training)
    second = make_dm(corpus, tmp_path / "cache", max_tokens=500, seed=9)  # batching settings: same cache
    assert second.prepared is not None and second.prepared.from_cache
    assert second.prepared.path == first.prepared.path
    assert second.tokenizer.to_bytes() == first.tokenizer.to_bytes()


def test_cache_key_follows_settings_and_files(corpus: dict[str, str], tmp_path: Path) -> None:
    base = make_dm(corpus, tmp_path / "cache").config.cache_key()
    for change in (
        {"vocab_size": 150},
        {"dedup": True},
        {"max_length_ratio": 2.0},
        {"spm_model_type": "unigram"},
    ):
        assert data_module(src_lang="en", tgt_lang="de", **corpus, **change).config.cache_key() != base, (
            change
        )
    source = Path(corpus["train"] + ".en")
    os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 10**9))
    assert (
        data_module(
            src_lang="en", tgt_lang="de", **corpus, vocab_size=200, spm_model_type="bpe"
        ).config.cache_key()
        != base
    )


def test_target_language_token_prefixes_every_source(corpus: dict[str, str], tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path / "cache", target_lang_token=True)
    tag = dm.src_tokenizer.token_id(lang_token("de"))
    assert tag > EOS_ID
    batch = next(iter(dm.train_dataloader()))
    assert (batch["src"][:, 0] == tag).all()
    assert (batch["tgt"][:, 1:] != tag).all()
    assert dm.prepared is not None and dm.prepared.summary["vocab_size"] == 200


def test_separate_vocabularies(corpus: dict[str, str], tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path / "cache", joint_vocab=False)
    assert dm.src_tokenizer.to_bytes() != dm.tokenizer.to_bytes()
    assert dm.src_tokenizer.vocab_size == dm.tokenizer.vocab_size == 200
    batch = next(iter(dm.val_dataloader()))
    index = int(batch["index"][0])
    assert dm.src_tokenizer.decode([_strip(batch["src"][0].tolist())]) == [dm.sources("valid")[index]]
    assert dm.tokenizer.decode([_strip(batch["tgt"][0].tolist())]) == [dm.references("valid")[index]]


def test_max_valid_sentences_caps_loader_and_references(corpus: dict[str, str], tmp_path: Path) -> None:
    dm = make_dm(corpus, tmp_path / "cache", max_valid_sentences=7)
    assert len(dm.references("valid")) == 7
    assert sorted(i for b in dm.val_dataloader() for i in b["index"].tolist()) == list(range(7))


def test_bad_input_fails_before_training(corpus: dict[str, str], tmp_path: Path) -> None:
    long_only = write_corpus(tmp_path / "long", "train", 100, seed=3, min_words=5)
    with pytest.raises(ValueError, match="empty after length filtering"):
        make_dm({"train": long_only}, tmp_path / "c1", max_tokens_per_sentence=4)
    with pytest.raises(ValueError, match="vocab_size 100000 is too large"):
        make_dm(corpus, tmp_path / "c2", vocab_size=100_000)
    with pytest.raises(ValueError, match="max_tokens=100 cannot hold"):
        make_dm(corpus, tmp_path / "c3", max_tokens=100)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dm({**corpus, "train": str(tmp_path / "nowhere")}, tmp_path / "c4")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.en").write_text("\n \n")
    (empty / "e.de").write_text("x\n\n")
    with pytest.raises(ValueError, match="empty after cleaning"):
        make_dm({"train": str(empty / "e")}, tmp_path / "c5")
    assert not [p for name in ("c1", "c2", "c5") for p in (tmp_path / name).glob("*/summary.json")]


def test_multi30k_padding_under_ten_percent(multi30k: Path, tmp_path: Path) -> None:
    dm = make_dm(
        {"train": str(multi30k / "train"), "valid": str(multi30k / "val")},
        tmp_path / "cache",
        vocab_size=8000,
        spm_input_sentence_size=4000,  # SentencePiece samples 4k sentences: fast, still a real vocab
        max_tokens=4096,
    )
    assert len(dm.splits["train"]) == 29000
    fraction = dm.padding_fraction("train")
    assert 0.0 < fraction < 0.10
    refs = dm.references("valid")
    assert refs[0] == (multi30k / "val.de").read_text(encoding="utf-8").splitlines()[0].strip()


def test_parallel_preparation_matches_serial(corpus: dict[str, str], tmp_path: Path) -> None:
    serial = make_dm(corpus, tmp_path / "serial")
    parallel = make_dm(corpus, tmp_path / "parallel", num_proc=2)
    assert parallel.tokenizer.to_bytes() == serial.tokenizer.to_bytes()
    for split in ("train", "valid", "test"):
        assert parallel.splits[split]["src_ids"][:] == serial.splits[split]["src_ids"][:]
        assert parallel.splits[split]["tgt_ids"][:] == serial.splits[split]["tgt_ids"][:]


def test_hub_source_feeds_the_same_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    from nmt_moe.data import sources

    rng = random.Random(0)
    words = ["haus", "baum", "katze", "hund", "rot", "blau", "gross", "klein", "und", "der"]

    def rows(n: int) -> datasets.Dataset:
        pairs = []
        for _ in range(n):
            de = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            pairs.append({"de": de, "en": de.upper()})
        return datasets.Dataset.from_dict({"translation": pairs})

    splits = {"train": rows(300), "validation": rows(20), "test": rows(10)}
    monkeypatch.setattr(sources, "_hub_offline", lambda: True)
    monkeypatch.setattr(
        sources.datasets, "load_dataset", lambda name, config, split, cache_dir=None: splits[split]
    )
    dm = make_dm({"hub_dataset": "wmt/wmt16", "hub_config": "de-en"}, tmp_path / "cache", vocab_size=60)
    assert {split: len(ds) for split, ds in dm.splits.items()} == {"train": 300, "valid": 20, "test": 10}
    assert dm.sources("valid") == [t["en"] for t in splits["validation"]["translation"]]
    assert dm.references("test") == [t["de"] for t in splits["test"]["translation"]]

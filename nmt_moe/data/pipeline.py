"""Corpus -> cleaned text -> SentencePiece -> encoded splits, cached on disk under a key of every setting.

`prepare(config)` returns a `PreparedData` directory; a second call with the same settings and unchanged
input files finds it by key and neither retrains SentencePiece nor re-encodes. The directory holds:

    tokenizer.model  (or tokenizer.src.model + tokenizer.tgt.model when joint_vocab=False)
    train/ valid/ test/   `datasets` saved to disk: src_ids, tgt_ids, src_len, tgt_len (+ src, tgt text
                          for valid/test, the references)
    summary.json     counts per filter, vocab size, tokens per side; written last, marks the cache complete
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from nmt_moe.data.cleaning import CleaningConfig, clean_text, filter_lengths, normalize
from nmt_moe.data.sources import file_stamp, load_hub, load_local, local_files
from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, Tokenizer, lang_token, train_tokenizer

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
CACHE_VERSION = 1


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that changes the prepared data; its fields (plus input file stamps) form the cache key."""

    src_lang: str
    tgt_lang: str | tuple[str, ...]  # several: one-to-many multilingual, each source tagged <2xx>
    train: tuple[str, ...] = ()  # local corpora concatenated (prefixes, .tsv or .jsonl)
    valid: str | None = None
    test: str | None = None
    hub_dataset: str | None = None  # e.g. "wmt/wmt14"; used for splits not given as local files
    hub_config: str | None = None  # e.g. "de-en"
    vocab_size: int = 8000
    spm_model_type: str = "unigram"
    character_coverage: float = 1.0
    byte_fallback: bool = False
    joint_vocab: bool = True
    spm_input_sentence_size: int = 2_000_000
    target_lang_token: bool = False
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)

    def __post_init__(self) -> None:
        if not self.train and not self.hub_dataset:
            raise ValueError("no training data: give train (local files) or hub_dataset/hub_config")
        if self.hub_dataset and not self.hub_config:
            raise ValueError(f"hub_dataset {self.hub_dataset!r} needs hub_config, e.g. 'de-en'")
        if not self.tgt_langs or len(set(self.tgt_langs)) != len(self.tgt_langs):
            raise ValueError(
                f"tgt_lang must name one language or several distinct ones, got {self.tgt_lang!r}"
            )
        if self.src_lang in self.tgt_langs:
            raise ValueError(f"src_lang and tgt_lang are both {self.src_lang!r}")
        if self.multilingual and self.hub_dataset:
            raise ValueError(
                f"several target languages {self.tgt_langs} read local files only; hub_dataset must be unset"
            )

    @property
    def tgt_langs(self) -> tuple[str, ...]:
        return (self.tgt_lang,) if isinstance(self.tgt_lang, str) else tuple(self.tgt_lang)

    @property
    def multilingual(self) -> bool:
        """One source language into several targets: every split holds one corpus per target language."""
        return not isinstance(self.tgt_lang, str)

    @property
    def tags_target(self) -> bool:
        """Whether sources carry a `<2xx>` tag: asked for, or implied by several target languages."""
        return self.target_lang_token or self.multilingual

    def split_source(self, split: str) -> tuple[str, ...] | None:
        """Local corpora of a split, or None when it comes from the hub (or is absent)."""
        local = {
            "train": self.train,
            "valid": (self.valid,) if self.valid else (),
            "test": (self.test,) if self.test else (),
        }
        return local[split] or None

    def has_split(self, split: str) -> bool:
        return self.split_source(split) is not None or self.hub_dataset is not None

    def input_files(self) -> list[Path]:
        return [
            f
            for split in SPLITS
            for spec in self.split_source(split) or ()
            for tgt_lang in self.tgt_langs
            for f in local_files(spec, self.src_lang, tgt_lang)
        ]

    def cache_key(self) -> str:
        """Hash of the settings and of the input files' paths, sizes and mtimes."""
        payload = {
            "version": CACHE_VERSION,
            "config": dataclasses.asdict(self),
            "files": file_stamp(self.input_files()),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class PreparedData:
    """A complete cache directory: tokenizers, encoded splits, and the summary of how they were made."""

    path: Path
    summary: dict[str, Any]
    from_cache: bool

    @property
    def src_tokenizer(self) -> Tokenizer:
        joint = self.path / "tokenizer.model"
        return Tokenizer.load(joint if joint.exists() else self.path / "tokenizer.src.model")

    @property
    def tgt_tokenizer(self) -> Tokenizer:
        joint = self.path / "tokenizer.model"
        return Tokenizer.load(joint if joint.exists() else self.path / "tokenizer.tgt.model")

    def split(self, name: str) -> datasets.Dataset | None:
        path = self.path / name
        return datasets.load_from_disk(str(path)) if path.exists() else None


def default_cache_dir() -> Path:
    return Path(os.environ.get("NMT_MOE_CACHE", Path.home() / ".cache" / "nmt_moe"))


def load_split(
    config: PipelineConfig, split: str, work_dir: Path, num_proc: int | None
) -> datasets.Dataset | None:
    """The split's pairs; with several target languages, language after language (each corpus read once
    per target language) with a `tgt_lang` column saying which."""
    specs = config.split_source(split)
    if specs is not None:
        parts = []
        for tgt_lang in config.tgt_langs:
            for spec in specs:
                part = load_local(spec, config.src_lang, tgt_lang, cache_dir=work_dir / "raw")
                if config.multilingual:
                    part = part.add_column("tgt_lang", [tgt_lang] * len(part))
                parts.append(part)
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if config.hub_dataset:
        assert config.hub_config is not None and isinstance(config.tgt_lang, str)
        # The HF cache (not work_dir) keeps the download across settings changes.
        return load_hub(config.hub_dataset, config.hub_config, split, config.src_lang, config.tgt_lang)
    return None


def _column_text(ds: datasets.Dataset, columns: tuple[str, ...]) -> Iterator[str]:
    for batch in ds.select_columns(list(columns)).iter(batch_size=10_000):
        for column in columns:
            yield from batch[column]


def _encode_batch(
    batch: dict[str, list[str]], src_tok: Tokenizer, tgt_tok: Tokenizer, src_prefix: dict[str, list[int]]
) -> dict[str, list]:
    """src_prefix: the tag ids by target language ("" when the batch has no `tgt_lang` column)."""
    langs = batch.get("tgt_lang") or [""] * len(batch["src"])
    encoded = src_tok.encode(batch["src"], num_threads=1)
    src = [src_prefix[lang] + ids + [EOS_ID] for ids, lang in zip(encoded, langs, strict=True)]
    tgt = [[BOS_ID] + ids + [EOS_ID] for ids in tgt_tok.encode(batch["tgt"], num_threads=1)]
    return {
        "src_ids": src,
        "tgt_ids": tgt,
        "src_len": [len(s) for s in src],
        "tgt_len": [len(t) for t in tgt],
    }


def _train_tokenizers(config: PipelineConfig, train: datasets.Dataset) -> tuple[Tokenizer, Tokenizer]:
    symbols = [lang_token(lang) for lang in config.tgt_langs] if config.tags_target else []
    kwargs = {
        "model_type": config.spm_model_type,
        "character_coverage": config.character_coverage,
        "byte_fallback": config.byte_fallback,
        "input_sentence_size": config.spm_input_sentence_size,
    }
    if config.joint_vocab:
        joint = train_tokenizer(
            _column_text(train, ("src", "tgt")), config.vocab_size, user_defined_symbols=symbols, **kwargs
        )
        return joint, joint
    src = train_tokenizer(
        _column_text(train, ("src",)), config.vocab_size, user_defined_symbols=symbols, **kwargs
    )
    return src, train_tokenizer(_column_text(train, ("tgt",)), config.vocab_size, **kwargs)


def _build(config: PipelineConfig, out: Path, num_proc: int | None) -> dict[str, Any]:
    work = out / "work"
    log.info("building %s", out)
    summary: dict[str, Any] = {
        "src_lang": config.src_lang,
        "tgt_lang": ",".join(config.tgt_langs),
        "splits": {},
    }
    raw = {split: load_split(config, split, work, num_proc) for split in SPLITS if config.has_split(split)}
    if raw.get("train") is None or len(raw["train"]) == 0:
        raise ValueError("the training corpus is empty")

    text: dict[str, datasets.Dataset] = {}
    filters: dict[str, dict[str, int]] = {}
    for split, ds in raw.items():
        assert ds is not None
        if split == "train":
            text[split], filters[split] = clean_text(ds, config.cleaning, num_proc)
            if len(text[split]) == 0:
                raise ValueError(f"the training corpus is empty after cleaning (dropped: {filters[split]})")
        else:  # evaluation sets keep every pair so scores stay comparable; only whitespace is normalised
            text[split] = normalize(ds, num_proc) if config.cleaning.normalize_whitespace else ds
            filters[split] = {}

    log.info("training SentencePiece on %d pairs", len(text["train"]))
    src_tok, tgt_tok = _train_tokenizers(config, text["train"])
    if config.joint_vocab:
        src_tok.save(out / "tokenizer.model")
    else:
        src_tok.save(out / "tokenizer.src.model")
        tgt_tok.save(out / "tokenizer.tgt.model")
    tags = {lang: [src_tok.token_id(lang_token(lang))] for lang in config.tgt_langs if config.tags_target}
    if config.multilingual:
        prefix = tags  # each row's own tag, by its tgt_lang column
    else:
        prefix = {"": tags.get(config.tgt_langs[0], [])}

    log.info("vocab of %d pieces; encoding", src_tok.vocab_size)
    for split, ds in text.items():
        keep_text = split != "train"
        encoded = ds.map(
            _encode_batch,
            batched=True,
            batch_size=2000,
            num_proc=num_proc,
            fn_kwargs={"src_tok": src_tok, "tgt_tok": tgt_tok, "src_prefix": prefix},
            remove_columns=None if keep_text else ["src", "tgt"],
            desc=f"encode {split}",
        )
        if split == "train":
            encoded, dropped = filter_lengths(encoded, config.cleaning, num_proc)
            filters[split].update(dropped)
            if len(encoded) == 0:
                raise ValueError(
                    f"the training corpus is empty after length filtering (dropped: {filters[split]})"
                )
        encoded.save_to_disk(str(out / split))
        summary["splits"][split] = {
            "pairs_in": len(raw[split]),
            "dropped": filters[split],
            "pairs": len(encoded),
            "src_tokens": int(sum(encoded["src_len"])),
            "tgt_tokens": int(sum(encoded["tgt_len"])),
        }
    summary["vocab_size"] = src_tok.vocab_size
    summary["spm_model_type"] = config.spm_model_type
    summary["joint_vocab"] = config.joint_vocab
    del raw, text
    shutil.rmtree(work, ignore_errors=True)
    return summary


def prepare(
    config: PipelineConfig, cache_dir: str | Path | None = None, num_proc: int | None = None
) -> PreparedData:
    """The prepared data for `config`, built now or found in `cache_dir` from an earlier identical run."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / config.cache_key()
    if (final / "summary.json").exists():
        return PreparedData(final, json.loads((final / "summary.json").read_text()), from_cache=True)
    building = root / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        summary = _build(config, building, num_proc)
        (building / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        (building / "summary.json").write_text(json.dumps(summary, indent=2))
        if final.exists():  # an incomplete leftover (no summary.json)
            shutil.rmtree(final)
        building.rename(final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return PreparedData(final, summary, from_cache=False)

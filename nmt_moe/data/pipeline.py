"""Corpus -> cleaned text -> SentencePiece -> encoded splits, cached on disk under a key of every setting.

`prepare(config)` returns a `PreparedData` directory; a second call with the same settings and unchanged
input files finds it by key and neither retrains SentencePiece nor re-encodes. The directory holds:

    tokenizer.model  (or tokenizer.src.model + tokenizer.tgt.model when joint_vocab=False)
    train/ valid/ test/   `datasets` saved to disk: src_ids, tgt_ids, src_len, tgt_len (+ src, tgt text
                          for valid/test, the references)
    summary.json     counts per filter, vocab size, tokens per side; written last, marks the cache complete

Ids are stored as uint16 when the vocabulary fits (<= 65,536 pieces), int32 otherwise; lengths as int32.
SentencePiece, the memory peak, trains from a sample file with the training corpus unmapped, so its
heap is the whole peak (docs/DATA.md).
Several builders of one key (DDP ranks, parallel jobs) take a file lock: one builds into a temporary
directory and renames it into place, the others wait and reuse it; a finished cache is never deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from filelock import FileLock, Timeout

from nmt_moe.data.cleaning import CleaningConfig, clean_text, filter_lengths, normalize
from nmt_moe.data.columns import read_columns
from nmt_moe.data.sources import file_digest, file_stamp, hub_local_files, load_hub, load_local, local_files
from nmt_moe.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    Tokenizer,
    default_threads,
    lang_token,
    train_tokenizer,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
CACHE_VERSION = 2  # 2: uint16/int32 ids, seeded SentencePiece on a numpy-drawn sample
UINT16_VOCAB = 1 << 16


@dataclass(frozen=True)
class PipelineConfig:
    """Everything that changes the prepared data; its fields (plus input file stamps) form the cache key.

    src_lang, tgt_lang: language codes; file suffixes for local prefixes, keys for JSONL and hub rows.
        A list of target languages trains one multilingual model (one-to-many, local files only): every
        corpus is read once per target language (`train.en` + `train.de`, `train.en` + `train.fr`, ...),
        each source tagged `<2xx>`, splits concatenated language after language.
    train: local training corpora (path prefix, .tsv or .jsonl); several are concatenated.
    valid, test: local evaluation corpora; where absent and `hub_dataset` is set, the hub's splits.
    hub_dataset, hub_config: e.g. "wmt/wmt14" and "de-en".
    vocab_size, spm_model_type, character_coverage, byte_fallback, joint_vocab: SentencePiece settings
        (joint_vocab=False trains one model per side, both of vocab_size pieces).
    spm_input_sentence_size: sentences SentencePiece trains on, drawn at random (seeded) from larger
        corpora without reading the rest; 0 uses every sentence (its memory grows with it: docs/DATA.md).
    spm_seed: seeds that draw, so the same data and settings give a byte-identical tokenizer.
    spm_num_threads: SentencePiece threads (default: the machine's cores); the model depends on it, so it
        is part of the cache key; fix it to share vocabularies across machines.
    target_lang_token: prepend `<2{tgt_lang}>` to every source (reserved as a SentencePiece symbol).
    cleaning: training-set filters (CleaningConfig); lengths count tokens as in the batch tensors.
    content_key: find the cache by the corpus files' bytes rather than their paths and mtimes, so a
        copied corpus is found (costs one read of the files per run).
    """

    src_lang: str
    tgt_lang: str | tuple[str, ...]  # several: one-to-many multilingual, each source tagged <2xx>
    train: str | tuple[str, ...] = ()  # local corpora concatenated (prefixes, .tsv or .jsonl)
    valid: str | None = None
    test: str | None = None
    hub_dataset: str | None = None  # e.g. "wmt/wmt14"; used for splits not given as local files
    hub_config: str | None = None  # e.g. "de-en"
    vocab_size: int = 8000
    spm_model_type: str = "unigram"
    character_coverage: float = 1.0
    byte_fallback: bool = False
    joint_vocab: bool = True
    spm_input_sentence_size: int = 1_000_000  # SentencePiece memory grows with it (docs/DATA.md)
    spm_seed: int = 0  # seeds the sentence sample SentencePiece trains on
    spm_num_threads: int | None = None  # None: the machine's cores; the model depends on it (see DATA.md)
    target_lang_token: bool = False
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    content_key: bool = False  # key by file contents, not paths and mtimes: a copied corpus is found

    def __post_init__(self) -> None:
        # Normal forms (a frozen dataclass sets them through object.__setattr__): one corpus may be given as
        # a string, lists (YAML) become tuples, a cleaning mapping (saved hyper-parameters) its dataclass.
        if isinstance(self.train, str):
            object.__setattr__(self, "train", (self.train,))
        object.__setattr__(self, "train", tuple(self.train or ()))
        if not isinstance(self.tgt_lang, str):
            object.__setattr__(self, "tgt_lang", tuple(self.tgt_lang))
        if isinstance(self.cleaning, Mapping):
            object.__setattr__(self, "cleaning", CleaningConfig(**self.cleaning))
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

    def split_files(self, split: str) -> list[Path]:
        """Local files a split reads (every target language), or the local hub directory's files."""
        specs = self.split_source(split)
        if specs is None:
            return hub_local_files(self.hub_dataset) if self.hub_dataset else []
        return [f for tgt in self.tgt_langs for spec in specs for f in local_files(spec, self.src_lang, tgt)]

    def input_files(self) -> list[Path]:
        return [f for split in SPLITS for f in self.split_files(split)]

    def cache_key(self) -> str:
        """Hash of the settings and of the input files: paths, sizes and mtimes, or with `content_key`
        their bytes alone (then the paths leave the key, so a copy elsewhere finds the same cache)."""
        config = dataclasses.asdict(self)
        config["spm_num_threads"] = self.spm_num_threads or default_threads()  # it changes the model
        if self.content_key:
            for split in SPLITS:
                config[split] = None
            if hub_local_files(self.hub_dataset or ""):
                config["hub_dataset"] = None
            files: Any = {split: file_digest(self.split_files(split)) for split in SPLITS}
        else:
            files = file_stamp(self.input_files())
        payload = {"version": CACHE_VERSION, "config": config, "files": files}
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
        # The HF cache (not work_dir) keeps a download across settings changes; a local directory
        # needs no download, so its Arrow copy lives (and is deleted) with the build.
        local = bool(hub_local_files(config.hub_dataset))
        return load_hub(
            config.hub_dataset,
            config.hub_config,
            split,
            config.src_lang,
            config.tgt_lang,
            cache_dir=work_dir / "hub" if local else None,
        )
    return None


def _column_arrays(ds: datasets.Dataset, columns: tuple[str, ...]) -> Iterator[pa.Array]:
    """The text of `columns` as Arrow arrays, 10,000 rows at a time (each batch: column after column)."""
    for batch in ds.select_columns(list(columns)).with_format("arrow").iter(batch_size=10_000):
        for column in columns:
            yield batch.column(column).combine_chunks()


def _sample_arrays(
    ds: datasets.Dataset, columns: tuple[str, ...], size: int, seed: int
) -> Iterator[pa.Array]:
    """At most `size` sentences of `columns`, drawn uniformly without replacement, as Arrow arrays.

    Row indices are drawn with numpy and only those rows are read from Arrow, so a corpus much larger
    than the sample never passes through Python; a corpus that fits is streamed whole.
    """
    rows = len(ds)
    if size <= 0 or rows * len(columns) <= size:
        yield from _column_arrays(ds, columns)
        return
    picked = np.sort(np.random.default_rng(seed).choice(rows * len(columns), size, replace=False))  # [size]
    for offset, column in enumerate(columns):
        chosen = picked[(picked >= offset * rows) & (picked < (offset + 1) * rows)] - offset * rows
        yield from _column_arrays(ds.select_columns([column]).select(chosen), (column,))


SAMPLE_SCHEMA = pa.schema([("text", pa.large_string())])


def write_spm_sample(ds: datasets.Dataset, columns: tuple[str, ...], size: int, seed: int, path: Path) -> int:
    """Write the SentencePiece sample to an Arrow stream file at `path`; returns its sentence count.

    On disk the sample costs no memory while SentencePiece trains, and the corpus can be unmapped
    first (its pages read by the draw would otherwise stay in RSS); Arrow keeps any text exactly.
    """
    count = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, SAMPLE_SCHEMA) as writer:
        for array in _sample_arrays(ds, columns, size, seed):
            writer.write_batch(pa.record_batch([array.cast(pa.large_string())], schema=SAMPLE_SCHEMA))
            count += len(array)
    return count


def read_spm_sample(path: Path) -> Iterator[str]:
    """The sentences of a `write_spm_sample` file, one record batch (<= 10,000 rows) in memory at a time."""
    with pa.OSFile(str(path)) as source, pa.ipc.open_stream(source) as reader:
        for batch in reader:
            yield from batch.column(0).to_pylist()


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


def _write_samples(config: PipelineConfig, train: datasets.Dataset, folder: Path) -> list[Path]:
    """The SentencePiece sample files: one joint file, or a source and a target file (seeds s, s+1)."""
    folder.mkdir(parents=True, exist_ok=True)
    size, seed = config.spm_input_sentence_size, config.spm_seed
    sides = [("joint", ("src", "tgt"), seed)] if config.joint_vocab else [("src", ("src",), seed)]
    if not config.joint_vocab:
        sides.append(("tgt", ("tgt",), seed + 1))
    paths = []
    for name, columns, side_seed in sides:
        path = folder / f"{name}.arrows"
        count = write_spm_sample(train, columns, size, side_seed, path)
        log.info("SentencePiece sample %s: %d sentences", name, count)
        paths.append(path)
    return paths


def _train_tokenizers(config: PipelineConfig, samples: list[Path]) -> tuple[Tokenizer, Tokenizer]:
    """One tokenizer per sample file (`_write_samples`); joint: the same one for both sides."""
    symbols = [lang_token(lang) for lang in config.tgt_langs] if config.tags_target else []
    kwargs = {
        "vocab_size": config.vocab_size,
        "model_type": config.spm_model_type,
        "character_coverage": config.character_coverage,
        "byte_fallback": config.byte_fallback,
        "input_sentence_size": 0,  # the sample files hold the seeded draw: SentencePiece reads them whole
        "num_threads": config.spm_num_threads,
    }
    src = train_tokenizer(read_spm_sample(samples[0]), user_defined_symbols=symbols, **kwargs)
    if config.joint_vocab:
        return src, src
    return src, train_tokenizer(read_spm_sample(samples[1]), **kwargs)


def encoded_features(text_features: datasets.Features, keep_text: bool, vocab_size: int) -> datasets.Features:
    """Schema of an encoded split: uint16 ids when the vocab fits (a quarter of int64), else int32."""
    id_type = "uint16" if vocab_size <= UINT16_VOCAB else "int32"
    kept = {name: f for name, f in text_features.items() if keep_text or name not in ("src", "tgt")}
    return datasets.Features(
        {
            **kept,
            "src_ids": datasets.List(datasets.Value(id_type)),
            "tgt_ids": datasets.List(datasets.Value(id_type)),
            "src_len": datasets.Value("int32"),
            "tgt_len": datasets.Value("int32"),
        }
    )


def _encode_split(
    ds: datasets.Dataset,
    split: str,
    tokenizers: tuple[Tokenizer, Tokenizer],
    prefix: dict,
    num_proc: int | None,
) -> datasets.Dataset:
    keep_text = split != "train"  # valid/test keep their text: the references
    return ds.map(
        _encode_batch,
        batched=True,
        batch_size=2000,
        num_proc=num_proc,
        fn_kwargs={"src_tok": tokenizers[0], "tgt_tok": tokenizers[1], "src_prefix": prefix},
        remove_columns=None if keep_text else ["src", "tgt"],
        features=encoded_features(ds.features, keep_text, max(t.vocab_size for t in tokenizers)),
        desc=f"encode {split}",
    )


def _split_summary(saved: Path, pairs_in: int, dropped: dict[str, int]) -> dict[str, Any]:
    """Counts of a saved split, its length columns summed in numpy (one Arrow read)."""
    lengths = read_columns(datasets.load_from_disk(str(saved)), ["src_len", "tgt_len"])
    return {
        "pairs_in": pairs_in,
        "dropped": dropped,
        "pairs": len(lengths["src_len"]),
        "src_tokens": int(lengths["src_len"].sum(dtype=np.int64)),
        "tgt_tokens": int(lengths["tgt_len"].sum(dtype=np.int64)),
    }


@contextlib.contextmanager
def _unmapped(splits: dict[str, Any], name: str) -> Iterator[None]:
    """Close `splits[name]`'s memory-mapped Arrow files for the block, then reopen them in its place.

    Pages of a mapped file that were read stay in the process's RSS while it is mapped; dropping the
    dataset unmaps them. A dataset backed by files pickles as their paths (a few KB), so the same
    dataset comes back; one held in memory pickles whole and loses nothing.
    """
    reopen = pickle.dumps(splits[name])
    splits[name] = None
    gc.collect()  # the tables' last references may sit in cycles
    try:
        yield
    finally:
        splits[name] = pickle.loads(reopen)


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

    text: dict[str, Any] = {}  # split -> datasets.Dataset (None while unmapped)
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
    pairs_in = {split: len(ds) for split, ds in raw.items() if ds is not None}
    del raw, ds  # unmap the raw text: its pages would otherwise stay in RSS through SentencePiece

    log.info("sampling SentencePiece sentences from %d pairs", len(text["train"]))
    samples = _write_samples(config, text["train"], work / "spm")
    with _unmapped(text, "train"):  # SentencePiece's peak without the corpus pages the draw read
        log.info("training SentencePiece")
        src_tok, tgt_tok = _train_tokenizers(config, samples)
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
        encoded = _encode_split(ds, split, (src_tok, tgt_tok), prefix, num_proc)
        if split == "train":
            encoded, dropped = filter_lengths(encoded, config.cleaning, num_proc)
            filters[split].update(dropped)
            if len(encoded) == 0:
                raise ValueError(
                    f"the training corpus is empty after length filtering (dropped: {filters[split]})"
                )
        encoded.save_to_disk(str(out / split))
        summary["splits"][split] = _split_summary(out / split, pairs_in[split], filters[split])
    summary["vocab_size"] = src_tok.vocab_size
    summary["spm_model_type"] = config.spm_model_type
    summary["joint_vocab"] = config.joint_vocab
    del text
    shutil.rmtree(work, ignore_errors=True)
    return summary


def _complete(path: Path) -> PreparedData | None:
    """The cache at `path` if it is finished (summary.json is written last), else None."""
    summary = path / "summary.json"
    return PreparedData(path, json.loads(summary.read_text()), from_cache=True) if summary.exists() else None


def _build_into(config: PipelineConfig, final: Path, num_proc: int | None) -> PreparedData:
    """Build in a private directory and rename it to `final`; the caller holds the key's lock."""
    building = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    try:
        summary = _build(config, building, num_proc)
        summary["cache_version"] = CACHE_VERSION
        (building / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        (building / "summary.json").write_text(json.dumps(summary, indent=2))
        if final.exists():  # no summary.json (checked under the lock): a leftover from a killed build
            shutil.rmtree(final)
        building.rename(final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return PreparedData(final, summary, from_cache=False)


def prepare(
    config: PipelineConfig, cache_dir: str | Path | None = None, num_proc: int | None = None
) -> PreparedData:
    """The prepared data for `config`, built now or found in `cache_dir` from an earlier identical run.

    Safe with many builders at once: whoever takes `<key>.lock` first builds, the others block on it
    and then find the finished cache.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = root / config.cache_key()
    found = _complete(final)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{final.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("another process is building %s; waiting for it", final)
        lock.acquire()
    try:
        found = _complete(final)  # finished by the builder we waited for
        return found if found is not None else _build_into(config, final, num_proc)
    finally:
        lock.release()

"""Parallel corpora as `datasets.Dataset`s with columns `src` and `tgt` (raw text, one pair per row).

Two sources, one result type, so cleaning, encoding and caching treat them alike:
- local files: a path prefix plus language suffixes (`train` -> `train.en` + `train.de`), a TSV file
  (`src<TAB>tgt`, source first), or a JSONL file with the language codes as keys (either at top level or
  under "translation", as WMT rows are);
- the HF hub: WMT Parquet sets by name and language pair, e.g. ("wmt/wmt14", "de-en").

Local files are read by our own generator rather than `load_dataset("text")` so that a bad line can be
reported by file and line number and mismatched line counts by both files and both counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.compute as pc

# Our split names -> the hub's.
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
HUB_HOST = "huggingface.co"


class CorpusError(ValueError):
    """Bad input data: mismatched files, invalid UTF-8, malformed rows, missing files."""


def local_files(path: str | Path, src_lang: str, tgt_lang: str) -> list[Path]:
    """The files a local corpus spec reads: the TSV/JSONL file itself, or prefix.src + prefix.tgt."""
    path = Path(path).expanduser()
    if path.suffix in (".tsv", ".jsonl", ".json") and path.is_file():
        return [path]
    pair = [Path(f"{path}.{src_lang}"), Path(f"{path}.{tgt_lang}")]
    missing = [str(p) for p in pair if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"corpus {str(path)!r}: expected a .tsv/.jsonl file or the files {pair[0]} and {pair[1]}; "
            f"missing: {', '.join(missing)}"
        )
    return pair


def _decode_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without newline), failing on invalid UTF-8 with file and line."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise CorpusError(
                    f"{path}:{number}: invalid UTF-8 ({error.reason} at byte {error.start})"
                ) from None
            yield number, text.rstrip("\r\n")


def count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def _pairs_from_prefix(src_path: str, tgt_path: str) -> Iterator[dict[str, str]]:
    src_file, tgt_file = Path(src_path), Path(tgt_path)
    src_count, tgt_count = count_lines(src_file), count_lines(tgt_file)
    if src_count != tgt_count:
        raise CorpusError(
            f"parallel files differ in length: {src_file} has {src_count} lines, {tgt_file} has {tgt_count}"
        )
    for (_, src), (_, tgt) in zip(_decode_lines(src_file), _decode_lines(tgt_file), strict=True):
        yield {"src": src, "tgt": tgt}


def _pairs_from_tsv(path: str) -> Iterator[dict[str, str]]:
    for number, line in _decode_lines(Path(path)):
        fields = line.split("\t")
        if len(fields) != 2:
            raise CorpusError(
                f"{path}:{number}: expected 2 tab-separated fields (source, target), got {len(fields)}"
            )
        yield {"src": fields[0], "tgt": fields[1]}


def _pairs_from_jsonl(path: str, src_lang: str, tgt_lang: str) -> Iterator[dict[str, str]]:
    for number, line in _decode_lines(Path(path)):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CorpusError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        row = row.get("translation", row) if isinstance(row, dict) else row
        if (
            not isinstance(row, dict)
            or not isinstance(row.get(src_lang), str)
            or not isinstance(row.get(tgt_lang), str)
        ):
            raise CorpusError(
                f"{path}:{number}: expected string values for keys {src_lang!r} and {tgt_lang!r}"
            )
        yield {"src": row[src_lang], "tgt": row[tgt_lang]}


def _generate(
    kind: str, first: str, second: str, src_lang: str, tgt_lang: str, stamp: str
) -> Iterator[dict[str, str]]:
    """Module-level generator for `Dataset.from_generator`; `stamp` (sizes and mtimes) only keys its cache.

    Files come as separate strings: `from_generator` would shard a list-valued argument.
    """
    del stamp
    if kind == "prefix":
        yield from _pairs_from_prefix(first, second)
    elif kind == "tsv":
        yield from _pairs_from_tsv(first)
    else:
        yield from _pairs_from_jsonl(first, src_lang, tgt_lang)


def file_stamp(paths: list[Path]) -> str:
    """Cheap identity of input files (path, size, mtime): a change anywhere invalidates caches."""
    parts = []
    for path in paths:
        stat = path.stat()
        parts.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def file_digest(paths: list[Path], chunk: int = 1 << 20) -> str:
    """Content identity of input files (BLAKE2b of their bytes, in order): a copied corpus keeps it."""
    digest = hashlib.blake2b(digest_size=20)
    for path in paths:
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        digest.update(b"\0file\0")  # file boundary: ("ab", "c") differs from ("a", "bc")
    return digest.hexdigest()


def hub_local_files(name: str) -> list[Path]:
    """The files of a hub dataset given as a local directory (laid out like the hub repo), else []."""
    root = Path(name).expanduser()
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file() and ".cache" not in p.relative_to(root).parts)


def load_local(
    path: str | Path, src_lang: str, tgt_lang: str, cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """A local corpus (prefix, TSV or JSONL) as a Dataset with `src`/`tgt` text columns."""
    files = local_files(path, src_lang, tgt_lang)
    kind = "prefix" if len(files) == 2 else ("tsv" if files[0].suffix == ".tsv" else "jsonl")
    try:
        return datasets.Dataset.from_generator(
            _generate,
            gen_kwargs={
                "kind": kind,
                "first": str(files[0]),
                "second": str(files[-1]),
                "src_lang": src_lang,
                "tgt_lang": tgt_lang,
                "stamp": file_stamp(files),
            },
            features=datasets.Features({"src": datasets.Value("string"), "tgt": datasets.Value("string")}),
            cache_dir=None if cache_dir is None else str(cache_dir),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        # `datasets` wraps generator errors; surface ours unchanged so the message names the file.
        cause = error.__cause__ or error.__context__
        if isinstance(cause, CorpusError):
            raise cause from None
        raise


def _hub_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """TCP connect to the hub within `timeout` s (DNS included, via a thread, since it has no timeout)."""
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((HUB_HOST, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def load_hub(
    name: str, config: str, split: str, src_lang: str, tgt_lang: str, cache_dir: str | Path | None = None
) -> datasets.Dataset:
    """One split of a hub translation set (e.g. "wmt/wmt14", "de-en", "train") with `src`/`tgt` columns.

    Fails within seconds when the hub cannot be reached, instead of letting `datasets` retry for ~25 s.
    With HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 a copy already in the HF cache is used. `name` may be
    a local directory laid out like the hub repo (Parquet shards, a README whose `configs:` names them).
    """
    if split not in HUB_SPLITS:
        raise ValueError(f"split must be one of {sorted(HUB_SPLITS)}, got {split!r}")
    langs = set(config.split("-"))
    if {src_lang, tgt_lang} != langs:
        raise ValueError(f"hub config {config!r} does not hold the pair {src_lang}-{tgt_lang}")
    hint = "pass local files instead (train/valid/test prefixes, TSV or JSONL)"
    local = bool(hub_local_files(name))  # a directory laid out like the hub repo: no network needed
    if not local and not _hub_offline() and not _hub_reachable():
        raise ConnectionError(f"cannot reach {HUB_HOST} to load {name} {config}: no network? {hint}")
    try:
        raw = datasets.load_dataset(name, config, split=HUB_SPLITS[split], cache_dir=cache_dir)
    except Exception as error:  # offline-mode misses and hub errors come in many types
        raise ConnectionError(
            f"could not load {name} {config} split {HUB_SPLITS[split]!r} ({error}); {hint}"
        ) from error

    def pick(batch: pa.Table) -> pa.Table:  # Arrow in, Arrow out: no Python object per row
        pairs = batch.column("translation")
        return pa.table({"src": pc.struct_field(pairs, src_lang), "tgt": pc.struct_field(pairs, tgt_lang)})

    picked = raw.with_format("arrow").map(
        pick, batched=True, remove_columns=raw.column_names, desc=f"{name} {split}"
    )
    return picked.with_format(None)

"""The SentencePiece sample goes through an Arrow file, and the corpus is unmapped while SentencePiece
trains: the same sentences reach it (any text, exactly), and the corpus's pages are not mapped then."""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers.data import spm_sample, write_corpus

from nmt_moe.data import pipeline
from nmt_moe.data.pipeline import PipelineConfig, prepare, read_spm_sample, write_spm_sample
from nmt_moe.data.tokenizer import train_tokenizer

AWKWARD = ["", "a\nb", "tab\there", "cr\r\n", " lead", "ü ß 漢字 🙂", "\x00nul", "x" * 5000]


@pytest.mark.parametrize(("size", "columns"), [(0, ("src", "tgt")), (7, ("src", "tgt")), (5, ("tgt",))])
def test_sample_file_round_trips_any_text(tmp_path: Path, size: int, columns: tuple[str, ...]) -> None:
    """Newlines, tabs, NULs, empty and long strings come back exactly, in the draw's order."""
    rng = np.random.default_rng(0)
    src = [AWKWARD[i] + str(i) for i in rng.integers(0, len(AWKWARD), size=12)]
    ds = datasets.Dataset.from_dict({"src": src, "tgt": [s[::-1] for s in src]})
    count = write_spm_sample(ds, columns, size, 3, tmp_path / "sample.arrows")
    back = list(read_spm_sample(tmp_path / "sample.arrows"))
    assert back == list(spm_sample(ds, columns, size, 3))
    assert count == len(back) == (size or len(ds) * len(columns))


def test_sample_file_streams_large_samples_in_batches(tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"src": [f"s{i}" for i in range(25_000)], "tgt": ["t"] * 25_000})
    write_spm_sample(ds, ("src",), 0, 0, tmp_path / "s.arrows")
    reader = read_spm_sample(tmp_path / "s.arrows")
    assert [next(reader) for _ in range(3)] == ["s0", "s1", "s2"]
    assert sum(1 for _ in reader) == 25_000 - 3


def _mapped_files() -> set[str]:
    lines = Path("/proc/self/maps").read_text().splitlines()
    return {line.split(maxsplit=5)[5] for line in lines if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("joint_vocab", [True, False])
def test_corpus_is_unmapped_while_sentencepiece_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, joint_vocab: bool
) -> None:
    """While SentencePiece trains, none of the cleaned training split's Arrow files is mapped; after
    it, the split comes back and encodes to what a build without the release gives (same tokenizer)."""
    train = write_corpus(tmp_path / "corpus", "train", 1500, seed=0)
    train_files: list[str] = []
    mapped_during: list[set[str]] = []
    write_samples = pipeline._write_samples

    def recording_write(config: PipelineConfig, ds: datasets.Dataset, folder: Path) -> list[Path]:
        train_files.extend(f["filename"] for f in ds.cache_files)
        return write_samples(config, ds, folder)

    def recording_train(*args: object, **kwargs: object):  # noqa: ANN202
        mapped_during.append(_mapped_files())
        return train_tokenizer(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_write_samples", recording_write)
    monkeypatch.setattr(pipeline, "train_tokenizer", recording_train)
    config = PipelineConfig(
        src_lang="en",
        tgt_lang="de",
        train=(train,),
        vocab_size=100,
        spm_input_sentence_size=1000,
        spm_num_threads=1,
        joint_vocab=joint_vocab,
    )
    prepared = prepare(config, tmp_path / "cache")
    assert train_files and len(mapped_during) == (1 if joint_vocab else 2)
    assert all(not set(train_files) & mapped for mapped in mapped_during)

    # the split came back whole, and the tokenizer is what the same draw gives trained directly
    encoded = prepared.split("train")
    assert encoded is not None and len(encoded) == 1500
    text = datasets.Dataset.from_dict(
        {
            "src": Path(f"{train}.en").read_text().splitlines(),
            "tgt": Path(f"{train}.de").read_text().splitlines(),
        }
    )
    columns = ("src", "tgt") if joint_vocab else ("src",)
    direct = train_tokenizer(spm_sample(text, columns, 1000, 0), 100, input_sentence_size=1000, num_threads=1)
    name = "tokenizer.model" if joint_vocab else "tokenizer.src.model"
    assert (prepared.path / name).read_bytes() == direct.to_bytes()
    assert encoded["src_ids"][:5] == [[*ids, 3] for ids in direct.encode(text["src"][:5])]

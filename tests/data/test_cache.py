"""The prepared-data cache at scale: compact id dtypes, reproducible SentencePiece, many builders at once,
and a content key that finds a copied corpus."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pytest
from helpers.data import spm_sample, write_corpus

from nmt_moe.data import pipeline
from nmt_moe.data.pipeline import CACHE_VERSION, PipelineConfig, prepare

REPO = Path(__file__).resolve().parents[2]


def _config(train: str, **overrides: object) -> PipelineConfig:
    settings: dict = dict(src_lang="en", tgt_lang="de", train=(train,), vocab_size=200, spm_model_type="bpe")
    settings.update(overrides)
    return PipelineConfig(**settings)


@pytest.fixture
def train(tmp_path: Path) -> str:
    return write_corpus(tmp_path / "corpus", "train", 800, seed=0)


def _id_types(ds: datasets.Dataset) -> tuple[str, str]:
    return ds.features["src_ids"].feature.dtype, ds.features["tgt_ids"].feature.dtype


def test_ids_are_uint16_when_the_vocab_fits(train: str, tmp_path: Path) -> None:
    prepared = prepare(_config(train), tmp_path / "cache")
    ds = prepared.split("train")
    assert ds is not None and _id_types(ds) == ("uint16", "uint16")
    assert ds.features["src_len"].dtype == "int32"
    assert ds.data.column("src_ids").type.value_type == "uint16"  # stored so, not only declared
    assert prepared.summary["cache_version"] == CACHE_VERSION == 2


def test_ids_are_int32_beyond_uint16(train: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "UINT16_VOCAB", 100)  # pretend 200 pieces overflow uint16
    prepared = prepare(_config(train), tmp_path / "cache")
    ds = prepared.split("train")
    assert ds is not None and _id_types(ds) == ("int32", "int32")
    assert max(max(row) for row in ds["src_ids"][:]) >= 100  # ids past the pretend limit survive


def test_old_cache_versions_are_not_reused(train: str, monkeypatch: pytest.MonkeyPatch) -> None:
    key = _config(train).cache_key()
    monkeypatch.setattr(pipeline, "CACHE_VERSION", 1)
    assert _config(train).cache_key() != key


def test_same_data_and_settings_give_a_byte_identical_model(train: str, tmp_path: Path) -> None:
    """Two builds in separate cache roots, sampling 400 of 1600 sentences: identical .model bytes."""
    config = _config(train, spm_input_sentence_size=400, spm_num_threads=2)
    first = prepare(config, tmp_path / "a").path / "tokenizer.model"
    second = prepare(config, tmp_path / "b").path / "tokenizer.model"
    assert first.read_bytes() == second.read_bytes()
    other_seed = prepare(
        _config(train, spm_input_sentence_size=400, spm_num_threads=2, spm_seed=1), tmp_path / "c"
    )
    assert (other_seed.path / "tokenizer.model").read_bytes() != first.read_bytes()


TRAIN_ON_A_SAMPLE = """
import hashlib, sys
from nmt_moe.data.tokenizer import train_tokenizer
text = [f"w{i % 97} x{i % 31} y{i % 13} z{i}" for i in range(3000)]
model = train_tokenizer(text, 40, input_sentence_size=500, num_threads=1, seed=int(sys.argv[1]))
print(hashlib.sha256(model.to_bytes()).hexdigest())
"""


def _model_digest(seed: int) -> str:
    """Train in a fresh process: SentencePiece's own sampler drew another sample in every process."""
    run = subprocess.run(
        [sys.executable, "-c", TRAIN_ON_A_SAMPLE, str(seed)], capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


def test_a_capped_sample_gives_the_same_model_in_every_process() -> None:
    """3000 sentences capped at 500: three processes, one model; another seed, another sample."""
    digests = {_model_digest(0) for _ in range(3)}
    assert len(digests) == 1
    assert _model_digest(1) not in digests


def test_thread_count_is_part_of_the_key(train: str) -> None:
    assert _config(train, spm_num_threads=1).cache_key() != _config(train, spm_num_threads=2).cache_key()


def test_sample_is_drawn_without_reading_every_row(train: str, tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict(
        {"src": [f"s{i}" for i in range(1000)], "tgt": [f"t{i}" for i in range(1000)]}
    )
    sample = list(spm_sample(ds, ("src", "tgt"), 300, seed=0))
    assert len(sample) == len(set(sample)) == 300
    assert {s[0] for s in sample} == {"s", "t"}
    assert sample == list(spm_sample(ds, ("src", "tgt"), 300, seed=0))
    assert list(spm_sample(ds, ("src",), 5000, seed=0)) == ds["src"][:]  # fits: streamed whole


BUILDER = textwrap.dedent(
    """
    import json, logging, sys, time
    from pathlib import Path
    from nmt_moe.data.pipeline import PipelineConfig, prepare

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train, root, go = sys.argv[1:4]
    config = PipelineConfig(
        src_lang="en", tgt_lang="de", train=(train,), vocab_size=200, spm_model_type="bpe"
    )
    while not Path(go).exists():  # every builder imported: start together
        time.sleep(0.01)
    prepared = prepare(config, root)
    print(json.dumps({"path": str(prepared.path), "from_cache": prepared.from_cache}))
    """
)


def test_concurrent_builders_end_with_one_valid_cache(tmp_path: Path) -> None:
    train = write_corpus(tmp_path / "corpus", "train", 3000, seed=0)
    root, go = tmp_path / "cache", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILDER, train, str(root), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(3)
    ]
    time.sleep(1.0)
    go.touch()
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert len({r["path"] for r in results}) == 1
    assert sorted(r["from_cache"] for r in results) == [False, True, True]  # one built, two reused
    assert sum("waiting for it" in err for _, err in outputs) >= 1
    entries = sorted(p.name for p in root.iterdir())
    key = Path(results[0]["path"]).name
    assert [e for e in entries if not e.endswith(".lock")] == [key]  # no temporary directory left
    summary = json.loads((root / key / "summary.json").read_text())
    assert summary["splits"]["train"]["pairs"] == len(datasets.load_from_disk(str(root / key / "train")))


def test_a_leftover_without_summary_is_rebuilt_a_finished_cache_reused(train: str, tmp_path: Path) -> None:
    config = _config(train)
    leftover = tmp_path / "cache" / config.cache_key()
    (leftover / "train").mkdir(parents=True)  # a killed build's remains, no summary.json
    built = prepare(config, tmp_path / "cache")
    assert not built.from_cache and (leftover / "summary.json").exists()
    stamp = (leftover / "summary.json").stat().st_mtime_ns
    again = prepare(config, tmp_path / "cache")
    assert again.from_cache and (leftover / "summary.json").stat().st_mtime_ns == stamp


def test_content_key_finds_a_copied_corpus(train: str, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for lang in ("en", "de"):
        shutil.copy(f"{train}.{lang}", copy / f"train.{lang}")  # new path and mtime, same bytes
    first = prepare(_config(train, content_key=True), tmp_path / "cache")
    found = prepare(_config(str(copy / "train"), content_key=True), tmp_path / "cache")
    assert found.from_cache and found.path == first.path
    assert _config(train).cache_key() != _config(str(copy / "train")).cache_key()  # default: by stamp
    (copy / "train.de").write_text((copy / "train.de").read_text() + "x\n")
    (copy / "train.en").write_text((copy / "train.en").read_text() + "y\n")
    assert _config(str(copy / "train"), content_key=True).cache_key() != first.path.name

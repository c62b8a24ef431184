"""`nmt-moe prepare`: flags or a training config in, summary out, clear errors with exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_data_datamodule import write_corpus

from nmt_moe.data.prepare import prepare_main


def test_flags_build_then_hit_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_corpus(tmp_path / "corpus", "train", 300, seed=0)
    valid = write_corpus(tmp_path / "corpus", "valid", 20, seed=1)
    flags = [
        "--src_lang",
        "en",
        "--tgt_lang",
        "de",
        "--train",
        train,
        "--valid",
        valid,
        "--vocab_size",
        "150",
    ]
    flags += ["--spm_model_type", "bpe", "--cache_dir", str(tmp_path / "cache"), "--max_tokens", "400"]
    assert prepare_main([*flags, "--summary_json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "(built)" in out and "vocab size 150" in out and "300 kept" in out and "padding" in out
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["splits"]["train"]["pairs"] == 300 and summary["splits"]["valid"]["pairs"] == 20
    assert summary["splits"]["train"]["src_tokens"] > 300 and 0 <= summary["padding_fraction"]["train"] < 1
    assert prepare_main(flags) == 0
    assert "(cache hit)" in capsys.readouterr().out


def test_reads_data_section_of_a_training_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_corpus(tmp_path / "corpus", "train", 300, seed=0)
    train_config = {
        "model": {"vocab_size": 150, "hidden": 64},
        "trainer": {"max_epochs": 1},
        "data": {"src_lang": "en", "tgt_lang": "de", "train": train, "vocab_size": 150, "dedup": True},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(train_config))
    flags = [
        "--config",
        str(tmp_path / "config.yaml"),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--vocab_size",
        "120",
    ]
    assert prepare_main(flags) == 0
    out = capsys.readouterr().out
    assert "duplicate -" in out  # dedup came from the file
    assert "vocab size 120" in out  # the flag overrode the file


def test_bad_input_exits_1_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.en").write_text("a\nb\n")
    (tmp_path / "x.de").write_text("a\n")
    flags = [
        "--src_lang",
        "en",
        "--tgt_lang",
        "de",
        "--train",
        str(tmp_path / "x"),
        "--cache_dir",
        str(tmp_path),
    ]
    code = prepare_main(flags)
    assert code == 1
    assert "x.en has 2 lines" in capsys.readouterr().err

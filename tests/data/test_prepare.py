"""`nmt-moe prepare`: flags or a training config in, summary out, bad input exits 2 with one error line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.data import write_corpus

from nmt_moe.cli.prepare import main as prepare_main


def test_flags_build_then_hit_cache(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train = write_corpus(tmp_path / "corpus", "train", 300, seed=0)
    valid = write_corpus(tmp_path / "corpus", "valid", 20, seed=1)
    flags = [
        "--pipeline.src_lang",
        "en",
        "--pipeline.tgt_lang",
        "de",
        "--pipeline.train",
        train,
        "--pipeline.valid",
        valid,
        "--pipeline.vocab_size",
        "150",
    ]
    flags += [
        "--pipeline.spm_model_type",
        "bpe",
        "--cache_dir",
        str(tmp_path / "cache"),
        "--max_tokens",
        "400",
    ]
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
        "data": {
            "pipeline": {
                "src_lang": "en",
                "tgt_lang": "de",
                "train": train,
                "vocab_size": 150,
                "cleaning": {"dedup": True},
            }
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(train_config))
    flags = [
        "--config",
        str(tmp_path / "config.yaml"),
        "--cache_dir",
        str(tmp_path / "cache"),
        "--pipeline.vocab_size",
        "120",
    ]
    assert prepare_main(flags) == 0
    out = capsys.readouterr().out
    assert "duplicate -" in out  # dedup came from the file
    assert "vocab size 120" in out  # the flag overrode the file


def test_bad_input_exits_2_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "x.en").write_text("a\nb\n")
    (tmp_path / "x.de").write_text("a\n")
    flags = [
        "--pipeline.src_lang",
        "en",
        "--pipeline.tgt_lang",
        "de",
        "--pipeline.train",
        str(tmp_path / "x"),
        "--cache_dir",
        str(tmp_path),
    ]
    code = prepare_main(flags)
    assert code == 2
    assert "x.en has 2 lines" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--pipeline.src_lang", "en", "--pipeline.tgt_lang", "de", "--pipeline.vocab_size", "abc"],
            "vocab_size",
        ),
        (["--config", "/nonexistent/c.yaml"], "config file not found"),
        (
            ["--pipeline.src_lang", "en", "--pipeline.tgt_lang", "de", "--pipeline.train", "/nonexistent/t"],
            "missing",
        ),
        (["--bogus", "1"], "unrecognized"),
    ],
)
def test_bad_flags_and_files_exit_2_with_one_line(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert prepare_main([*flags, "--cache_dir", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nmt-moe prepare: error: ") and message in lines[0], lines


def test_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    flags = [
        "--pipeline.src_lang",
        "en",
        "--pipeline.tgt_lang",
        "de",
        "--pipeline.train",
        str(tmp_path / "nowhere"),
    ]
    run = subprocess.run(
        [sys.executable, "-m", "nmt_moe.cli", "prepare", *flags, "--cache_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr and "missing" in run.stderr


def _late_bad_utf8(tmp_path: Path) -> list[str]:
    """A corpus whose line 1501 is invalid UTF-8: found while reading, after progress was printed."""
    prefix = write_corpus(tmp_path / "corpus", "late", 2000, seed=0)
    src = Path(f"{prefix}.en")
    lines = src.read_bytes().splitlines()
    lines[1500] = b"bad \xff byte"
    src.write_bytes(b"\n".join(lines) + b"\n")
    return ["--pipeline.train", prefix, "--pipeline.vocab_size", "100"]


def _late_vocab_too_large(tmp_path: Path) -> list[str]:
    """A vocabulary the data cannot fill: found by SentencePiece, after reading and cleaning."""
    return [
        "--pipeline.train",
        write_corpus(tmp_path / "corpus", "small", 300, seed=0),
        "--pipeline.vocab_size",
        "30000",
    ]


def test_late_error_through_the_entry_point_leaves_one_stderr_line(tmp_path: Path) -> None:
    """Progress goes to stdout; invalid UTF-8 found mid-corpus still exits 2 with one stderr line."""
    flags = [
        "--pipeline.src_lang",
        "en",
        "--pipeline.tgt_lang",
        "de",
        *_late_bad_utf8(tmp_path),
        "--pipeline.spm_model_type",
        "bpe",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "nmt_moe.cli", "prepare", *flags, "--cache_dir", str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nmt-moe prepare: error: "), lines
    assert "late.en:1501: invalid UTF-8" in lines[0]
    assert "building " in run.stdout  # the failure came after progress output


def test_error_inside_sentencepiece_leaves_one_stderr_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A vocabulary too large is found by SentencePiece, after reading, cleaning and progress bars."""
    flags = ["--pipeline.src_lang", "en", "--pipeline.tgt_lang", "de", *_late_vocab_too_large(tmp_path)]
    assert (
        prepare_main([*flags, "--pipeline.spm_model_type", "bpe", "--cache_dir", str(tmp_path / "cache")])
        == 2
    )
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nmt-moe prepare: error: ") and "too large" in lines[0]
    assert "training SentencePiece" in captured.out and "drop empty pairs" in captured.out

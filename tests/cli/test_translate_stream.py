"""`nmt-moe translate --stream`: each line is answered as it arrives, one output line per input line."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.tiny_models import tiny_corpus
from helpers.tiny_trained import trained_tiny_checkpoint

from nmt_moe.cli import main

ROOT = Path(__file__).resolve().parents[2]
LINES = ["a man plays with the ball", "", "   ", "the red cat sits", *tiny_corpus(6, seed=5), "caf\u00e9 dog"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_tiny_checkpoint(tmp_path_factory.mktemp("model") / "trained.ckpt")


def start_stream(checkpoint: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nmt_moe.cli", "translate", "-m", str(checkpoint), "--stream", *extra]
    # unbuffered stdout: select() then sees every line that has not been read yet
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, bufsize=0)  # fmt: skip


def read_line(process: subprocess.Popen, timeout: float = 120) -> bytes:
    """One output line, failing (not hanging) if the process holds it back."""
    ready, _, _ = select.select([process.stdout], [], [], timeout)
    assert ready, "no output line while stdin is still open: the line was not flushed"
    return process.stdout.readline()


def same_output(got: bytes, want: str, offset: int = 0) -> bool:
    """Text lines equal; JSON lines equal in line, translation and tokens, scores to float32 rounding (a
    sentence's score moves in the last bits with the batch it is decoded in)."""
    text = got.decode("utf-8")
    if not want.startswith("{"):
        return text == want + "\n"
    a, b = json.loads(text), json.loads(want)
    b["line"] += offset  # the stream keeps counting input lines
    keys = ("line", "translation", "tokens")
    return [a[k] for k in keys] == [b[k] for k in keys] and a["log_prob"] == pytest.approx(b["log_prob"])


def batch_translation(checkpoint: Path, tmp_path: Path, *extra: str) -> list[str]:
    source = tmp_path / "in.txt"
    source.write_text("".join(line + "\n" for line in LINES), encoding="utf-8")
    assert main(["translate", "-m", str(checkpoint), "-i", str(source), "-o", str(tmp_path / "out"),
                 "--quiet", *extra]) == 0  # fmt: skip
    return (tmp_path / "out").read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("extra", [[], ["--output-format", "jsonl", "--beam", "1"]])
def test_each_line_comes_back_before_stdin_closes(checkpoint: Path, tmp_path: Path, extra: list[str]) -> None:
    expected = batch_translation(checkpoint, tmp_path, *extra)
    process = start_stream(checkpoint, *extra)
    try:
        for line, want in zip(LINES, expected, strict=True):
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()
            assert same_output(read_line(process), want)
        # a burst of lines written together comes back complete and in order
        process.stdin.write("".join(line + "\n" for line in LINES).encode())
        process.stdin.flush()
        assert all([same_output(read_line(process), want, len(LINES)) for want in expected])
        process.stdin.write(LINES[0].encode())  # a last line without newline is translated at EOF
        process.stdin.close()
        last = process.stdout.read()
        assert last.count(b"\n") == 1 and same_output(last, expected[0], 2 * len(LINES))
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


def test_invalid_utf8_stops_the_stream_naming_the_line(checkpoint: Path) -> None:
    process = start_stream(checkpoint)
    try:
        process.stdin.write(b"a dog\n")
        process.stdin.flush()
        assert read_line(process).endswith(b"\n")
        out, err = process.communicate(b"the cat\nthe \xff house\nnever\n", timeout=120)
    finally:
        process.kill()
    assert process.returncode == 2
    assert out.count(b"\n") <= 1 and b"line 3" in err and b"Traceback" not in err
    assert err.decode().strip().count("\n") == 0


def test_stream_refuses_files(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["translate", "-m", str(checkpoint), "--stream", "-o", "x.txt"])
    assert exit_info.value.code == 2 and "--stream" in capsys.readouterr().err

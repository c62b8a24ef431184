"""Fuzzing `nmt-moe translate` with hostile input: random bytes, very long lines, empty files, lines of only
whitespace or control characters. Every run either writes exactly one output line per input line (split
on "\\n", as the input is) or stops with one clean error line and exit code 2, writing nothing."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.tiny_models import WORDS, tiny_checkpoint

from nmt_moe.cli import main
from nmt_moe.data.text_io import read_lines

SEED, CASES = 1234, 24
# random weights rarely emit EOS: at most 3 output tokens keeps every case fast, long inputs included;
# one thread, as spinning OpenMP threads on a shared 2-core machine slow tiny LSTMs down 10x
FAST = [
    "--quiet",
    "--threads",
    "1",
    "--max-len-a",
    "0",
    "--max-len-b",
    "3",
    "--beam",
    "2",
    "--max-input-tokens",
    "200",
]
ODD = ["", " ", "\t", "\u3000", "\u00a0", "\r", "\x0b", "\x0c", "\x00", "\x1c", "\x85", "\u2028", "\u2029",
       "\ufeff", "\U0001f600", "\u0301", "\ud7ff", "e\u0301", "\u202e", "ß", "ǅ"]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _restore_threads() -> None:
    """`--threads 1` (in-process) sets torch's thread count for the whole process: put it back after."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    tiny_checkpoint(path)
    return path


def hostile_input(rng: random.Random) -> bytes:
    """One input file: random bytes, or text mixing words, whitespace-only lines, control characters and
    very long lines, with LF or CRLF endings and an optional final newline."""
    kind = rng.choice(["bytes", "text", "text", "long"])
    if kind == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 400)))
    lines = []
    for _ in range(rng.randrange(0, 12)):
        shape = rng.random()
        if shape < 0.3:
            lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 8))))
        elif shape < 0.5:
            lines.append(
                "".join(rng.choice([" ", "\t", "\u3000", "\u00a0", "\r"]) for _ in range(rng.randrange(4)))
            )
        elif shape < 0.8:
            lines.append("".join(rng.choice(ODD + WORDS) for _ in range(rng.randrange(1, 10))))
        else:
            lines.append("".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(1, 20))).replace(
                "\n", " ")
            )  # fmt: skip
    if kind == "long":
        lines.insert(rng.randrange(len(lines) + 1), " ".join(rng.choice(WORDS) for _ in range(5000)))
    eol = rng.choice(["\n", "\r\n"])
    text = eol.join(lines) + (eol if lines and rng.random() < 0.7 else "")
    return text.encode("utf-8", errors="surrogatepass")


def check_run(code: int, data: bytes, out: Path, err: str, output_format: str) -> None:
    assert "Traceback" not in err
    try:
        lines = read_lines(data)
    except Exception:  # invalid UTF-8: must be a clean refusal that writes nothing
        lines = None
    if lines is None:
        assert code == 2
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and "not valid UTF-8" in errors[0], err
        assert not out.exists()
        return
    assert code == 0, err
    text = out.read_text(encoding="utf-8")
    produced = text.split("\n")
    assert produced[-1] == "" or not lines  # every line is terminated
    assert len(produced) - 1 == len(lines) if lines else text == ""
    for number, (line, output) in enumerate(zip(lines, produced, strict=False), start=1):
        if output_format == "jsonl":
            record = json.loads(output)
            assert record["line"] == number
            output = record["translation"]
        if not line.strip():
            assert output == "", (number, line, output)  # blank lines stay blank, never reach the model


@pytest.mark.parametrize("case", range(CASES))
def test_translate_survives_hostile_input(
    case: int, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    rng = random.Random(SEED * 1000 + case)
    data = hostile_input(rng)
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(data)
    output_format = rng.choice(["text", "jsonl"])
    code = main(["translate", "-m", str(checkpoint), "-i", str(source), "-o", str(out), "--output-format",
                 output_format, *FAST])  # fmt: skip
    check_run(code, data, out, capsys.readouterr().err, output_format)


@pytest.mark.parametrize("data", [b"", b"\n", b"   \n\t\n", b"a man\xff\xfe\n", b"\xef\xbb\xbfa man\r\n\r\n"])
def test_stdin_to_stdout_in_a_real_process(data: bytes, checkpoint: Path, tmp_path: Path) -> None:
    """The same guarantees on the stdin/stdout path of a fresh `nmt-moe translate` process."""
    result = subprocess.run(
        [sys.executable, "-m", "nmt_moe.cli", "translate", "-m", str(checkpoint), *FAST],
        input=data, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120,
    )  # fmt: skip
    out = tmp_path / "stdout.txt"
    if result.stdout or result.returncode == 0:
        out.write_bytes(result.stdout)
    check_run(result.returncode, data, out, result.stderr.decode(), "text")

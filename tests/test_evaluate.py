"""`nmt-moe evaluate` against the `sacrebleu` console script run on the same files."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.tiny_models import tiny_checkpoint, tiny_corpus

from nmt_moe.cli import main


def perturb(lines: list[str], seed: int) -> list[str]:
    """A plausible 'system output': references with words dropped, swapped and replaced."""
    rng = random.Random(seed)
    out = []
    for line in lines:
        words = line.split()
        if words and rng.random() < 0.5:
            words.pop(rng.randrange(len(words)))
        if len(words) > 1 and rng.random() < 0.5:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        if words and rng.random() < 0.3:
            words[rng.randrange(len(words))] = "Hund"
        out.append(" ".join(words))
    return out


def sacrebleu_cli(refs: list[Path], hyp: Path) -> dict[str, dict]:
    if shutil.which("sacrebleu") is None:
        pytest.skip("sacrebleu console script not on PATH")
    done = subprocess.run(
        ["sacrebleu", *map(str, refs), "-i", str(hyp), "-m", "bleu", "chrf", "-f", "json", "-w", "4"],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return {entry["name"]: entry for entry in json.loads(done.stdout)}


def evaluate_json(capsys: pytest.CaptureFixture, *args: str | Path) -> dict:
    assert main(["evaluate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_matches_sacrebleu(ours: dict, theirs: dict[str, dict]) -> None:
    assert round(ours["bleu"], 4) == pytest.approx(theirs["BLEU"]["score"], abs=1e-4)
    assert round(ours["chrf"], 4) == pytest.approx(theirs["chrF2"]["score"], abs=1e-4)
    assert ours["bleu_signature"] == theirs["BLEU"]["signature"]
    assert ours["chrf_signature"] == theirs["chrF2"]["signature"]


def test_matches_sacrebleu_on_multi30k(multi30k: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref = multi30k / "test_2016_flickr.de"
    hyp = tmp_path / "hyp.de"
    hyp.write_text(
        "\n".join(perturb(ref.read_text(encoding="utf-8").splitlines(), 0)) + "\n", encoding="utf-8"
    )
    ours = evaluate_json(capsys, "-r", ref, "-i", hyp)
    assert 20 < ours["bleu"] < 90 and ours["lines"] == 1000
    assert_matches_sacrebleu(ours, sacrebleu_cli([ref], hyp))


def test_matches_sacrebleu_with_two_references(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lines = tiny_corpus(200, seed=3)
    ref1, ref2, hyp = tmp_path / "r1", tmp_path / "r2", tmp_path / "hyp"
    ref1.write_text("\n".join(lines) + "\n")
    ref2.write_text("\n".join(perturb(lines, 1)) + "\n")
    hyp.write_text("\n".join(perturb(lines, 2)) + "\n")
    ours = evaluate_json(capsys, "-r", ref1, "-r", ref2, "-i", hyp)
    assert "nrefs:2" in ours["bleu_signature"]
    assert_matches_sacrebleu(ours, sacrebleu_cli([ref1, ref2], hyp))
    # the text report shows both scores with their signatures
    assert main(["evaluate", "-r", str(ref1), "-i", str(hyp)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("BLEU = ") and "tok:13a" in text and "chrF2 = " in text and "nc:6" in text


def test_translate_and_score_in_one_go(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "tiny.ckpt"
    tiny_checkpoint(checkpoint)
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("a dog\n\nthe red ball\n")
    ref.write_text("ein Hund\n\nder rote Ball\n")
    fast = ["--max-len-b", "3", "--beam", "2"]
    ours = evaluate_json(capsys, "-m", checkpoint, "--src", src, "-r", ref, "-o", tmp_path / "hyp.txt", *fast)
    assert (
        main(["translate", "-m", str(checkpoint), "-i", str(src), "-o", str(tmp_path / "t.txt"), *fast]) == 0
    )
    assert (tmp_path / "hyp.txt").read_text() == (tmp_path / "t.txt").read_text()
    capsys.readouterr()
    assert evaluate_json(capsys, "-r", ref, "-i", tmp_path / "t.txt")["bleu"] == ours["bleu"]


def test_errors_exit_2_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref, hyp = tmp_path / "ref", tmp_path / "hyp"
    ref.write_text("a\nb\nc\n")
    hyp.write_text("a\nb\n")
    assert main(["evaluate", "-r", str(ref), "-i", str(hyp)]) == 2
    assert "2 hypotheses but a reference stream has 3 lines" in capsys.readouterr().err
    hyp.write_bytes(b"a\n\xc3\x28\nc\n")
    assert main(["evaluate", "-r", str(ref), "-i", str(hyp)]) == 2
    assert "line 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "-r", str(ref)])  # neither -i nor -m

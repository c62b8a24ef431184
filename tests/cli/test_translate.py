"""`nmt-moe translate` end to end through the real CLI: one output line per input line, always."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_checkpoint

from nmt_moe.checkpoint import export_bundle, load_model
from nmt_moe.cli import main
from nmt_moe.data.batching import make_batches
from nmt_moe.data.text_io import read_lines
from nmt_moe.data.tokenizer import EOS_ID
from nmt_moe.decoding import translate as translate_module
from nmt_moe.decoding.beam import beam_search

FAST = ["--max-len-b", "3", "--quiet"]  # random weights rarely emit EOS: keep outputs short


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.ckpt"
    tiny_checkpoint(path)
    return path


def run(*args: str | Path) -> int:
    return main(["translate", *map(str, args)])


def test_read_lines_keeps_every_line() -> None:
    assert read_lines(b"a\n\nb\r\n  \nlast") == ["a", "", "b", "  ", "last"]
    assert read_lines(b"a\n") == ["a"] and read_lines(b"") == [] and read_lines(b"\n") == [""]
    assert read_lines("caf\u00e9 \u2028 x\n".encode()) == ["caf\u00e9 \u2028 x"]  # U+2028 is not a newline


def test_make_batches_respects_the_budget() -> None:
    lengths = [5, 0, 9, 3, 9, 2, 7]
    batches = make_batches(lengths, max_tokens=20, max_sentences=3)
    assert sorted(i for b in batches for i in b) == [0, 2, 3, 4, 5, 6]  # empty source 1 skipped
    for batch in batches:
        assert len(batch) <= 3 and len(batch) * max(lengths[i] for i in batch) <= 20
        assert lengths[batch[0]] == max(lengths[i] for i in batch)


def test_every_line_survives_in_order(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    lines = [
        "a man plays with the ball",
        "",
        "   ",
        "the dog " * 30,  # over --max-input-tokens: truncated with a warning
        "a red house",
        "",
        "the cat sits on a big blue ball with a small dog",
    ]
    source = tmp_path / "in.txt"
    source.write_bytes(("\r\n".join(lines[:3]) + "\n" + "\n".join(lines[3:])).encode())  # no final newline
    assert (
        run("-m", checkpoint, "-i", source, "-o", tmp_path / "out.txt", "--max-input-tokens", "30", *FAST)
        == 0
    )
    warnings = capsys.readouterr().err
    assert "line 4:" in warnings and "truncated" in warnings and "line 7" not in warnings
    out = (tmp_path / "out.txt").read_text(encoding="utf-8")
    assert out.endswith("\n") and out.count("\n") == len(lines)
    outputs = out.split("\n")[:-1]
    assert [o == "" for o in outputs[1:3]] == [True, True] and outputs[5] == ""

    # Batching changes nothing: a one-sentence budget gives the same file ...
    assert run("-m", checkpoint, "-i", source, "-o", tmp_path / "one.txt", "--max-input-tokens", "30",
               "--max-sentences", "1", *FAST) == 0  # fmt: skip
    assert (tmp_path / "one.txt").read_text(encoding="utf-8") == out
    # ... and so does beam search run directly on each line alone.
    model, tokenizer = load_model(checkpoint)
    for line, output in zip(lines, outputs, strict=True):
        ids = tokenizer.encode([line])[0][:29]
        if not ids:
            assert output == ""
            continue
        src = torch.tensor([ids + [EOS_ID]])
        best = beam_search(model, src, torch.tensor([src.size(1)]), beam_size=5, alpha=0.6, max_len_b=3)[0][0]
        assert output == tokenizer.decode([best.tokens])[0]


def test_bf16_search_keeps_every_line_and_float32_scores(checkpoint: Path, tmp_path: Path) -> None:
    """`--bf16` runs the network under bfloat16 autocast; the one-line rule and the score dtype hold."""
    source = tmp_path / "in.txt"
    source.write_text("a man plays with the ball\n\nthe red cat sits on a house\n")
    assert run("-m", checkpoint, "-i", source, "-o", tmp_path / "out.jsonl", "--bf16",
               "--output-format", "jsonl", *FAST) == 0  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3] and records[1]["translation"] == ""
    assert all(isinstance(r["score"], float) for r in (records[0], records[2]))
    model, tokenizer = load_model(checkpoint)
    src = torch.tensor([tokenizer.encode(["a red house"])[0] + [EOS_ID]])
    lengths = torch.tensor([src.size(1)])
    exact = beam_search(model, src, lengths, beam_size=3, max_len_b=3)[0][0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = beam_search(model, src, lengths, beam_size=3, max_len_b=3)[0][0]
    assert fast.tokens == exact.tokens and fast.log_prob == pytest.approx(exact.log_prob, rel=0.02)


def test_invalid_utf8_stops_before_writing(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"a dog\na cat\nthe \xff\xfe house\n")
    target.write_text("previous results\n")
    assert run("-m", checkpoint, "-i", source, "-o", target, *FAST) == 2
    err = capsys.readouterr().err
    assert "line 3" in err and "UTF-8" in err and "Traceback" not in err
    assert target.read_text() == "previous results\n"
    assert run("-m", checkpoint, "-i", source, *FAST) == 2  # stdout: nothing printed
    assert capsys.readouterr().out == ""


def test_failed_run_leaves_no_partial_output(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, target = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("a dog\n" + "the red cat sits on a house\n" * 3)
    target.write_text("previous results\n")
    calls = []

    def fail_on_second_batch(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return beam_search(*args, **kwargs)

    monkeypatch.setattr(translate_module, "beam_search", fail_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run("-m", checkpoint, "-i", source, "-o", target, "--max-sentences", "1", *FAST)
    assert target.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def test_export_translates_like_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a man and a dog\nthe green ball\n\nsmall cat on the street\n")
    bundle = export_bundle(checkpoint, tmp_path / "bundle")
    assert run("-m", checkpoint, "-i", source, "-o", tmp_path / "a.txt", *FAST) == 0
    assert run("-m", bundle, "-i", source, "-o", tmp_path / "b.txt", *FAST) == 0
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    assert (tmp_path / "a.txt").read_text().count("\n") == 4


def test_jsonl_carries_scores_nbest_and_experts(checkpoint: Path, tmp_path: Path) -> None:
    source, target = tmp_path / "in.txt", tmp_path / "out.jsonl"
    source.write_text("a man and a dog\n\nthe green ball\n")
    args = ["-m", checkpoint, "-i", source, "-o", target, "--output-format", "jsonl", "--nbest", "3"]
    assert run(*args, "--experts", *FAST) == 0
    records = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3]
    assert records[1] == {"line": 2, "translation": "", "score": None, "log_prob": None, "tokens": [],
                          "experts": []}  # fmt: skip
    for record in (records[0], records[2]):
        scores = [h["score"] for h in record["nbest"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert record["score"] == scores[0] and record["tokens"] == record["nbest"][0]["tokens"]
        assert len(record["experts"]) == len(record["tokens"])
        for per_layer in record["experts"]:  # one decoder MoE layer, k=2 of 4 experts
            assert len(per_layer) == 1 and len(per_layer[0]) == 2 and all(0 <= e < 4 for e in per_layer[0])


def test_bad_option_combinations_exit_2(checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run("-m", checkpoint, "--nbest", "2")
    assert exit_info.value.code == 2 and "jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("-m", checkpoint, "--beam", "0")
    assert run("-m", Path("/nonexistent/model.ckpt"), "-i", Path(__file__)) == 2
    assert "no such file" in capsys.readouterr().err


def test_config_file_translates_like_the_flags(checkpoint: Path, tmp_path: Path) -> None:
    """Every flag, the generated search flags included, is a YAML key of `--config`; flags after it win."""
    source = tmp_path / "in.txt"
    source.write_text("a man plays with the ball\n\nthe cat sits on a big blue ball\n")
    flags = ["-i", source, "--beam", "3", "--nbest", "2", "--alpha", "0.2", "--output-format", "jsonl"]
    assert run("-m", checkpoint, "-o", tmp_path / "flags.jsonl", *flags, *FAST) == 0
    config = tmp_path / "translate.yaml"
    settings = {
        "model": [str(checkpoint)], "input": str(source), "beam_size": 3, "nbest": 2, "alpha": 0.2,
        "output_format": "jsonl", "max_len_b": 3, "quiet": True, "output": str(tmp_path / "x"),
    }  # fmt: skip
    config.write_text(json.dumps(settings))  # JSON is YAML
    assert run("--config", config, "-o", tmp_path / "config.jsonl") == 0
    assert (tmp_path / "config.jsonl").read_text() == (tmp_path / "flags.jsonl").read_text()
    assert not (tmp_path / "x").exists()
    rows = [json.loads(row) for row in (tmp_path / "config.jsonl").read_text().splitlines()]
    assert [len(row.get("nbest", [])) for row in rows] == [2, 0, 2]  # the empty line has no n-best list


def test_stdin_to_stdout_without_lightning(checkpoint: Path) -> None:
    """The installed entry point's path: a fresh process, no Lightning or datasets import."""
    code = (
        "import sys; from nmt_moe.cli import main; rc = main(sys.argv[1:]); "
        "heavy = [m for m in ('pytorch_lightning', 'lightning', 'datasets', 'wandb') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(rc)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "translate", "-m", str(checkpoint), *FAST],
        input="a dog\n\nthe caf\u00e9 house\n".encode(),
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode("utf-8")
    assert out.count("\n") == 3 and out.split("\n")[1] == ""
    assert done.stderr == b""  # no progress bar for stdin


@pytest.mark.slow
def test_real_training_checkpoint_export_translate_average(tmp_path: Path) -> None:
    """The whole path users take: `nmt-moe train` (tiny_copy recipe) -> export / average -> translate."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "WANDB_MODE": "offline"}
    options = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    make_data = [sys.executable, str(root / "recipes/tiny_copy/make_data.py"), "data/tiny_copy"]
    subprocess.run(make_data, check=True, **options)
    train = [
        sys.executable,
        "-m",
        "nmt_moe.cli",
        "train",
        "fit",
        "--config",
        str(root / "recipes/tiny_copy/config.yaml"),
    ]
    done = subprocess.run(train, **options)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoints = sorted((tmp_path / "runs/tiny_copy/checkpoints").glob("*.ckpt"))
    last = tmp_path / "runs/tiny_copy/checkpoints/last.ckpt"
    assert main(["export", str(last), "-o", str(tmp_path / "bundle")]) == 0
    source = tmp_path / "data/tiny_copy/test.src"
    assert run("-m", last, "-i", source, "-o", tmp_path / "a.txt", "--quiet") == 0
    assert run("-m", tmp_path / "bundle", "-i", source, "-o", tmp_path / "b.txt", "--quiet") == 0
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    assert main(["average", "-o", str(tmp_path / "avg.ckpt"), *map(str, checkpoints)]) == 0
    assert run("-m", tmp_path / "avg.ckpt", "-i", source, "-o", tmp_path / "c.txt", "--quiet") == 0
    # the recipe trains copying to (near) perfection, so the translation is the source
    reference = (tmp_path / "data/tiny_copy/test.tgt").read_text().splitlines()
    hypotheses = (tmp_path / "a.txt").read_text().splitlines()
    assert sum(h == r for h, r in zip(hypotheses, reference, strict=True)) >= 0.9 * len(reference)

"""`nmt-moe score`: forced-decoding log-probs equal beam search's own log-prob of the same hypothesis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_corpus
from helpers.tiny_trained import trained_tiny_checkpoint

from nmt_moe.checkpoint import load_model
from nmt_moe.cli import main
from nmt_moe.data.text_io import encode_sources
from nmt_moe.decoding.beam import beam_search
from nmt_moe.decoding.search import max_target_lengths
from nmt_moe.scoring import score_pairs

LINES = ["a man plays with the ball", "", "the red cat sits", "small dog on a big blue house street", "a"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_tiny_checkpoint(tmp_path_factory.mktemp("model") / "trained.ckpt")


def test_score_equals_beam_log_prob_of_each_nbest_hypothesis(checkpoint: Path) -> None:
    model, tokenizer = load_model(checkpoint)
    sources = [s for s in encode_sources(LINES, tokenizer, max_input_tokens=64) if s]
    checked = 0
    for source in sources:
        src, lengths = torch.tensor([source]), torch.tensor([len(source)])
        max_len = int(max_target_lengths(lengths, 1.5, 10))
        for hyp in beam_search(model, src, lengths, beam_size=4, nbest=4, alpha=0.0)[0]:
            if len(hyp.tokens) == max_len:  # ended at the length limit, without EOS: not a full sentence
                continue
            (per_token,) = score_pairs(model, [source], [hyp.tokens])
            assert len(per_token) == len(hyp.tokens) + 1
            assert sum(per_token) == pytest.approx(hyp.log_prob, abs=1e-4)
            assert hyp.score == hyp.log_prob  # no length penalty: the score is the log-prob
            checked += 1
    assert checked >= 8, "too few hypotheses ended with EOS for the test to mean anything"


def test_batched_scores_equal_one_pair_at_a_time(checkpoint: Path) -> None:
    model, tokenizer = load_model(checkpoint)
    sources = [s or [3] for s in encode_sources(LINES, tokenizer, max_input_tokens=64)]
    targets = tokenizer.encode(list(reversed(LINES)))
    batched = score_pairs(model, sources, targets)
    for source, target, row in zip(sources, targets, batched, strict=True):
        alone = score_pairs(model, [source], [target])[0]
        assert row == pytest.approx(alone, abs=1e-5)


def test_score_cli_matches_translate_jsonl(checkpoint: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src.txt"
    lines = LINES + tiny_corpus(12, seed=3)
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["-m", str(checkpoint), "-i", str(src), "-o", str(out), "--alpha", "0", "--quiet"]
    assert main(["translate", *args, "--output-format", "jsonl"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tgt = tmp_path / "tgt.txt"
    tgt.write_text("".join(r["translation"] + "\n" for r in records))
    assert main(["score", "-m", str(checkpoint), "--src", str(src), "--tgt", str(tgt), "-o",
                 str(tmp_path / "scores.txt")]) == 0  # fmt: skip
    scores = [float(x) for x in (tmp_path / "scores.txt").read_text().splitlines()]
    assert len(scores) == len(lines)
    _, tokenizer = load_model(checkpoint)
    compared = 0
    for line, record, score in zip(lines, records, scores, strict=True):
        same_ids = tokenizer.encode([record["translation"]])[0] == record["tokens"]
        max_len = int(1.5 * (len(tokenizer.encode([line])[0]) + 1) + 10)
        if record["log_prob"] is not None and same_ids and len(record["tokens"]) < max_len:
            assert score == pytest.approx(record["log_prob"], abs=1e-4)
            compared += 1
    assert compared >= 3
    assert main(["score", "-m", str(checkpoint), "--src", str(src), "--tgt", str(tgt), "--per-token"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == len(lines)
    for row, score in zip(rows, scores, strict=True):
        assert sum(map(float, row.split())) == pytest.approx(score, abs=1e-4)


def test_score_cli_refuses_bad_input_in_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("a\nb\n")
    tgt.write_text("a\n")
    assert main(["score", "-m", str(checkpoint), "--src", str(src), "--tgt", str(tgt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 lines" in err and "Traceback" not in err
    tgt.write_bytes(b"a\n\xff\n")
    assert main(["score", "-m", str(checkpoint), "--src", str(src), "--tgt", str(tgt)]) == 2
    assert "line 2" in capsys.readouterr().err

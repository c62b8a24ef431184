"""`translate -m A -m B`: members' log-probs averaged at every step; one vocabulary; A with A is A."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_checkpoint, tiny_model, tiny_tokenizer

from nmt_moe.checkpoint import save_checkpoint
from nmt_moe.cli import main
from nmt_moe.data.text_io import encode_sources
from nmt_moe.data.tokenizer import BOS_ID
from nmt_moe.decoding.ensemble import Ensemble, load_models

LINES = "a man plays with the ball\n\nthe red cat sits on a big blue house\nsmall dog\n"
FAST = ["--max-len-b", "4", "--quiet"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    tiny_checkpoint(root / "a.ckpt", seed=0)
    tiny_checkpoint(root / "b.ckpt", seed=1)
    return root / "a.ckpt", root / "b.ckpt"


def translate(tmp_path: Path, name: str, *args: str | Path) -> str:
    source = tmp_path / "in.txt"
    source.write_text(LINES)
    assert main(["translate", *map(str, args), "-i", str(source), "-o", str(tmp_path / name), *FAST]) == 0
    return (tmp_path / name).read_text()


@pytest.mark.parametrize("search", [["--beam", "5"], ["--beam", "1", "--alpha", "0"], ["--nbest", "3"]])
def test_a_model_ensembled_with_itself_is_the_model(models, tmp_path: Path, search: list[str]) -> None:
    a, _ = models
    jsonl = ["--output-format", "jsonl", *search]
    alone = translate(tmp_path, "alone", "-m", a, *jsonl)
    assert translate(tmp_path, "twice", "-m", a, "-m", a, *jsonl) == alone  # scores too, bit for bit
    assert alone.count("\n") == LINES.count("\n")


def test_each_step_averages_the_members_log_probs(models) -> None:
    a, b = models
    ensemble, tokenizer = load_models([a, b])
    members = list(ensemble.members)
    src_ids = [s for s in encode_sources(LINES.splitlines(), tokenizer, max_input_tokens=64) if s]
    src = torch.zeros(len(src_ids), max(map(len, src_ids)), dtype=torch.long)
    for i, ids in enumerate(src_ids):
        src[i, : len(ids)] = torch.tensor(ids)
    lengths = torch.tensor([len(ids) for ids in src_ids])
    prev = torch.full((len(src_ids),), BOS_ID)
    enc, state = ensemble.encode(src, lengths), None
    encs = [m.encode(src, lengths) for m in members]
    state = ensemble.init_state(enc)
    states = [m.init_state(e) for m, e in zip(members, encs, strict=True)]
    with torch.no_grad():
        for _ in range(3):
            step = ensemble.decode_step(prev, state, enc)
            parts = [m.decode_step(prev, s, e) for m, s, e in zip(members, states, encs, strict=True)]
            torch.testing.assert_close(step.log_probs, (parts[0].log_probs + parts[1].log_probs) / 2)
            assert not torch.equal(parts[0].log_probs, parts[1].log_probs)
            prev, state, states = step.log_probs.argmax(1), step.state, [p.state for p in parts]


def test_ensemble_translates_differently_from_either_member(models, tmp_path: Path) -> None:
    a, b = models
    both = translate(tmp_path, "ab", "-m", a, "-m", b)
    assert both.count("\n") == LINES.count("\n")
    assert both != translate(tmp_path, "a", "-m", a) or both != translate(tmp_path, "b", "-m", b)


def test_models_of_different_vocabularies_are_refused(models, tmp_path: Path, capsys) -> None:
    tokenizer = tiny_tokenizer(vocab_size=48)
    save_checkpoint(tmp_path / "other.ckpt", tiny_model(tokenizer.vocab_size), tokenizer)
    source = tmp_path / "in.txt"
    source.write_text(LINES)
    code = main(["translate", "-m", str(models[0]), "-m", str(tmp_path / "other.ckpt"), "-i", str(source),
                 "-o", str(tmp_path / "out"), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "vocabulary" in err and "other.ckpt" in err
    assert not (tmp_path / "out").exists()


def test_ensemble_is_a_module_in_eval_mode(models) -> None:
    ensemble, _ = load_models(list(models))
    assert isinstance(ensemble, Ensemble) and not ensemble.training and len(ensemble.members) == 2

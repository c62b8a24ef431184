"""Checkpoint loading, export bundles, averaging and atomic writes (nmt_moe/checkpoint.py).

The tiny model builders (`tiny_tokenizer`, `tiny_model`, `tiny_checkpoint`): tests/helpers/tiny_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import tiny_checkpoint, tiny_model, tiny_tokenizer

from nmt_moe.averaging import average_checkpoints, last_checkpoints
from nmt_moe.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ModelLoadError,
    atomic_write,
    export_bundle,
    load_model,
    save_checkpoint,
)
from nmt_moe.cli.average import main as average_main
from nmt_moe.cli.export import main as export_main
from nmt_moe.decoding.beam import beam_search


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model, tokenizer = tiny_checkpoint(tmp_path / "a.ckpt")
    loaded, loaded_tok = load_model(tmp_path / "a.ckpt")
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded_tok.to_bytes() == tokenizer.to_bytes()
    assert_same_weights(model, loaded)


def test_export_bundle_translates_like_the_checkpoint(tmp_path: Path) -> None:
    model, tokenizer = tiny_checkpoint(tmp_path / "a.ckpt")
    out = export_bundle(tmp_path / "a.ckpt", tmp_path / "bundle")
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE])
    assert json.loads((out / CONFIG_FILE).read_text())["model_config"] == model.config
    bundled, bundled_tok = load_model(out)
    assert_same_weights(model, bundled)
    src = torch.tensor([tokenizer.encode(["a red dog plays"])[0] + [3]])
    lengths = torch.tensor([src.size(1)])
    first = beam_search(model, src, lengths, beam_size=3, max_len_b=5)
    second = beam_search(bundled, src, lengths, beam_size=3, max_len_b=5)
    assert first[0][0].tokens == second[0][0].tokens
    # a second export replaces the bundle in place; a directory that is not a bundle is refused
    export_bundle(out, out)
    load_model(out)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelLoadError, match="not an export directory"):
        export_bundle(tmp_path / "a.ckpt", tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"


class NotATensor:
    pass


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing", "no such file"),
        ("truncated", "truncated or corrupt"),
        ("unsafe", "weights_only"),
        ("version", "format version 99"),
        ("no_section", "no nmt-moe model config"),
        ("missing_weight", "weights do not match"),
        ("bad_config", "does not fit"),
        ("vocab", "different runs"),
    ],
)
def test_bad_checkpoints_give_one_clear_error(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "m.ckpt"
    model, tokenizer = tiny_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "unsafe":
        checkpoint["callbacks"] = NotATensor()
        torch.save(checkpoint, path)
    elif damage == "version":
        checkpoint["nmt_moe"]["version"] = 99
        torch.save(checkpoint, path)
    elif damage == "no_section":
        del checkpoint["nmt_moe"]
        torch.save(checkpoint, path)
    elif damage == "missing_weight":
        checkpoint["state_dict"].pop(next(iter(checkpoint["state_dict"])))
        torch.save(checkpoint, path)
    elif damage == "bad_config":
        checkpoint["nmt_moe"]["model_config"]["no_such_option"] = 1
        torch.save(checkpoint, path)
    elif damage == "vocab":
        checkpoint["nmt_moe"]["tokenizer"] = tiny_tokenizer(vocab_size=50).to_bytes()
        torch.save(checkpoint, path)
    with pytest.raises(ModelLoadError, match=message) as error:
        load_model(path)
    assert "\n" not in str(error.value)


def test_broken_bundle_names_the_missing_file(tmp_path: Path) -> None:
    tiny_checkpoint(tmp_path / "a.ckpt")
    bundle = export_bundle(tmp_path / "a.ckpt", tmp_path / "bundle")
    (bundle / TOKENIZER_FILE).unlink()
    with pytest.raises(ModelLoadError, match=TOKENIZER_FILE):
        load_model(bundle)


def test_export_main_reports_errors_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert export_main([str(tmp_path / "nope.ckpt"), "-o", str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    tiny_checkpoint(tmp_path / "a.ckpt")
    assert export_main([str(tmp_path / "a.ckpt"), "-o", str(tmp_path / "out")]) == 0
    load_model(tmp_path / "out")


def test_average_is_the_elementwise_mean(tmp_path: Path) -> None:
    paths = [tmp_path / f"epoch=0-step={step}.ckpt" for step in (10, 20, 30)]
    models = [tiny_checkpoint(p, seed=i, global_step=(i + 1) * 10)[0] for i, p in enumerate(paths)]
    averaged = average_checkpoints(paths)
    assert averaged["global_step"] == 30 and "optimizer_states" not in averaged
    for key, value in averaged["state_dict"].items():
        name = key.removeprefix("model.")
        expected = torch.stack([m.state_dict()[name].double() for m in models]).mean(0)
        torch.testing.assert_close(value.double(), expected, msg=key)
    # --last 2 picks the two highest steps, skips last.ckpt, and writes a checkpoint that loads
    (tmp_path / "last.ckpt").write_bytes(paths[0].read_bytes())
    assert last_checkpoints(tmp_path, 2) == paths[1:]
    assert average_main(["--last", "2", str(tmp_path), "-o", str(tmp_path / "avg.ckpt")]) == 0
    model, _ = load_model(tmp_path / "avg.ckpt")
    expected = (
        models[1].state_dict()["encoder.embedding.weight"]
        + models[2].state_dict()["encoder.embedding.weight"]
    ) / 2
    torch.testing.assert_close(model.state_dict()["encoder.embedding.weight"], expected)


def test_average_refuses_different_models(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_checkpoint(tmp_path / "a.ckpt")
    tokenizer = tiny_tokenizer()
    save_checkpoint(tmp_path / "b.ckpt", tiny_model(tokenizer.vocab_size, ffn="dense"), tokenizer)
    code = average_main([str(tmp_path / "a.ckpt"), str(tmp_path / "b.ckpt"), "-o", str(tmp_path / "x.ckpt")])
    assert code == 2 and "model config differs" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()
    assert average_main(["--last", "5", str(tmp_path), "-o", str(tmp_path / "x.ckpt")]) == 2
    assert "fewer than 5" in capsys.readouterr().err


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old complete content\n")
    with pytest.raises(RuntimeError), atomic_write(target, "w", encoding="utf-8") as handle:
        handle.write("half of the new")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old complete content\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left behind
    with atomic_write(target, "w", encoding="utf-8") as handle:
        handle.write("new\n")
    assert target.read_text() == "new\n"

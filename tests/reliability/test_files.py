"""Untrusted, corrupt and foreign files through every entry point that loads or writes them.

A crafted checkpoint whose pickle would run code is refused by `translate`, `export`, `average` and by
`train --ckpt_path` (Lightning's loader, even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1); truncated files,
another vocabulary or model, and a bundle of another format version give one-line errors with exit code 2;
checkpoints are written atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import one_line_error
from helpers.tiny_models import tiny_checkpoint, tiny_tokenizer
from helpers.training import train, write_copy_task

from nmt_moe.checkpoint import CONFIG_FILE, WEIGHTS_FILE, ModelLoadError, export_bundle, save_checkpoint
from nmt_moe.cli import main
from nmt_moe.data.tokenizer import train_tokenizer
from nmt_moe.training.faults import SafeCheckpointIO


class RunsCode:
    """Unpickling this object calls exec(): what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A real nmt-moe checkpoint with one extra entry that runs code when unpickled."""
    tiny_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["callbacks"] = {"Evil": RunsCode(marker)}
    torch.save(checkpoint, path)
    return path


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["nmt-moe"])


def test_the_crafted_checkpoint_does_run_code_when_unpickled(tmp_path: Path) -> None:
    """Guards the tests below: the payload is live, so refusing it proves something."""
    path = crafted_checkpoint(tmp_path / "evil.ckpt", tmp_path / "marker")
    torch.load(path, weights_only=False)
    assert (tmp_path / "marker").read_text() == "pwned"


@pytest.mark.parametrize("command", ["translate", "export", "average", "io"])
def test_crafted_checkpoint_is_refused_everywhere(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # must not re-enable unsafe loading
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    if command == "io":
        with pytest.raises(ModelLoadError, match="weights_only"):
            SafeCheckpointIO().load_checkpoint(path)
    else:
        (tmp_path / "in.txt").write_text("a man\n")
        argv = {
            "translate": ["translate", "-m", path, "-i", tmp_path / "in.txt", "-o", tmp_path / "out.txt"],
            "export": ["export", path, "-o", tmp_path / "bundle"],
            "average": ["average", path, path, "-o", tmp_path / "avg.ckpt"],
        }[command]
        assert main([str(a) for a in argv]) == 2
        assert "weights_only" in one_line_error(capsys.readouterr().err)
        assert not any(p.name in ("out.txt", "bundle", "avg.ckpt") for p in tmp_path.iterdir())
    assert not marker.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncated", "truncated or corrupt"),
        ("random", "truncated or corrupt"),
        ("empty", "truncated or corrupt"),
        ("vocab", "SentencePiece vocabulary has"),
    ],
)
def test_damaged_checkpoints_fail_translate_in_one_line(
    damage: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "m.ckpt"
    tiny_checkpoint(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "random":
        path.write_bytes(
            torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy()
        )
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # the weights of a 64-piece model with a 50-piece SentencePiece model
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["nmt_moe"]["tokenizer"] = tiny_tokenizer(vocab_size=50).to_bytes()
        torch.save(checkpoint, path)
    (tmp_path / "in.txt").write_text("a man\n")
    assert (
        main(["translate", "-m", str(path), "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o")]) == 2
    )
    line = one_line_error(capsys.readouterr().err)
    assert message in line and str(path) in line
    assert not (tmp_path / "o").exists()


def test_bundle_of_another_version_says_which(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tiny_checkpoint(tmp_path / "m.ckpt")
    bundle = export_bundle(tmp_path / "m.ckpt", tmp_path / "bundle")
    config = json.loads((bundle / CONFIG_FILE).read_text())
    config["version"] = 2
    (bundle / CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / "in.txt").write_text("a man\n")
    assert main(["translate", "-m", str(bundle), "-i", str(tmp_path / "in.txt"), "--quiet"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "format version 2" in line and "reads version 1" in line


def test_checkpoint_io_writes_atomically(tmp_path: Path) -> None:
    """A save that dies half way leaves the previous checkpoint intact and no temp file behind."""
    io, path = SafeCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"pytorch-lightning_version": "2.6.6", "weights": torch.zeros(1000)}, path)
    before = path.read_bytes()

    class Unsaveable:
        def __reduce__(self) -> tuple:
            raise RuntimeError("disk full")  # fails after part of the file was written

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"weights": torch.ones(1000), "z": Unsaveable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert torch.equal(io.load_checkpoint(path)["weights"], torch.zeros(1000))
    with pytest.raises(FileNotFoundError):  # what Lightning expects for a missing checkpoint
        io.load_checkpoint(tmp_path / "nope.ckpt")


# --- train --ckpt_path: the same refusals through Lightning's checkpoint loading ----------------------------


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_copy_task(tmp_path_factory.mktemp("copy_data"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def resume_from(checkpoint: Path, data: Path, root: Path, capsys: pytest.CaptureFixture) -> str:
    """`nmt-moe train fit --ckpt_path checkpoint` must fail with exit code 2; returns its error line."""
    code = train(
        "fit", data, root, "--wandb", "off", "--trainer.max_steps", "1", "--ckpt_path", str(checkpoint)
    )
    assert code == 2
    return one_line_error(capsys.readouterr().err)


def test_train_resume_refuses_unsafe_corrupt_and_foreign_checkpoints(
    copy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # Lightning alone would then unpickle
    marker = tmp_path / "marker"
    evil = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    tiny_checkpoint(tmp_path / "ok.ckpt")
    assert "weights_only" in resume_from(evil, copy_data, tmp_path / "run", capsys)
    assert not marker.exists()

    bundle_weights = export_bundle(evil.with_name("ok.ckpt"), tmp_path / "bundle") / WEIGHTS_FILE
    assert "not a checkpoint written by `nmt-moe train`" in resume_from(
        bundle_weights, copy_data, tmp_path / "run", capsys
    )

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(evil.read_bytes()[:1000])
    assert "truncated or corrupt" in resume_from(truncated, copy_data, tmp_path / "run", capsys)

    # checkpoints of the recipe's model shape (vocab 56) but another model or another vocabulary
    recipe_model = dict(embed_dim=64, hidden_size=128, attention="dot", input_feeding=False, dropout=0.0,
                        tie_embeddings=False, share_embeddings=False, encoder_moe_after=[1],
                        decoder_moe_after=[1])  # fmt: skip
    other_words = train_tokenizer([f"w{i} x{i % 7} y{i % 13}" for i in range(400)], 56, model_type="bpe")
    cases = {
        "experts": _seq2seq(vocab_size=56, moe=dict(num_experts=8, k=2, d_hidden=64), **recipe_model),
        "vocab": _seq2seq(vocab_size=56, moe=dict(num_experts=4, k=2, d_hidden=64), **recipe_model),
    }
    for name, model in cases.items():
        save_checkpoint(
            tmp_path / f"{name}.ckpt", model, other_words, **{"pytorch-lightning_version": "2.6.6"}
        )
        line = resume_from(tmp_path / f"{name}.ckpt", copy_data, tmp_path / "run", capsys)
        expected = "num_experts=8 there, 4 here" if name == "experts" else "another SentencePiece vocabulary"
        assert expected in line, line


def _seq2seq(**config: object) -> torch.nn.Module:
    from nmt_moe.models import Seq2Seq, Seq2SeqConfig

    return Seq2Seq(Seq2SeqConfig.from_dict(config))

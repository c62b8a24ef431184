"""Export bundles are replaced in one atomic step, and everything nmt-moe writes follows the umask.

The replacement is checked at every step it takes: before and after each rename or delete, the bundle path
must hold a complete bundle (old or new) that loads, which is what a crash at that point would leave.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.tiny_models import tiny_checkpoint

from nmt_moe import atomic_files
from nmt_moe.checkpoint import export_bundle, load_model, save_checkpoint
from nmt_moe.cli import main
from nmt_moe.training.faults import SafeCheckpointIO


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[key] == b[key]).all()) for key in a)


def config_of(bundle: Path) -> dict:
    model, _ = load_model(bundle)  # raises when the directory is missing or incomplete
    return model.config


def test_replacing_a_bundle_leaves_a_complete_one_at_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_model, _ = tiny_checkpoint(tmp_path / "old.ckpt", seed=0)
    new_model, _ = tiny_checkpoint(tmp_path / "new.ckpt", seed=1)
    bundle = export_bundle(tmp_path / "old.ckpt", tmp_path / "bundle")
    seen: list[str] = []

    def checked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            seen.append(name)
            assert config_of(bundle) is not None, f"no bundle before {name}"
            result = fn(*args, **kwargs)
            assert config_of(bundle) is not None, f"no bundle after {name}"
            return result

        return step

    for name in ("_exchange",):
        monkeypatch.setattr(atomic_files, name, checked(name, getattr(atomic_files, name)))
    monkeypatch.setattr(atomic_files.os, "replace", checked("os.replace", os.replace))
    monkeypatch.setattr(atomic_files.shutil, "rmtree", checked("rmtree", atomic_files.shutil.rmtree))
    export_bundle(tmp_path / "new.ckpt", bundle)
    assert "_exchange" in seen
    loaded, _ = load_model(bundle)
    assert all(
        (a == b).all()
        for a, b in zip(loaded.state_dict().values(), new_model.state_dict().values(), strict=True)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "new.ckpt", "old.ckpt"]  # nothing left


def test_a_crash_before_or_after_the_swap_keeps_a_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_checkpoint(tmp_path / "old.ckpt", seed=0)
    tiny_checkpoint(tmp_path / "new.ckpt", seed=1)
    bundle = export_bundle(tmp_path / "old.ckpt", tmp_path / "bundle")
    before = load_model(bundle)[0].state_dict()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt  # what a signal does to Python mid-way

    monkeypatch.setattr(atomic_files, "_exchange", crash)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tmp_path / "new.ckpt", bundle)
    assert same_weights(load_model(bundle)[0].state_dict(), before)  # the old bundle
    monkeypatch.undo()
    monkeypatch.setattr(atomic_files.shutil, "rmtree", crash)  # the swap is done, the old one not deleted
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tmp_path / "new.ckpt", bundle)
    assert not same_weights(load_model(bundle)[0].state_dict(), before)  # the new bundle


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], indirect=True)
def test_written_files_follow_the_umask(umask: int, tmp_path: Path) -> None:
    model, tokenizer = tiny_checkpoint(tmp_path / "m.ckpt")
    files = {tmp_path / "m.ckpt"}
    save_checkpoint(tmp_path / "direct.ckpt", model, tokenizer)
    SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "trainer.ckpt")
    bundle = export_bundle(tmp_path / "m.ckpt", tmp_path / "bundle")
    (tmp_path / "in.txt").write_text("a man\n")
    argv = ["translate", "-m", str(bundle), "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.txt")]
    assert main([*argv, "--beam", "1", "--quiet"]) == 0
    files |= {tmp_path / "direct.ckpt", tmp_path / "trainer.ckpt", tmp_path / "out.txt", *bundle.iterdir()}
    for path in files:
        assert mode(path) == 0o666 & ~umask, path
    assert mode(bundle) == 0o777 & ~umask

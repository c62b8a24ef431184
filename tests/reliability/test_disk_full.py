"""A disk that fills up while `nmt-moe train` writes a checkpoint: one clear line on stderr, a non-zero exit,
and the previous `last.ckpt` intact and loadable (the partial file is removed).

The fault is injected below torch.save, where the operating system would report it: the checkpoint's temp
file (opened by `atomic_write` with `os.fdopen`) raises OSError(ENOSPC) once it holds a few kilobytes.
torch.save turns that into an opaque RuntimeError ("unexpected pos ..."); the run must still say "No space
left on device".
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import one_line_error
from helpers.training import train

from nmt_moe.training.faults import CheckpointWriteError, SafeCheckpointIO


class FillsUp:
    """A file that takes `room` bytes, then fails every write as a full disk does."""

    def __init__(self, handle: Any, room: int) -> None:
        self.handle, self.room = handle, room

    def write(self, data: Any) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.handle.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


def fill_disk_after(monkeypatch: pytest.MonkeyPatch, saves: int, room: int = 4096) -> None:
    """From the (saves + 1)-th checkpoint temp file on, the disk is full after `room` bytes."""
    real_fdopen, opened = os.fdopen, []

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        handle = real_fdopen(fd, *args, **kwargs)
        if ".ckpt." not in os.readlink(f"/proc/self/fd/{fd}"):
            return handle
        opened.append(fd)
        return FillsUp(handle, room) if len(opened) > saves else handle

    monkeypatch.setattr(os, "fdopen", fdopen)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(
    copy_data: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["nmt-moe"])
    fill_disk_after(monkeypatch, saves=1)  # the step-3 last.ckpt is written, the step-6 one fails
    extra = ["--wandb", "off", "--trainer.max_steps", "9", "--last_checkpoint.every_n_train_steps", "3",
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0"]  # fmt: skip
    assert train("fit", copy_data, tmp_path, *extra) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "No space left on device" in line and str(tmp_path / "checkpoints" / "last.ckpt") in line
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no temp left


def test_a_real_bug_in_saving_is_not_reported_as_a_full_disk(tmp_path: Path) -> None:
    with pytest.raises(Exception) as error:  # noqa: B017 - whatever torch raises, it is not ours
        SafeCheckpointIO().save_checkpoint({"fn": lambda: None}, tmp_path / "x.ckpt")
    assert not isinstance(error.value, CheckpointWriteError)
    assert list(tmp_path.iterdir()) == []

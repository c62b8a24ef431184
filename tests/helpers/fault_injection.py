"""Callbacks that inject real faults into a `nmt-moe train` process at an exact point of training.

Tests add them to a run's config (`trainer.callbacks`, `helpers.fault_injection.SignalAt`) with tests/ on
PYTHONPATH, so the signal arrives where the test needs it rather than wherever a polling parent happens to
catch the child.
"""

from __future__ import annotations

import os
import signal
import time

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Sends `signal` (a name: SIGTERM, SIGINT, SIGKILL) to this process once, at `when`:

    - "epoch_end": at the start of the last batch of the first epoch (the run saves at the epoch's end);
    - "validation": at the start of the first validation at or after optimizer step `step`;
    - "batch": at the start of the batch that makes optimizer step `step` + 1;
    - "backward": in the middle of that step, between its forward and its backward (under DDP: before the
      gradient all-reduce, which the other ranks then wait in).

    Only on global rank `rank` (default: every rank). With `stamp`, first writes the time.time() of the
    signal to `<stamp>.rank<r>`, and every rank writes its process id to `<stamp>.pid<r>` at the start.
    """

    def __init__(
        self, when: str, step: int = 0, signal: str = "SIGTERM", rank: int | None = None, stamp: str = ""
    ) -> None:
        if when not in ("epoch_end", "validation", "batch", "backward"):
            raise ValueError(f"unknown point {when!r}")
        self.when, self.step, self.signal, self.rank, self.stamp = when, step, signal, rank, stamp
        self.sent = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stamp:
            with open(f"{self.stamp}.pid{trainer.global_rank}", "w") as f:
                f.write(str(os.getpid()))

    def _send(self, trainer: pl.Trainer) -> None:
        if self.sent or self.rank not in (None, trainer.global_rank):
            return
        self.sent = True
        if self.stamp:
            with open(f"{self.stamp}.rank{trainer.global_rank}", "w") as f:
                f.write(repr(time.time()))
        os.kill(os.getpid(), getattr(signal, self.signal))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: object) -> None:
        if self.when == "backward" and trainer.global_step == self.step:
            self._send(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if self.when == "batch" and trainer.global_step == self.step:
            self._send(trainer)
        last = batch_idx == trainer.num_training_batches - 1
        if self.when == "epoch_end" and trainer.current_epoch == 0 and last:
            self._send(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "validation" and not trainer.sanity_checking and trainer.global_step >= self.step:
            self._send(trainer)

"""Training that survives faults: interrupts, crashes mid-write, untrusted checkpoints, non-finite steps.

- `SafeCheckpointIO`: Lightning's checkpoint plugin, writing through a temp file + `os.replace` (a crash
  never leaves a truncated `last.ckpt`) and loading with `weights_only=True` always (a crafted pickle is
  refused, whatever `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` says), with one-line errors for bad files.
- `GracefulInterrupt`: SIGINT/SIGTERM set a flag; at the next optimizer-step boundary every rank saves
  `last.ckpt` and `trainer.fit` ends by raising `TrainingInterrupted`, so `--ckpt_path last` resumes
  exactly (data position, optimizer, scheduler, loss-free biases and callback states all live in
  Lightning's checkpoint).
- `StepSeed`: reseeds the global RNG before every training batch from (seed, rank, epoch, batch), so the
  gating noise and dropout of a resumed run are those of an uninterrupted one.
- `NonFiniteGuard`: a step with a non-finite loss or gradient is skipped (no weight, optimizer or
  balancing-bias update) and counted; too many in a row stop the run and save `last.ckpt`, whose weights
  are then still those from before the fault.

`exit_code(trainer)` turns how a run ended into the process exit status `nmt-moe train` returns.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from nmt_moe.checkpoint import ModelLoadError, atomic_write, load_weights_only
from nmt_moe.moe import moe_layers
from nmt_moe.sharded_checkpoint import full_checkpoint, is_sharded_checkpoint

EXIT_NONFINITE = 3  # stopped by NonFiniteGuard
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


# --- checkpoint files --------------------------------------------------------------------------------------


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous file is unchanged."""


class _KeepsWriteErrors:
    """A binary file that remembers the OSError its write raised: torch.save reports it only as a
    RuntimeError ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, handle: Any) -> None:
        self.handle, self.error = handle, None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


class SafeCheckpointIO(TorchCheckpointIO):
    """Atomic local saves and weights_only loads (remote fsspec paths keep Lightning's own handling).

    A save that fails for want of space (or any other OSError) raises `CheckpointWriteError` naming the
    file and the reason; the temp file is removed and the previous checkpoint at `path` stays as it was.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        writer = None
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as handle:
                writer = _KeepsWriteErrors(handle)
                torch.save(checkpoint, writer)
        except (OSError, RuntimeError) as error:
            cause = writer.error if writer is not None and writer.error is not None else error
            if not isinstance(cause, OSError):
                raise
            reason = cause.strerror or str(cause)
            raise CheckpointWriteError(
                f"could not write the checkpoint {path} ({reason}); the previous one there, if any, is "
                "unchanged: free some space and resume with `--ckpt_path last`"
            ) from cause

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        if "://" in str(path):
            return super().load_checkpoint(path, weights_only=True)
        if is_sharded_checkpoint(path):  # written under expert parallelism, resumed without it
            return full_checkpoint(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        checkpoint = load_weights_only(path)  # raises ModelLoadError with a one-line reason
        if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
            raise ModelLoadError(
                f"{path}: not a checkpoint written by `nmt-moe train` (no Lightning trainer state); "
                "training resumes from the run's checkpoints/last.ckpt"
            )
        return checkpoint


def _save_dir(trainer: pl.Trainer, dirpath: str | None) -> Path:
    """Where interrupt/fault checkpoints go: `dirpath`, else the directory of the ModelCheckpoint that writes
    `last.ckpt` (save_last, or filename "last"), else the first ModelCheckpoint's, else
    `<default_root_dir>/checkpoints`. Beside the regular last.ckpt is where people and the recipes' run.sh
    look for a run to resume; a recipe's extra checkpoint callback (the averaging one) may come first.
    `nmt-moe train` sets `dirpath` to `<default_root_dir>/checkpoints` explicitly."""
    if dirpath:
        return Path(dirpath)
    callbacks = [c for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
    callbacks.sort(key=lambda c: not (getattr(c, "save_last", False) or c.filename == "last"))  # stable
    return Path(callbacks[0].dirpath) if callbacks else Path(trainer.default_root_dir) / "checkpoints"


def _say(trainer: pl.Trainer, message: str) -> None:
    if trainer.is_global_zero:
        print(f"nmt-moe train: {message}", file=sys.stderr, flush=True)


def _completes_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """True when this batch ends an optimizer step (not in the middle of gradient accumulation)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


# --- interrupts --------------------------------------------------------------------------------------------


class TrainingInterrupted(Exception):
    """Raised out of `trainer.fit` once `GracefulInterrupt` has saved its checkpoint."""

    def __init__(self, signum: int, path: Path, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name}: saved {path} at step {step}")
        self.signum, self.path, self.step = signum, path, step


class GracefulInterrupt(pl.Callback):
    """On SIGINT or SIGTERM: finish the current step, save `last.ckpt`, stop; a second signal forces exit.

    The handlers are installed in `on_train_start`, after Lightning's own SIGTERM handler (which would
    abort a running validation without saving), and all ranks agree on stopping at the same step.

    The run stops by raising `TrainingInterrupted` at the start of the next batch, not through
    `trainer.should_stop`: Lightning answers `should_stop` with a validation that the uninterrupted run
    does not have (which moves early stopping and the best checkpoint) and with the epoch-end hooks, and
    the `last.ckpt` that ModelCheckpoint writes there resumes wrongly (Lightning 2.6 restores it one
    logging step behind - every metric after the resume logged under the previous step - or, where
    checkpoints are written at epoch end, in the next epoch). Everything that runs between the save and
    the raise (the step's checkpoint callbacks, a validation due after it, the end of an epoch) runs in the
    uninterrupted run too. Callbacks listed after this one have not ended the step when it saves: the CLI
    registers it last.
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        """
        Args:
            dirpath: directory of the checkpoint; default: where last.ckpt is kept (see `_save_dir`).
            filename: checkpoint file name; `last*.ckpt` is what `--ckpt_path last` finds.
        """
        self.dirpath, self.filename = dirpath, filename
        self.received: int | None = None  # signal number, once one arrived
        self.saved_path: Path | None = None
        self._saved_step = -1
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.received, self.saved_path = None, None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in HANDLED_SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            print(f"\nnmt-moe train: {name}: saving a checkpoint after this step, then stopping "
                  f"({name} again stops at once without saving)", file=sys.stderr, flush=True)  # fmt: skip
            return
        # second signal: Python's default action (KeyboardInterrupt / termination), not Lightning's handler
        self._restore()
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
        signal.raise_signal(signum)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _completes_step(trainer, batch_idx) or self.saved_path is not None:
            return
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop:
            return
        if self.received is None:  # another rank got the signal
            self.received = signal.SIGTERM
        # The step's own checkpoints first (Lightning runs checkpoint callbacks after all others and skips
        # a second save at one step), so that the states saved below know the files they wrote.
        for callback in trainer.checkpoint_callbacks:
            callback.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        path = _save_dir(trainer, self.dirpath) / self.filename
        trainer.save_checkpoint(path)
        self.saved_path, self._saved_step = path, trainer.global_step
        _say(trainer, f"saved {path} at step {trainer.global_step}; resume with `--ckpt_path last`")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.saved_path is not None:  # the saved step is complete; leave before training another
            raise TrainingInterrupted(int(self.received or signal.SIGTERM), self.saved_path, self._saved_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}


# --- randomness --------------------------------------------------------------------------------------------


class StepSeed(pl.Callback):
    """Seeds torch's global RNG before every training batch from (seed, rank, epoch, batch index).

    The gating noise and dropout of a step then depend on nothing but the step, so a run resumed from any
    checkpoint draws exactly what the uninterrupted run drew, with no generator state to save (data-loader
    iterators and validation, which also touch the global RNG, no longer shift later steps). The seed is
    stored in checkpoints; resuming with another seed warns.
    """

    def __init__(self, seed: int | None = None) -> None:
        """
        Args:
            seed: base seed; default: the run's `seed_everything` value (env `PL_GLOBAL_SEED`), else 0.
        """
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed

    def _base_seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        key = [self._base_seed(), trainer.global_rank, trainer.current_epoch, batch_idx]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._base_seed()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("seed") != self._base_seed():
            print(f"nmt-moe train: warning: the checkpoint was trained with seed {state_dict.get('seed')}, "
                  f"now {self._base_seed()}: the resumed run draws other noise", file=sys.stderr)  # fmt: skip


# --- numerical faults --------------------------------------------------------------------------------------


class NonFiniteGuard(pl.Callback):
    """Skips optimizer steps whose loss or gradient is not finite; stops after `max_consecutive` in a row.

    A skipped step drops the gradients (the optimizer leaves every parameter and its moments untouched)
    and the MoE load gathered for loss-free balancing, so the biases do not move either; the learning-rate
    schedule and the data position still advance. `train/skipped_steps` counts skipped steps. When the run
    stops, `last.ckpt` is saved: all steps since the last good one were skipped, so its weights, optimizer
    state and biases are those from before the fault.
    """

    def __init__(self, max_consecutive: int = 10, dirpath: str | None = None, filename: str = "last.ckpt"):
        """
        Args:
            max_consecutive: non-finite steps in a row that stop the run (>= 1).
            dirpath, filename: where the stop checkpoint goes (as GracefulInterrupt).
        """
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.dirpath, self.filename = dirpath, filename
        self.skipped = 0  # over the whole run, resumes included
        self.consecutive = 0
        self.stopped = False
        self._loss_finite = True
        self._skip_this_step = False

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = self._loss_finite
        if finite and grads:
            finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)))
        # every rank must skip the same steps, or their weights drift apart
        self._skip_this_step = trainer.strategy.reduce_boolean_decision(not finite, all=False)
        self._loss_finite = True
        if self._skip_this_step:
            optimizer.zero_grad(set_to_none=True)  # optimizers skip parameters without a gradient
            for _, layer in moe_layers(pl_module):
                if layer.loss_free_bias:
                    layer.load_since_update.zero_()  # update_bias() after the step becomes a no-op

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not _completes_step(trainer, batch_idx):
            return
        if self._skip_this_step:
            self.skipped += 1
            self.consecutive += 1
            _say(trainer, f"step {trainer.global_step}: non-finite loss or gradient, step skipped "
                          f"({self.consecutive} in a row, {self.skipped} in all)")  # fmt: skip
        else:
            self.consecutive = 0
        self._skip_this_step = False
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if self.consecutive >= self.max_consecutive and not self.stopped:
            path = _save_dir(trainer, self.dirpath) / self.filename
            trainer.save_checkpoint(path)
            self.stopped = True
            trainer.should_stop = True
            _say(
                trainer,
                f"stopping: {self.consecutive} non-finite steps in a row (up to step {trainer.global_step}). "
                f"{path} holds the weights from before the fault; lower the learning rate or check the "
                "data, then resume with `--ckpt_path last`",
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        # resuming after a stop (new learning rate, fixed data) starts a fresh count
        self.consecutive = 0 if state_dict.get("stopped") else int(state_dict.get("consecutive", 0))


def exit_code(trainer: pl.Trainer) -> int:
    """0 for a run that ended normally; 128 + signal number after an interrupt; 3 after too many faults."""
    for callback in trainer.callbacks:
        if isinstance(callback, GracefulInterrupt) and callback.saved_path is not None:
            return 128 + int(callback.received or signal.SIGTERM)
        if isinstance(callback, NonFiniteGuard) and callback.stopped:
            return EXIT_NONFINITE
    return 0

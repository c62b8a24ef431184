"""What a user watching `nmt-moe train` sees: a progress bar in a terminal, log lines everywhere else.

In a terminal, Lightning's TQDM bar carries step / total, loss, tokens/s, the last validation BLEU and the
time left. When stderr is not a terminal (a pipe, nohup, SLURM, CI) a bar only fills logs with carriage
returns, so the same fields go out as one plain line every `log_every_n_steps` steps and one per validation.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any, Literal, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.callbacks.progress.tqdm_progress import TQDMProgressBar


def total_steps(trainer: pl.Trainer) -> int | None:
    """The optimizer steps the run is set to make: max_steps, else what the epochs add up to.

    Collective under DDP (Lightning's estimate sets up the train loader behind a barrier): call it on every
    rank, once training has started."""
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    estimate = trainer.estimated_stepping_batches
    return int(estimate) if estimate != float("inf") else None


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class TrainingProgress(TQDMProgressBar):
    """Lightning's TQDM bar with the fields a translation run is judged by, or log lines without a terminal.

    `mode`: "auto" (the bar when stderr is a terminal, lines otherwise), "bar" or "lines".
    """

    def __init__(
        self,
        log_every_n_steps: int = 50,
        mode: Literal["auto", "bar", "lines"] = "auto",
        refresh_rate: int = 1,
        stream: TextIO | None = None,
    ) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        super().__init__(refresh_rate=refresh_rate)
        self.log_every_n_steps = log_every_n_steps
        self.mode = mode
        self._stream = stream
        self._start: tuple[float, int] | None = None  # (time, global step) when this process began training
        self._total: int | None = None  # optimizer steps of the whole run, known once training starts
        self._logged_at = -1

    @property
    def lines(self) -> bool:
        """True when the fields go out as log lines instead of a bar."""
        if self.mode == "auto":
            return not (self._stream or sys.stderr).isatty()
        return self.mode == "lines"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.lines:
            self.disable()  # TQDM's own hooks draw nothing; the hooks below print lines

    # ---- the fields --------------------------------------------------------------------------------

    def time_left(self, trainer: pl.Trainer) -> float | None:
        """Seconds until the run stops: the step rate of this process over the steps left, capped by the
        time budget (trainer.max_time) when one is set."""
        estimates = []
        total = self._total
        if self._start is not None and total is not None:
            start_time, start_step = self._start
            done = trainer.global_step - start_step
            if done > 0:
                estimates.append((total - trainer.global_step) * (time.monotonic() - start_time) / done)
        for callback in trainer.callbacks:
            if isinstance(callback, Timer) and callback.time_remaining("train") is not None:
                estimates.append(callback.time_remaining("train"))
        return min(estimates) if estimates else None

    def fields(self, trainer: pl.Trainer) -> dict[str, str]:
        """step, loss, tok/s, val BLEU and time left, formatted; missing ones are left out."""
        metrics = trainer.progress_bar_metrics
        total = self._total
        out = {"step": f"{trainer.global_step}/{total}" if total else str(trainer.global_step)}
        if "train/loss" in metrics:
            out["loss"] = f"{float(metrics['train/loss']):.3f}"
        if "train/tok_s" in metrics:
            out["tok/s"] = f"{float(metrics['train/tok_s']):,.0f}"
        if "val/bleu" in trainer.callback_metrics:
            out["val BLEU"] = f"{float(trainer.callback_metrics['val/bleu']):.2f}"
        left = self.time_left(trainer)
        if left is not None:
            out["left"] = format_duration(left)
        return out

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The bar's postfix: our fields instead of Lightning's raw metric names (and no v_num)."""
        return self.fields(trainer)

    # ---- log lines ---------------------------------------------------------------------------------

    def _print_line(self, prefix: str, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        line = " | ".join(f"{k} {v}" if k != "step" else f"step {v}" for k, v in self.fields(trainer).items())
        print(f"{prefix}{line}", file=self._stream or sys.stderr, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._total = total_steps(trainer)  # every rank: it may be collective; fields() runs on rank 0
        self._start = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.lines and step % self.log_every_n_steps == 0 and step != self._logged_at:
            self._logged_at = step
            self._print_line("", trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.lines and not trainer.sanity_checking:
            self._print_line("validation: ", trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.lines:
            self._print_line("done: ", trainer)


# Messages that say nothing a user of `nmt-moe train` can act on (each checked on torch 2.13 / Lightning
# 2.6.6 / torchdata 0.11 / jsonargparse 4.4x): our CLI passes its args itself; SafeCheckpointIO is built
# in code, not from YAML; the model summary's size estimate; deprecations inside the libraries.
_NOISE = (
    r"LightningCLI's args parameter is intended to run from within Python",
    r"\s*Unable to serialize instance <nmt_moe\.",
    r"Precision bf16-mixed is not supported by the model summary",
    r"'set_vital' is deprecated",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def quiet_library_noise() -> None:
    """Hides the warnings and tips listed in `_NOISE` for this process; every other warning still shows."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning's rank_zero_info logs through this logger (a filter acts where a record is created).
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_DropTips())

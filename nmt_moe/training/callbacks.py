"""Training callbacks: tokens/s in the progress bar, expert-load statistics and pictures, sample translations.

They work with any logger: scalars go to every attached logger, pictures are also written as PNG files
under the run's log directory, and W&B-only media (images, tables) are sent only to a `WandbLogger`.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger

from nmt_moe.data.tokenizer import PAD_ID


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Source plus target tokens the step trains on: source ids with EOS, target positions predicted."""
    return int(batch["src_lengths"].sum()) + int((batch["tgt"][:, 1:] != PAD_ID).sum())


def log_dir(trainer: pl.Trainer) -> Path:
    """Where files of this run go: the logger's directory, else the trainer's root directory.
    Call it on every rank: `trainer.log_dir` broadcasts rank 0's answer."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class TokensPerSecond(pl.Callback):
    """Logs training throughput (source + target tokens per second) to the progress bar and the loggers.

    The rate is measured over the last `window` steps of wall time between the ends of consecutive training
    steps (data loading included, validation excluded), so it is what a user waits for.
    """

    def __init__(self, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._steps: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds) per step
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.perf_counter()  # do not charge validation to the next training step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self._steps.append((count_tokens(batch), now - self._last))
        self._last = now
        seconds = sum(s for _, s in self._steps)
        if seconds > 0:
            rate = sum(t for t, _ in self._steps) / seconds
            pl_module.log("train/tok_s", rate, prog_bar=True, on_step=True, on_epoch=False, batch_size=1)


class ExpertLoadMonitor(pl.Callback):
    """Per MoE layer, every `every_n_steps` optimizer steps: load per expert, importance and load CV, tokens
    dropped; plus a heat-map of the load share of each expert over training, drawn at each validation.

    Reads the per-layer statistics the `TranslationModule` returns from `training_step` under `"moe"`:
    `{layer: {"load": [E], "importance": [E], "dropped": []}}` (dropped: token-expert assignments over
    capacity), summed over the interval (and over ranks under DDP) before logging.
    """

    def __init__(self, every_n_steps: int = 50, log_per_expert: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.log_per_expert = log_per_expert
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        # optimizer step of the last flush (several batches share one under gradient accumulation)
        self._flushed_at = -1
        self.steps: list[int] = []  # optimizer step of each logged interval
        self.history: dict[str, list[list[float]]] = {}  # layer -> one load-share row [E] per interval

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = outputs.get("moe") if isinstance(outputs, dict) else None
        if not stats:
            return
        for layer, values in stats.items():
            sums = self._sums.setdefault(layer, {})
            for key, value in values.items():
                value = value.detach().float()
                sums[key] = sums[key] + value if key in sums else value.clone()
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._flushed_at:
            self._flushed_at = step
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        metrics: dict[str, float] = {}
        for layer, sums in sorted(self._sums.items()):
            sums = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
            load, importance = sums["load"], sums["importance"]  # [E], [E]
            share = load / load.sum().clamp_min(1.0)  # [E]
            metrics[f"moe/{layer}/load_cv"] = float(load.std(correction=0) / load.mean().clamp_min(1e-9))
            metrics[f"moe/{layer}/importance_cv"] = float(
                importance.std(correction=0) / importance.mean().clamp_min(1e-9)
            )
            metrics[f"moe/{layer}/max_load_share"] = float(share.max())
            metrics[f"moe/{layer}/dropped"] = float(sums["dropped"])
            metrics[f"moe/{layer}/dropped_frac"] = float(sums["dropped"] / load.sum().clamp_min(1.0))
            if self.log_per_expert:
                metrics.update({f"moe/{layer}/load/{e:03d}": float(s) for e, s in enumerate(share)})
            self.history.setdefault(layer, []).append(share.tolist())
        self._sums = {}
        if not metrics:
            return
        self.steps.append(trainer.global_step)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.draw(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer)

    def draw(self, trainer: pl.Trainer) -> list[Path]:
        """Writes one heat-map PNG per MoE layer (expert x logged step, colour = load share) and sends it
        to W&B when a `WandbLogger` is attached. Returns the files written (none on ranks other than 0)."""
        out_dir = log_dir(trainer) / "expert_load"  # on every rank: trainer.log_dir is a collective call
        if not trainer.is_global_zero or not self.steps:
            return []
        import matplotlib

        matplotlib.use("Agg")  # headless: no display on training machines
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for layer, rows in sorted(self.history.items()):
            shares = torch.tensor(rows).T  # [E, intervals]
            fig, ax = plt.subplots(figsize=(8, 4))
            image = ax.imshow(shares.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set_title(f"{layer}: share of routed tokens per expert")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("expert")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ticks = sorted({0, len(rows) - 1, *range(0, len(rows), max(1, len(rows) // 6))})
            ax.set_xticks(ticks, [str(self.steps[-len(rows) :][i]) for i in ticks])
            fig.colorbar(image, ax=ax, label="load share")
            fig.tight_layout()
            path = out_dir / f"{layer.replace('/', '_')}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            written.append(path)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(f"moe/{layer}/load_heatmap", [str(path)], step=trainer.global_step)
        return written

    def state_dict(self) -> dict[str, Any]:
        # The partial sums of the running interval are saved too, so the first interval after a resume
        # covers the same batches as in an uninterrupted run.
        return {
            "steps": list(self.steps),
            "history": {k: [list(r) for r in v] for k, v in self.history.items()},
            "sums": {layer: {k: v.cpu() for k, v in sums.items()} for layer, sums in self._sums.items()},
            "flushed_at": self._flushed_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict["steps"])
        self.history = {k: [list(r) for r in v] for k, v in state_dict["history"].items()}
        self._sums = {layer: dict(sums) for layer, sums in state_dict.get("sums", {}).items()}
        self._flushed_at = state_dict.get("flushed_at", -1)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The checkpoint holds rank 0's partial sums only; flushing sums over ranks, so other ranks start
        # from zero rather than counting rank 0's share again.
        if not trainer.is_global_zero:
            self._sums = {}


class SampleTranslations(pl.Callback):
    """Logs the module's `val_samples` (source, hypothesis, reference) as a W&B table after each validation;
    other loggers get nothing (BLEU/chrF reach them as scalars)."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        samples = getattr(pl_module, "val_samples", [])
        if trainer.sanity_checking or not samples or not trainer.is_global_zero:
            return
        rows = [[s["source"], s["hypothesis"], s["reference"]] for s in samples]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("val/samples", columns=["source", "hypothesis", "reference"], data=rows)

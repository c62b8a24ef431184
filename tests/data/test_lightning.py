"""The datamodule under a real Trainer: a mid-epoch checkpoint resumes with exactly the remaining batches."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from helpers.data import write_corpus

from nmt_moe.data.datamodule import TranslationDataModule
from nmt_moe.data.pipeline import PipelineConfig


class RecordingModule(pl.LightningModule):
    """Trains nothing useful; records the pair indices of every training batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        return self.weight * batch["src"].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    dm: TranslationDataModule, root: Path, *, max_steps: int = -1, ckpt: str | None = None
) -> list[list[int]]:
    """Two epochs (or max_steps); saves a checkpoint after the last step it runs."""
    module = RecordingModule()
    every = max_steps if max_steps > 0 else None
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        max_steps=max_steps,
        callbacks=[checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    return module.seen


def test_resume_mid_epoch_continues_exactly(tmp_path: Path) -> None:
    train = write_corpus(tmp_path / "corpus", "train", 800, seed=0)

    def dm() -> TranslationDataModule:
        return TranslationDataModule(
            PipelineConfig("en", "de", train=train, vocab_size=200, spm_model_type="bpe"),
            cache_dir=str(tmp_path / "cache"),
            max_tokens=300,
        )

    full = _fit(dm(), tmp_path / "full")
    per_epoch = len(full) // 2
    assert per_epoch > 8 and len(full) == 2 * per_epoch
    assert full[:per_epoch] != full[per_epoch:]  # the second epoch reshuffles

    stop = per_epoch + 5  # interrupt mid-way through the second epoch
    head = _fit(dm(), tmp_path / "cut", max_steps=stop)
    assert head == full[:stop]
    tail = _fit(dm(), tmp_path / "resumed", ckpt=str(tmp_path / "cut" / "ckpt" / f"epoch=1-step={stop}.ckpt"))
    assert head + tail == full

"""`nmt-moe train` on the tiny_copy recipe in-process, its data, and a toy LightningModule for fault tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytorch_lightning as pl
import torch

from helpers.paths import ROOT
from nmt_moe.cli import main

RECIPE = ROOT / "recipes" / "tiny_copy" / "config.yaml"


def write_copy_task(out_dir: Path) -> Path:
    spec = importlib.util.spec_from_file_location(
        "make_data", ROOT / "recipes" / "tiny_copy" / "make_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_copy_task(out_dir)


def train(subcommand: str, data: Path, root: Path, *extra: str) -> int:
    """`nmt-moe train <subcommand>` in-process on the tiny_copy recipe, data and outputs redirected."""
    argv = [
        "train", subcommand, "--config", str(RECIPE),
        "--data.pipeline.train", str(data / "train"), "--data.pipeline.valid", str(data / "valid"),
        "--data.pipeline.test", str(data / "test"), "--data.cache_dir", str(data / "cache"),
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", *extra,
    ]  # fmt: skip
    return main(argv)


class Regression(pl.LightningModule):
    """y = w x with Adam; the loss is made NaN (or the gradient infinite) at chosen batches."""

    def __init__(self, nan_loss_at: set[int], inf_grad_at: set[int]) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.nan_loss_at, self.inf_grad_at = nan_loss_at, inf_grad_at
        self.weights: list[torch.Tensor] = []  # after every batch

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        if batch_idx in self.nan_loss_at:
            loss = loss * float("nan")
        return loss

    def on_after_backward(self) -> None:
        if self.trainer.fit_loop.epoch_loop.batch_idx in self.inf_grad_at:
            self.layer.weight.grad[0, 0] = float("inf")  # finite loss, overflowing gradient

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.weights.append(self.layer.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.1)

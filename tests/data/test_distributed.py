"""Two CPU ranks under a real Trainer (ddp_spawn): disjoint, equal, covering shares of every epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.data import write_corpus

from nmt_moe.data.datamodule import TranslationDataModule
from nmt_moe.data.pipeline import PipelineConfig


class RankRecorder(pl.LightningModule):
    """Writes the pair indices each rank trains on, per epoch, to out_dir/rank{r}.json."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
        return self.weight * batch["src"].float().mean()

    def on_train_end(self) -> None:
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.distributed
def test_ddp_ranks_get_disjoint_covering_shares(tmp_path: Path) -> None:
    train = write_corpus(tmp_path / "corpus", "train", 500, seed=0)
    dm = TranslationDataModule(
        PipelineConfig("en", "de", train=train, vocab_size=200, spm_model_type="bpe"),
        cache_dir=str(tmp_path / "cache"),
        max_tokens=300,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,  # the batch sampler shards by rank itself
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(RankRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in ("0", "1"):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(500))
    assert ranks[0]["0"] != ranks[0]["1"]

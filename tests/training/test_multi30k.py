"""A short `nmt-moe train` run on a Multi30k subset lowers the validation loss of the untrained model."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

from nmt_moe.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_copy" / "config.yaml"


def write_subset(multi30k: Path, out: Path, sizes: dict[str, tuple[str, int]]) -> Path:
    out.mkdir(parents=True)
    for split, (name, n) in sizes.items():
        for lang in ("en", "de"):
            lines = (multi30k / f"{name}.{lang}").read_text().splitlines()[:n]
            (out / f"{split}.{lang}").write_text("\n".join(lines) + "\n")
    return out


def val_losses(root: Path) -> list[float]:
    losses = []
    for version in sorted(root.glob("csv/version_*"), key=lambda p: int(p.name.split("_")[1])):
        with open(version / "metrics.csv") as f:
            losses += [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]
    return losses


@pytest.mark.slow
def test_short_multi30k_run_lowers_validation_loss(
    multi30k: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["nmt-moe"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the 2-core test machine is shared
    data = write_subset(multi30k, tmp_path / "data", {"train": ("train", 4000), "valid": ("val", 200)})
    root = tmp_path / "run"
    common = [
        "--config", str(RECIPE),  # its trainer/callback settings; model and data replaced below
        "--data.pipeline.src_lang", "en", "--data.pipeline.tgt_lang", "de",
        "--data.pipeline.train", str(data / "train"), "--data.pipeline.valid", str(data / "valid"),
        "--data.pipeline.test", "null", "--data.cache_dir", str(data / "cache"), "--data.max_tokens", "1024",
        "--data.pipeline.vocab_size", "1000", "--data.pipeline.spm_model_type", "bpe",
        "--model.model.embed_dim", "64", "--model.model.hidden_size", "128",
        "--model.model.moe.num_experts", "8", "--model.model.moe.d_hidden", "64",
        "--model.lr", "0.003", "--model.val_max_sentences", "50",
        "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--wandb", "off",
    ]  # fmt: skip
    try:
        assert main(["train", "validate", *common]) == 0  # the untrained model, same seed as the fit
        assert (
            main(
                ["train", "fit", *common, "--trainer.max_epochs", "1", "--trainer.num_sanity_val_steps", "0"]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    untrained, trained = val_losses(root)
    assert trained < untrained - 1.0

"""Test-wide settings (no test may touch the network, W&B writes only under a temp dir) and the fixtures
that tests in several folders use; plain builders live in tests/helpers/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.register_assert_rewrite("helpers")  # their asserts explain failures as a test's do

from helpers.paths import MULTI30K  # noqa: E402  (imported after the line above: rewritten)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path_factory.getbasetemp() / "wandb"
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(name, str(root / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture
def multi30k() -> Path:
    """The Multi30k raw text beside the project root; tests using it skip where it is absent."""
    if not (MULTI30K / "train.en").exists():
        pytest.skip(f"Multi30k not found at {MULTI30K}")
    return MULTI30K


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_copy data, prepared once here so that concurrent runs only read the cache."""
    import yaml
    from helpers.training import RECIPE, write_copy_task

    from nmt_moe.data.datamodule import TranslationDataModule
    from nmt_moe.data.pipeline import PipelineConfig

    data = write_copy_task(tmp_path_factory.mktemp("copy_data"))
    settings = yaml.safe_load(RECIPE.read_text())["data"]
    settings["pipeline"].update({split: str(data / split) for split in ("train", "valid", "test")})
    settings["cache_dir"] = str(data / "cache")
    TranslationDataModule(**{**settings, "pipeline": PipelineConfig(**settings["pipeline"])}).prepare_data()
    return data

"""Bad configs stop `nmt-moe train` before any data is prepared or any step is run, naming the bad key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from helpers.training import RECIPE

from nmt_moe.cli import main

M = "--model.model.init_args."


def fit(tmp_path: Path, *overrides: str, config: Path = RECIPE) -> int:
    data = tmp_path / "data"  # never created: a bad config must fail before reading data
    argv = [
        "train", "fit", "--config", str(config), "--data.train", str(data / "train"),
        "--data.valid", str(data / "valid"), "--data.test", str(data / "test"),
        "--data.cache_dir", str(data / "cache"), "--trainer.default_root_dir", str(tmp_path / "run"),
        "--wandb", "off", *overrides,
    ]  # fmt: skip
    try:
        return main(argv)
    except SystemExit as exit_:  # argument parsing errors exit from inside jsonargparse
        return int(exit_.code or 0)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["nmt-moe"])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ((M + "k", "5"), "k must be in 1..num_experts (4), got 5"),
        ((M + "encoder_moe_after", "[2]"), "encoder_moe_after position 2 is outside the LSTM stack"),
        ((M + "decoder_moe_after", "[0]"), "decoder_moe_after position 0 is outside the LSTM stack"),
        ((M + "gate", "noisy_top2"), "gate: must be one of"),
        ((M + "dropout", "-0.1"), "dropout must be in [0, 1), got -0.1"),
        ((M + "moe_options", "{dropout: -0.5}"), "dropout: must be in [0, 1), got -0.5"),
        (("--model.expert_parallel_size", "3"), "expert_parallel_size=3 must divide num_experts=4"),
        (("--model.expert_parallel_size", "2"), "expert_parallel_size=2 must divide the world size 1"),
    ],
)
def test_bad_setting_is_named_before_training(
    overrides: tuple[str, ...], named: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert fit(tmp_path, *overrides) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert named in err
    assert not (tmp_path / "data").exists() and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("where", ["model", "trainer", "top"])
def test_recipe_key_that_does_not_exist_is_named(
    where: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = yaml.safe_load(RECIPE.read_text())
    section = recipe if where == "top" else recipe[where]
    section["warmup_step"] = 10  # typo of warmup_steps
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    assert fit(tmp_path, config=config) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "warmup_step" in err
    assert not (tmp_path / "data").exists()

"""Bad configs stop `nmt-moe train` before any data is prepared or any step is run, naming the bad key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from helpers.training import RECIPE

from nmt_moe.cli import main

M = "--model.model."
MOE = "--model.model.moe."


def fit(tmp_path: Path, *overrides: str, config: Path = RECIPE) -> int:
    data = tmp_path / "data"  # never created: a bad config must fail before reading data
    argv = [
        "train", "fit", "--config", str(config), "--data.pipeline.train", str(data / "train"),
        "--data.pipeline.valid", str(data / "valid"), "--data.pipeline.test", str(data / "test"),
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
        ((MOE + "k", "5"), "k must be in 1..num_experts (4), got 5"),
        ((M + "encoder_moe_after", "[2]"), "encoder_moe_after position 2 is outside the LSTM stack"),
        ((M + "decoder_moe_after", "[0]"), "decoder_moe_after position 0 is outside the LSTM stack"),
        ((MOE + "gate", "noisy_top2"), "gate: must be one of"),
        ((M + "dropout", "-0.1"), "dropout must be in [0, 1), got -0.1"),
        ((MOE + "dropout", "-0.5"), "dropout: must be in [0, 1), got -0.5"),
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


def old_layout(recipe: dict) -> dict:
    """The recipe as written before the typed configs: the model as class_path/init_args with flat MoE keys
    and moe_options, the data settings flat under data."""
    model = dict(recipe["model"]["model"])
    moe = model.pop("moe")
    init_args = {
        **model,
        **{key: moe.pop(key) for key in ("num_experts", "k", "gate", "d_hidden") if key in moe},
    }
    init_args["moe_options"] = moe
    old = {**recipe, "model": {**recipe["model"], "model": {"class_path": "nmt_moe.models.Seq2Seq",
                                                             "init_args": init_args}}}  # fmt: skip
    data = dict(recipe["data"])
    pipeline = data.pop("pipeline")
    old["data"] = {**data, **pipeline, **pipeline.pop("cleaning", {})}
    return old


@pytest.mark.parametrize("part", ["model", "data"])
def test_config_in_the_old_layout_is_one_line_naming_the_new_keys(
    part: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    recipe = yaml.safe_load(RECIPE.read_text())
    old = old_layout(recipe)
    recipe[part] = old[part]
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump(recipe))
    assert fit(tmp_path, config=config) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    named = ["model.model.moe", "moe_options"] if part == "model" else ["data.pipeline.train", "data.train"]
    assert all(text in err for text in named), err
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    ("flag", "named"),
    [
        ("--model.model.init_args.moe_options={num_shared_experts: 1}", "model.model.moe.num_shared_experts"),
        ("--model.model.init_args.k=1", "model.model.moe"),
        ("--data.max_tokens_per_sentence=64", "data.pipeline.cleaning.max_tokens_per_sentence"),
    ],
)
def test_flag_in_the_old_layout_is_one_line_naming_the_new_key(
    flag: str, named: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert fit(tmp_path, flag) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert named in err

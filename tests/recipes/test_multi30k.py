"""The Multi30k recipes (en-de MoE, dense baseline, multilingual MoE and dense): every config parses as
`nmt-moe train` reads it (alone and with smoke.yaml) and builds; MoE and dense twins have equal active
parameters; the run.sh scripts are valid bash; `run.sh --smoke` runs a whole recipe on Multi30k's first few
hundred lines (slow)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import print_config

from nmt_moe.models import Seq2Seq, Seq2SeqConfig, parameter_counts

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
EN_DE, DENSE, MULTI = (
    RECIPES / name for name in ("multi30k_en_de", "multi30k_dense", "multi30k_multilingual")
)
CONFIGS = [EN_DE / "config.yaml", DENSE / "config.yaml", MULTI / "config.yaml", MULTI / "config_dense.yaml"]
SMOKE = EN_DE / "smoke.yaml"


def build(config: Path) -> Seq2Seq:
    """The recipe's Seq2Seq on the meta device (vocab size from the data section, as the CLI links it)."""
    loaded = yaml.safe_load(config.read_text())
    model = loaded["model"]["model"]
    with torch.device("meta"):
        return Seq2Seq(Seq2SeqConfig(vocab_size=loaded["data"]["pipeline"]["vocab_size"], **model))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_with_and_without_smoke_overrides(config: Path) -> None:
    code, text = print_config(config)
    assert code == 0, text
    parsed = yaml.safe_load(text)
    written = yaml.safe_load(config.read_text())["model"]["model"]
    assert parsed["data"]["pipeline"]["src_lang"] == "en"
    assert parsed["model"]["model"]["moe"]["k"] == written["moe"]["k"]
    # the cosine schedule ends at the trainer's max_steps, stated once (model.max_steps unset follows it)
    assert parsed["trainer"]["max_time"] and parsed["trainer"]["max_steps"] > 0
    assert parsed["model"]["max_steps"] is None and parsed["model"]["schedule"] == "cosine"
    code, text = print_config(config, SMOKE)
    assert code == 0, text
    smoke = yaml.safe_load(text)
    assert smoke["model"]["model"]["hidden_size"] == 32 and smoke["trainer"]["max_time"] is None
    assert smoke["model"]["model"]["ffn"] == parsed["model"]["model"]["ffn"]
    assert smoke["model"]["model"]["moe"]["d_hidden"] == 16  # a later config changes one MoE key ...
    assert smoke["model"]["model"]["moe"]["gate"] == parsed["model"]["model"]["moe"]["gate"]  # ... only


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_states_each_value_once_in_the_typed_layout(path: Path) -> None:
    """No model in class_path/init_args form, no untyped moe_options, no data setting outside its section,
    and the end of training given once (model.max_steps, left unset, follows trainer.max_steps)."""
    recipe = yaml.safe_load(path.read_text())
    model, data = recipe.get("model", {}).get("model", {}), recipe.get("data", {})
    assert not {"class_path", "init_args", "moe_options"} & model.keys()
    assert set(data) <= {"pipeline", "cache_dir", "max_tokens", "eval_max_tokens", "max_valid_sentences",
                         "seed", "num_workers", "num_proc"}  # fmt: skip
    assert not ("max_steps" in recipe.get("trainer", {}) and "max_steps" in recipe.get("model", {}))


@pytest.mark.parametrize(
    ("moe", "dense"),
    [(EN_DE / "config.yaml", DENSE / "config.yaml"), (MULTI / "config.yaml", MULTI / "config_dense.yaml")],
    ids=["en_de", "multilingual"],
)
def test_moe_and_dense_twins_have_equal_active_parameters(moe: Path, dense: Path) -> None:
    """The comparison the recipes promise: same stack, same compute per token, MoE has more capacity."""
    moe_counts, dense_counts = parameter_counts(build(moe)), parameter_counts(build(dense))
    gates = sum(p.numel() for name, p in build(moe).named_parameters() if ".gate." in name)
    # Equal up to the dense layer's biases (experts are bias-free): the same compute per token.
    assert moe_counts["active"] - gates == pytest.approx(dense_counts["active"], rel=1e-3)
    assert moe_counts["total"] > 1.5 * dense_counts["total"]
    moe_yaml, dense_yaml = (yaml.safe_load(p.read_text()) for p in (moe, dense))
    del moe_yaml["model"]["model"]["ffn"], dense_yaml["model"]["model"]["ffn"]
    del moe_yaml["model"]["model"]["moe"]["num_experts"], dense_yaml["model"]["model"]["moe"]["num_experts"]
    for section in (moe_yaml, dense_yaml):
        del section["trainer"]["default_root_dir"]
    assert moe_yaml == dense_yaml  # nothing else differs


def test_multilingual_config_lists_its_targets() -> None:
    data = yaml.safe_load((MULTI / "config.yaml").read_text())["data"]["pipeline"]
    assert data["src_lang"] == "en" and data["tgt_lang"] == ["de", "fr", "cs"]


@pytest.mark.parametrize("recipe", [EN_DE, DENSE, MULTI], ids=lambda p: p.name)
def test_run_sh_is_valid_bash(recipe: Path) -> None:
    script = recipe / "run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", str(script)], check=True)
    assert script.stat().st_mode & 0o111, "run.sh must be executable"
    help_text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, check=True)
    assert "Usage" in help_text.stdout


def test_run_sh_names_missing_data(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(EN_DE / "run.sh"), str(tmp_path / "nowhere"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and f"{tmp_path}/nowhere/train.en" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "targets"),
    [([EN_DE / "run.sh"], ["de"]), ([DENSE / "run.sh"], ["de"]), ([MULTI / "run.sh"], ["de", "fr", "cs"])],
    ids=["en_de", "dense", "multilingual"],
)
def test_smoke_runs_the_recipe_end_to_end(
    script: list[Path], targets: list[str], multi30k: Path, tmp_path: Path
) -> None:
    """One to three minutes each on a shared 2-core CPU: prepare, train, average, export, beam, score."""
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", *map(str, script), "--smoke", str(multi30k), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "export" / "config.json").is_file()
    scores = (out / "scores.txt").read_text()
    for tgt in targets:
        assert len((out / f"test_2016_flickr.hyp.{tgt}").read_text().splitlines()) == 40
        assert f"en->{tgt}" in scores
    assert scores.count("BLEU") == len(targets) and scores.count("chrF") == len(targets)
    assert f"exported model: {out}/export" in result.stdout
    # Progress without a terminal: log lines, no bar; the runs are tracked in W&B (offline here).
    assert re.search(
        r"^validation: step \d+/\d+ \| loss [\d.]+ \| tok/s [\d,]+ \| val BLEU", result.stderr, re.M
    )
    assert "\r" not in result.stderr.split("== train", 1)[-1]
    assert "  wandb sync " in result.stdout
    assert list((out / "train" / "export" / "wandb").glob("offline-run-*"))  # the exported model's run

"""The WMT'14 recipes: every config parses as `nmt-moe train` reads it and builds on the meta device, the
run.sh scripts are valid bash, and `run.sh --smoke` runs the whole recipe on tiny local data (slow)."""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from nmt_moe.plan import plan

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
WMT = [RECIPES / "wmt14_en_de", RECIPES / "wmt14_en_fr"]
CONFIGS = [recipe / name for recipe in WMT for name in ("config.yaml", "config_flat32.yaml")]


def print_config(*configs: Path) -> tuple[int, str]:
    """Exit code and output of `nmt-moe train fit --config ... --print_config` (parses, builds nothing)."""
    from nmt_moe.training.cli import train_main

    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            train_main([*args, "--print_config"])
        except SystemExit as exit_:
            return int(exit_.code or 0), out.getvalue()
    return 0, out.getvalue()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_with_and_without_smoke_overrides(config: Path) -> None:
    code, text = print_config(config)
    assert code == 0, text
    parsed = yaml.safe_load(text)
    assert parsed["data"]["vocab_size"] == 32000 and parsed["model"]["model"]["init_args"]["dropout"] == 0.4
    code, text = print_config(config, config.parent / "smoke.yaml")
    assert code == 0, text
    smoke = yaml.safe_load(text)
    assert (
        smoke["trainer"]["accelerator"] == "cpu" and smoke["model"]["model"]["init_args"]["hidden_size"] == 32
    )
    assert smoke["model"]["model"]["init_args"]["gate"] == parsed["model"]["model"]["init_args"]["gate"]


def test_a_misspelt_key_fails_to_parse(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIGS[0].read_text())
    config["model"]["model"]["init_args"]["num_expert"] = 8
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    code, _ = print_config(tmp_path / "typo.yaml")
    assert code != 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_builds_on_meta_at_paper_shape(config: Path) -> None:
    report = plan(config, gpus=8, expert_parallel_size=8)
    args = report["model"]
    assert (args["encoder_layers"], args["decoder_layers"]) == (3, 2)
    assert (args["encoder_moe_after"], args["decoder_moe_after"]) == ([2], [1])
    assert report["recipe"]["optimizer"] == "adam"
    if config.name == "config.yaml":
        assert [m["experts"] for m in report["moe_layers"]] == [2048, 2048]
        assert report["parameters"]["total"] > 8e9
    else:
        assert [(m["experts"], m["experts_per_token"]) for m in report["moe_layers"]] == [(32, 4), (32, 4)]


@pytest.mark.parametrize("recipe", WMT, ids=lambda p: p.name)
def test_run_sh_is_valid_bash(recipe: Path) -> None:
    script = recipe / "run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", str(script)], check=True)
    assert (recipe / "run.sh").stat().st_mode & 0o111, "run.sh must be executable"


def write_wmt_layout(directory: Path, src: str, tgt: str, lines: int = 300) -> None:
    """A toy word-for-word language pair in WMT file layout: train, newstest2013, newstest2014."""
    rng = random.Random(0)
    words = "the a man woman dog cat red big small house park runs sees eats in and with ball".split()
    lexicon = {w: w[::-1] + "x" for w in words}
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", lines), ("newstest2013", 30), ("newstest2014", 30)):
        pairs = [[rng.choice(words) for _ in range(rng.randint(3, 9))] for _ in range(n)]
        (directory / f"{name}.{src}").write_text("".join(" ".join(p).capitalize() + " .\n" for p in pairs))
        translated = (" ".join(lexicon[w] for w in p).capitalize() + " .\n" for p in pairs)
        (directory / f"{name}.{tgt}").write_text("".join(translated))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,tgt", [(WMT[0], "de"), (WMT[1], "fr")], ids=["en_de", "en_fr"])
def test_smoke_runs_the_recipe_end_to_end(recipe: Path, tgt: str, tmp_path: Path) -> None:
    """About 1.5 minutes each on a shared 2-core CPU: prepare, train, average, export, beam search, score."""
    write_wmt_layout(tmp_path / "data", "en", tgt)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(recipe / "run.sh"), "--smoke", str(tmp_path / "data"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (out / "export" / "config.json").is_file()
    hypotheses = (out / f"newstest2014.hyp.{tgt}").read_text().splitlines()
    assert len(hypotheses) == 30
    scores = (out / "scores.txt").read_text()
    assert "BLEU" in scores and "chrF" in scores
    assert f"exported model: {out}/export" in result.stdout

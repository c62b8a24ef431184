"""The WMT'14 recipes: every config parses as `nmt-moe train` reads it and builds on the meta device at the
paper's size (`nmt-moe plan` against Table 2's parameters and ops/timestep), the two language pairs differ
only in their languages, validation and checkpoint monitors agree, run.sh and the SLURM scripts are valid
bash, `run.sh --smoke` runs the whole recipe on tiny local data (slow) and `run.sh --reduced` runs it at
reduced size on 100k WMT-shaped pairs from Multi30k with balanced expert load (slow: about 11 min per
language pair on a quiet 2-core box). Multi-node launching: tests/recipes/test_wmt_launch.py."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.cli import print_config
from helpers.data import write_wmt_layout
from helpers.tiny_models import tiny_checkpoint

from nmt_moe.checkpoint import export_bundle
from nmt_moe.plan import GIB, plan

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
WMT = [RECIPES / "wmt14_en_de", RECIPES / "wmt14_en_fr"]
CONFIGS = [recipe / name for recipe in WMT for name in ("config.yaml", "config_flat32.yaml")]
# Shazeer et al. (2017), Tables 2 and 3, "MoE with 2048 Experts": 8.7B parameters, 85M ops/timestep.
PAPER_PARAMETERS, PAPER_OPS_PER_TIMESTEP = 8.7e9, 85e6


def load_script(path: Path):  # noqa: ANN201 - a module
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_with_and_without_smoke_overrides(config: Path) -> None:
    code, text = print_config(config)
    assert code == 0, text
    parsed = yaml.safe_load(text)
    assert parsed["data"]["pipeline"]["vocab_size"] == 32000 and parsed["model"]["model"]["dropout"] == 0.4
    code, text = print_config(config, config.parent / "smoke.yaml")
    assert code == 0, text
    smoke = yaml.safe_load(text)
    assert smoke["trainer"]["accelerator"] == "cpu" and smoke["model"]["model"]["hidden_size"] == 32
    assert smoke["model"]["model"]["moe"]["gate"] == parsed["model"]["model"]["moe"]["gate"]


def test_a_misspelt_key_fails_to_parse(tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIGS[0].read_text())
    config["model"]["model"]["moe"]["num_expert"] = 8
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


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_plan_agrees_with_the_papers_parameters_and_ops_per_timestep(config: Path) -> None:
    """`nmt-moe plan` counts 2 x multiply-adds per target token with source = target length, so half its
    forward FLOPs are the multiply-adds of one encoder and one decoder step: the paper's "ops/timestep"
    (its GNMT row, 214M, counts the same way). The flat-32 model visits as many experts per token."""
    sharded = config.name == "config.yaml"
    report = plan(config, gpus=8, expert_parallel_size=8 if sharded else 1)
    ops = report["flops_per_target_token"]["forward"] / 2
    assert ops == pytest.approx(PAPER_OPS_PER_TIMESTEP, rel=0.1)
    assert [m["experts_per_token"] for m in report["moe_layers"]] == [4, 4]  # paper: 4 experts per token
    if sharded:
        assert report["parameters"]["total"] == pytest.approx(PAPER_PARAMETERS, rel=0.02)
        assert report["memory_per_device_bytes"]["total"] < 78 * GIB  # fits an 80 GB GPU
        big = plan(config, gpus=64, expert_parallel_size=64)["memory_per_device_bytes"]["total"]
        assert big < report["memory_per_device_bytes"]["total"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_states_the_papers_settings(config: Path) -> None:
    """Appendix E of the paper, key by key (departures are commented in the configs)."""
    code, text = print_config(config)
    assert code == 0, text
    parsed = yaml.safe_load(text)
    module, args = parsed["model"], parsed["model"]["model"]
    options = args["moe"]
    assert (module["optimizer"], module["warmup_steps"], module["hold_steps"], module["schedule"]) == (
        "adam", 2000, 8000, "inverse_sqrt"
    )  # fmt: skip
    assert args["dropout"] == 0.4 and args["embed_dim"] == 512 and options["activation"] == "relu"
    assert options["w_importance"] == 0.01
    assert parsed["data"]["pipeline"]["vocab_size"] == 32000 and parsed["data"]["pipeline"]["joint_vocab"]
    assert parsed["data"]["pipeline"]["spm_input_sentence_size"] == 1_000_000
    expert_parameters = 2 * args["hidden_size"] * options["d_hidden"]
    assert expert_parameters == pytest.approx(2 * 512 * 2048, rel=0.05)  # paper: about 2M per expert
    if config.name == "config.yaml":
        assert (options["gate"], options["num_experts"], options["k"], options["k_group"]) == (
            "hierarchical",
            2048,
            2,
            2,
        )
        assert options["w_load"] == 0.01
    else:
        assert (options["gate"], options["num_experts"], options["k"]) == ("batchwise", 32, 4)  # balanced


# every config as written and with the overrides run.sh gives it (reduced.yaml shrinks config.yaml only)
WITH_OVERRIDES = [(config, override) for config in CONFIGS for override in (None, "smoke.yaml")] + [
    (recipe / "config.yaml", "reduced.yaml") for recipe in WMT
]


@pytest.mark.parametrize(
    "config,override",
    WITH_OVERRIDES,
    ids=lambda x: f"{x.parent.name}/{x.name}" if isinstance(x, Path) else str(x),
)
def test_validation_and_monitors_agree(config: Path, override: str | None) -> None:
    """val_max_sentences 0 (loss only) must not leave a checkpoint or early stopping on val/bleu."""
    code, text = print_config(config, *([config.parent / override] if override else []))
    assert code == 0, text
    parsed = yaml.safe_load(text)
    decodes = parsed["model"]["val_max_sentences"] > 0
    for key in ("checkpoint", "early_stopping"):
        assert decodes or parsed[key]["monitor"] != "val/bleu", (key, parsed[key])
        assert parsed[key]["mode"] == ("max" if parsed[key]["monitor"] == "val/bleu" else "min")
    world = parsed["trainer"]["devices"] * parsed["trainer"]["num_nodes"]
    assert world % parsed["model"]["expert_parallel_size"] == 0


@pytest.mark.parametrize(
    "name", ["config.yaml", "config_flat32.yaml", "smoke.yaml", "reduced.yaml", "slurm.sh"]
)
def test_the_two_language_pairs_differ_only_in_their_languages(name: str) -> None:
    de, fr = ((recipe / name).read_text() for recipe in WMT)
    swaps = [("English->German", "English->French"), ("wmt14_en_de", "wmt14_en_fr"),
             ("tgt_lang: de", "tgt_lang: fr"), ("de-en", "fr-en"), ("train.de", "train.fr"),
             ("1 day on 64 K40s for En->De", "3 days on 64 K40s for En->Fr"),
             ("(1 day for En->De)", "(3 days for En->Fr)")]  # fmt: skip
    for old, new in swaps:
        de = de.replace(old, new)
    assert de == fr


def sbatch_options(script: Path) -> dict[str, str]:
    options = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH"):
            for option in line.split()[1:]:
                key, _, value = option.lstrip("-").partition("=")
                options[key] = value
    return options


@pytest.mark.parametrize("recipe", WMT, ids=lambda p: p.name)
def test_slurm_script_is_valid_bash_and_agrees_with_the_config(recipe: Path) -> None:
    script = recipe / "slurm.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", str(script)], check=True)
    assert script.stat().st_mode & 0o111
    options, text = sbatch_options(script), script.read_text()
    config = yaml.safe_load((recipe / "config.yaml").read_text())
    nodes = int(re.search(r"^NODES=(\d+)$", text, re.M).group(1))
    expert_parallel = int(re.search(r"^EXPERT_PARALLEL_SIZE=(\d+)$", text, re.M).group(1))
    assert int(options["nodes"]) == nodes
    assert int(options["ntasks-per-node"]) == int(options["gpus-per-node"]) == config["trainer"]["devices"]
    world = nodes * config["trainer"]["devices"]
    report = plan(recipe / "config.yaml", gpus=world, expert_parallel_size=expert_parallel)  # divides both
    assert report["memory_per_device_bytes"]["total"] < 78 * GIB
    assert (
        f"RECIPE={recipe.name}\n" in text
        and '"recipes/$RECIPE/run.sh"' in text
        and "TRAIN_LAUNCHER=srun" in text
    )
    # docs/PARALLEL.md shows the same script's header
    doc = (ROOT / "docs" / "PARALLEL.md").read_text()
    assert "sbatch recipes/wmt14_en_de/slurm.sh" in doc
    for line in (ROOT / "recipes" / "wmt14_en_de" / "slurm.sh").read_text().splitlines():
        if line.startswith("#SBATCH --nodes") or line.startswith("#SBATCH --ntasks"):
            assert line in doc


def test_expert_load_report_judges_the_busiest_expert(tmp_path: Path) -> None:
    script = load_script(RECIPES / "wmt14_en_de" / "expert_load.py")
    metrics = tmp_path / "metrics.csv"
    enc, dec = "moe/encoder.moe0/max_load_share", "moe/decoder.moe0/max_load_share"
    rows = [{"step": 19, enc: "0.30", dec: "0.3"}, {"step": 20, "train/loss": "5.0"},
            {"step": 39, enc: "0.45", dec: "0.6"}]  # fmt: skip
    with metrics.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["step", "train/loss", *(k for k in rows[0] if k != "step")])
        writer.writeheader()
        writer.writerows(rows)
    ratios = script.load_ratios(metrics, num_experts=4)
    assert ratios == {"decoder.moe0": [(19, 1.2), (39, 2.4)], "encoder.moe0": [(19, 1.2), (39, 1.8)]}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert script.main([str(metrics), "--num-experts", "4"]) == 1  # decoder at 2.4x uniform
        assert script.main([str(metrics), "--num-experts", "4", "--limit", "2.5"]) == 0
    assert "decoder.moe0" in out.getvalue() and "OVER 2x" in out.getvalue()
    with contextlib.redirect_stderr(io.StringIO()):
        assert script.main([str(tmp_path / "missing.csv"), "--num-experts", "4"]) == 2
    tiny_checkpoint(tmp_path / "tiny.ckpt")  # 4 experts
    export_bundle(tmp_path / "tiny.ckpt", tmp_path / "export")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the expert count read from an export's (nested) model config
        assert script.main([str(metrics), "--export", str(tmp_path / "export")]) == 1
    assert "x 4 experts" in out.getvalue()


def joins_sentences(line: str, sentences: set[str], most: int = 3) -> bool:
    """Whether `line` is 1 to `most` of `sentences` joined by spaces."""
    if line in sentences:
        return True
    return most > 1 and any(
        line.startswith(head + " ") and joins_sentences(line[len(head) + 1 :], sentences, most - 1)
        for head in sentences
    )


def test_reduced_corpus_is_deterministic_and_in_wmt_layout(tmp_path: Path, multi30k: Path) -> None:
    script = load_script(RECIPES / "wmt14_en_de" / "make_reduced_data.py")
    first = script.make_reduced_data(tmp_path / "a", multi30k, "fr", pairs=500)
    second = script.make_reduced_data(tmp_path / "b", multi30k, "fr", pairs=500)
    for name in ("train.en", "train.fr", "newstest2013.fr", "newstest2014.en", "newstest2014.fr"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert len((first / "train.en").read_text().splitlines()) == 500
    # the test sets are WMT-shaped like the training lines: 1-3 sentences of their own Multi30k split
    for name, split in (("newstest2013", "val"), ("newstest2014", "test_2016_flickr")):
        for lang in ("en", "fr"):
            sentences = set((multi30k / f"{split}.{lang}").read_text().splitlines())
            lines = (first / f"{name}.{lang}").read_text().splitlines()
            assert len(lines) == len((multi30k / f"{split}.{lang}").read_text().splitlines())
            assert all(joins_sentences(line, sentences) for line in lines), (name, lang)
            assert sum(line in sentences for line in lines) < 0.5 * len(lines)  # most lines join several
    with contextlib.redirect_stderr(io.StringIO()):
        assert script.main([str(tmp_path / "c"), "--tgt", "xx", "--multi30k", str(multi30k)]) == 2


@pytest.mark.parametrize("recipe", WMT, ids=lambda p: p.name)
def test_run_sh_is_valid_bash(recipe: Path) -> None:
    script = recipe / "run.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-x", str(script)], check=True)
    assert (recipe / "run.sh").stat().st_mode & 0o111, "run.sh must be executable"


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


def read_bleu(scores: str) -> float:
    return float(re.search(r"BLEU\D*([0-9.]+)", scores).group(1))


def read_length_ratio(scores: str) -> float:
    """sacreBLEU's hypothesis / reference length ratio."""
    return float(re.search(r"ratio = ([0-9.]+)", scores).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,tgt", [(WMT[0], "de"), (WMT[1], "fr")], ids=["en_de", "en_fr"])
def test_reduced_run_learns_with_balanced_experts(
    recipe: Path, tgt: str, tmp_path: Path, multi30k: Path
) -> None:
    """config.yaml + reduced.yaml through run.sh --reduced on 100k WMT-shaped pairs from Multi30k: prepare,
    1,800 training steps with 5 validations, the last checkpoint through `average` and export, beam search
    on 1000 WMT-shaped test lines, BLEU. Measured on a quiet 2-core box (run.sh alone): en->de 11m09s,
    en->fr 11m05s wall end to end."""
    data = tmp_path / "data"
    make = subprocess.run(
        [sys.executable, str(RECIPES / "wmt14_en_de" / "make_reduced_data.py"), str(data), "--tgt", tgt,
         "--multi30k", str(multi30k)],  # fmt: skip
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert make.returncode == 0, make.stderr
    out = tmp_path / "out"
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        ["bash", str(recipe / "run.sh"), "--reduced", str(data), str(out)],
        capture_output=True, text=True, timeout=4800, env=env,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text(result.stdout + result.stderr)  # kept under --basetemp for a look
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert len((out / f"newstest2014.hyp.{tgt}").read_text().splitlines()) == 1000
    rows = list(csv.DictReader((out / "train" / "csv" / "version_0" / "metrics.csv").open(newline="")))
    val_losses = [float(row["val/loss"]) for row in rows if row.get("val/loss")]
    # validated 5 times, and it learned: validation loss en->de 4.42 -> 3.25, en->fr 3.91 -> 2.80; test BLEU
    # en->de 8.72, en->fr 6.09, hypotheses 1.03x / 0.91x the references' length (the previous
    # settings, averaging 5 checkpoints 360 steps apart: BLEU 2.69, hypotheses 1.6x too long)
    assert len(val_losses) == 5 and val_losses[-1] < val_losses[0] - 1.0, val_losses
    scores = (out / "scores.txt").read_text()
    assert read_bleu(scores) >= 4.0, scores
    assert 0.8 <= read_length_ratio(scores) <= 1.25, scores
    # The expert load per MoE layer stays within 2x of uniform at every logged interval
    assert "expert load balanced: yes" in result.stdout, result.stdout[-3000:]
    ratios = load_script(RECIPES / "wmt14_en_de" / "expert_load.py").load_ratios(
        out / "train" / "csv" / "version_0" / "metrics.csv", num_experts=64
    )
    assert sorted(ratios) == ["decoder.moe0", "encoder.moe0"]
    assert all(1.0 <= ratio <= 2.0 for points in ratios.values() for _, ratio in points), ratios

"""Broken and hostile model files and output paths: one line on stderr and exit code 2, never a traceback,
and nothing allocated, imported or computed before the check.

Through the real entry points (`nmt-moe translate / export / average / evaluate / train`), in-process where
that is safe; the over-sized configs run in a subprocess under an address-space limit, so a regression
fails with MemoryError instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import one_line_error
from helpers.tiny_models import tiny_checkpoint
from helpers.training import RECIPE

from nmt_moe.checkpoint import CONFIG_FILE, export_bundle, load_model
from nmt_moe.cli import main
from nmt_moe.model_files import ModelLoadError, check_output_path, check_training_checkpoint

ADDRESS_SPACE_LIMIT = 6 << 30  # bytes; torch's import needs ~2 GB of address space, a 400M vocabulary 400 GB


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["nmt-moe"])


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    tiny_checkpoint(tmp_path / "m.ckpt")
    return export_bundle(tmp_path / "m.ckpt", tmp_path / "bundle")


def edit_config(bundle: Path, **changes: object) -> None:
    """Set model config keys; "moe.k" names a key of the nested MoE section."""
    section = json.loads((bundle / CONFIG_FILE).read_text())
    for key, value in changes.items():
        *parents, name = key.split(".")
        target = section["model_config"]
        for parent in parents:
            target = target[parent]
        target[name] = value
    (bundle / CONFIG_FILE).write_text(json.dumps(section))


def translate(model: Path, tmp_path: Path, *extra: str) -> int:
    (tmp_path / "in.txt").write_text("a man\n")
    return main(["translate", "-m", str(model), "-i", str(tmp_path / "in.txt"), "--beam", "1", *extra])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 32}, "model config and weights do not match"),  # the weights are 16 wide
        ({"moe.num_experts": 8}, "model config and weights do not match"),
        ({"ffn": "dense"}, "model config and weights do not match"),
        ({"encoder_layers": 3}, "model config and weights do not match"),
        ({"hidden_size": "16"}, "does not fit this nmt-moe's Seq2Seq"),
        ({"dropout": -1}, "dropout must be in [0, 1)"),
        ({"moe.no_such_option": 1}, "does not fit this nmt-moe's Seq2Seq"),
        ({"moe.k": 1e300}, "does not fit this nmt-moe's Seq2Seq"),
        ({"encoder_moe_after": [[1]]}, "does not fit this nmt-moe's Seq2Seq"),
    ],
)
def test_config_that_disagrees_with_the_weights_is_one_line(
    changes: dict, message: str, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    edit_config(bundle, **changes)
    assert translate(bundle, tmp_path) == 2
    line = one_line_error(capsys.readouterr().err)
    assert message in line and str(bundle) in line


def test_the_mismatch_names_the_tensor_and_both_shapes(bundle: Path) -> None:
    edit_config(bundle, hidden_size=32)
    with pytest.raises(
        ModelLoadError, match=r"encoder.bottom.weight_ih_l0: config \(64, 16\), weights \(32, 16\)"
    ) as error:
        load_model(bundle)
    assert "config implies" in str(error.value) and "the weights hold" in str(error.value)


def test_weights_file_of_another_model_is_one_line(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.save({f"layer{i}.weight": torch.zeros(3, 3) for i in range(40)}, bundle / "weights.pt")
    assert translate(bundle, tmp_path) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "missing decoder." in line and "unexpected layer0.weight" in line


OVERSIZED = {
    "400M-vocabulary": {"vocab_size": 400_000_000},
    "1G-experts": {"moe.num_experts": 10**9},
    "1G-layers": {"encoder_layers": 10**9},
    "huge-experts": {"moe.d_hidden": 10**12},
}
# Runs under the address-space limit: `nmt-moe translate` on each bundle, then the allocation it must avoid.
LIMITED_SCRIPT = """
import contextlib, io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from nmt_moe.cli import main
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
results = {{}}
for name, bundle in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["translate", "-m", bundle, "-i", sys.argv[2]])
    results[name] = [code, err.getvalue()]
try:
    Seq2Seq(Seq2SeqConfig(vocab_size=400_000_000, embed_dim=16, hidden_size=16))
    results["allocation"] = "succeeded"
except (MemoryError, RuntimeError) as error:
    results["allocation"] = type(error).__name__
print(json.dumps(results))
"""


def test_oversized_configs_are_refused_before_anything_is_allocated(bundle: Path, tmp_path: Path) -> None:
    """In one subprocess whose address space is capped: a regression fails with MemoryError there instead
    of taking the machine's memory, and the last line proves the cap would catch the allocation."""
    bundles = {}
    for name, changes in OVERSIZED.items():
        copy = tmp_path / name
        shutil.copytree(bundle, copy)
        edit_config(copy, **changes)
        bundles[name] = str(copy)
    (tmp_path / "in.txt").write_text("a man\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), OMP_NUM_THREADS="1")
    script = LIMITED_SCRIPT.format(limit=ADDRESS_SPACE_LIMIT)
    argv = [sys.executable, "-c", script, json.dumps(bundles), str(tmp_path / "in.txt")]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    assert results.pop("allocation") in ("MemoryError", "RuntimeError")  # the cap bites
    for name, (code, err) in results.items():
        assert code == 2, (name, err)
        line = one_line_error(err)
        assert bundles[name] in line, line
        assert "weights do not match" in line or "weights hold only" in line, line


# --- class paths in a training checkpoint ------------------------------------------------------------------


def hostile_training_checkpoint(path: Path, hparams: dict) -> Path:
    """A checkpoint in `nmt-moe train`'s format whose hyper-parameters are `hparams`."""
    model, _ = tiny_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.update({"pytorch-lightning_version": "2.6.6", "hyper_parameters": hparams})
    checkpoint["hyper_parameters"].setdefault("model", {}).setdefault("init_args", model.config)
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    "hparams",
    [
        {"model": {"class_path": "marker_module.Anything"}},
        {"_class_path": "marker_module.Anything"},
        {"optimizer": {"class_path": "marker_module.Anything"}},
        {"_instantiator": "marker_module.instantiate"},
    ],
    ids=["model", "module", "nested", "instantiator"],
)
def test_checkpoint_naming_another_class_is_refused_before_importing_it(
    hparams: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "marker_module.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = hostile_training_checkpoint(tmp_path / "hostile.ckpt", hparams)
    argv = ["train", "fit", "--config", str(RECIPE), "--wandb", "off", "--ckpt_path", str(path)]
    argv += ["--trainer.default_root_dir", str(tmp_path / "run")]
    assert main(argv) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "marker_module" in line and str(path) in line
    assert not marker.exists() and "marker_module" not in sys.modules


def test_checkpoint_hyper_parameters_must_describe_its_own_weights(tmp_path: Path) -> None:
    path = hostile_training_checkpoint(tmp_path / "big.ckpt", {})
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["model"] = {
        "class_path": "nmt_moe.models.Seq2Seq",
        "init_args": {**checkpoint["nmt_moe"]["model_config"], "vocab_size": 400_000_000},
    }
    with pytest.raises(ModelLoadError, match="model config and weights do not match"):
        check_training_checkpoint(checkpoint, path)
    checkpoint["hyper_parameters"]["model"]["init_args"]["vocab_size"] = 64
    check_training_checkpoint(checkpoint, path)  # our own class, the checkpoint's own shapes: accepted
    # the same in the layout written now (the model config itself, no class path)
    checkpoint["hyper_parameters"]["model"] = {
        **checkpoint["nmt_moe"]["model_config"],
        "vocab_size": 400_000_000,
    }
    with pytest.raises(ModelLoadError, match="model config and weights do not match"):
        check_training_checkpoint(checkpoint, path)
    checkpoint["hyper_parameters"]["model"]["vocab_size"] = 64
    check_training_checkpoint(checkpoint, path)


def old_flat_layout(config: dict) -> dict:
    """A model config as checkpoints held it before MoEConfig: num_experts, k, gate, d_hidden beside the
    model's keys and every other MoE setting in moe_options."""
    old = {key: value for key, value in config.items() if key != "moe"}
    moe = dict(config["moe"])
    old.update({key: moe.pop(key) for key in ("num_experts", "k", "gate", "d_hidden")}, moe_options=moe)
    return old


def test_bundle_written_with_moe_options_still_translates(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert translate(bundle, tmp_path, "-o", str(tmp_path / "new.txt")) == 0
    section = json.loads((bundle / CONFIG_FILE).read_text())
    section["model_config"] = old_flat_layout(section["model_config"])
    assert "moe_options" in section["model_config"] and "moe" not in section["model_config"]
    (bundle / CONFIG_FILE).write_text(json.dumps(section))
    assert translate(bundle, tmp_path, "-o", str(tmp_path / "old.txt")) == 0
    assert (tmp_path / "old.txt").read_text() == (tmp_path / "new.txt").read_text()
    model, _ = load_model(bundle)
    assert "moe" in model.config and "moe_options" not in model.config  # rebuilt in the new layout


# --- output paths ------------------------------------------------------------------------------------------


def unwritable_paths(tmp_path: Path) -> dict[str, Path]:
    """Output paths no process can write, root included (tests here may run as root)."""
    (tmp_path / "a_file").write_text("x")
    return {
        "missing directory": tmp_path / "missing" / "dir" / "out.txt",
        "file as directory": tmp_path / "a_file" / "out.txt",
        "read-only filesystem": Path("/proc/out.txt"),
        "directory as file": tmp_path,
    }


@pytest.mark.parametrize("case", ["missing directory", "file as directory", "read-only filesystem"])
def test_unwritable_output_path_is_named_before_the_work(
    case: str, bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = unwritable_paths(tmp_path)[case]

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("nmt_moe.decoding.ensemble.load_model", no_model)  # what translate loads through
    assert translate(bundle, tmp_path, "-o", str(out)) == 2
    assert str(out) in one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["export", "average", "evaluate"])
def test_other_writers_name_an_unwritable_output(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tiny_checkpoint(tmp_path / "m.ckpt")
    out = unwritable_paths(tmp_path)["file as directory"]
    (tmp_path / "src.txt").write_text("a man\n")
    argv = {
        "export": ["export", tmp_path / "m.ckpt", "-o", out],
        "average": ["average", tmp_path / "m.ckpt", "-o", out],
        "evaluate": ["evaluate", "-m", tmp_path / "m.ckpt", "--src", tmp_path / "src.txt", "-r",
                     tmp_path / "src.txt", "-o", out, "--beam", "1"],
    }[command]  # fmt: skip
    assert main([str(a) for a in argv]) == 2
    assert str(tmp_path / "a_file") in one_line_error(capsys.readouterr().err)


def test_output_path_checks(tmp_path: Path) -> None:
    paths = unwritable_paths(tmp_path)
    for path in paths.values():
        with pytest.raises(ModelLoadError, match="directory|cannot write"):
            check_output_path(path)
    check_output_path(tmp_path / "fine.txt")
    assert not (tmp_path / "fine.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]

"""`nmt-moe train` end to end on CPU: a tiny MoE model learns the synthetic copy task, its checkpoints
translate on their own, reload to the same validation loss and resume; W&B offline runs hold the logs."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import pytest
import torch
import wandb
from helpers.training import RECIPE, train, write_copy_task

from nmt_moe.cli import main


def csv_metrics(root: Path, version: int) -> list[dict[str, float]]:
    """Rows of the CSV logger's metrics.csv, empty cells dropped."""
    with open(root / "csv" / f"version_{version}" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def last_value(rows: list[dict[str, float]], key: str) -> float:
    return [row[key] for row in rows if key in row][-1]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["nmt-moe"])  # LightningCLI warns when sys.argv also holds arguments


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    """One torch thread: the 2-core test machine is shared, and spinning OpenMP threads slow every job."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One full `fit` of the tiny_copy recipe (6 epochs) with the CSV logger; returns (data, root)."""
    data = write_copy_task(tmp_path_factory.mktemp("copy_data"))
    root = tmp_path_factory.mktemp("copy_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["nmt-moe"])
        assert train("fit", data, root, "--wandb", "off") == 0
    return data, root


def test_tiny_copy_model_reaches_95_percent_token_accuracy(copy_run: tuple[Path, Path]) -> None:
    _, root = copy_run
    rows = csv_metrics(root, 0)
    assert last_value(rows, "val/acc") >= 0.95
    assert last_value(rows, "val/bleu") >= 90.0
    first_loss = [row["val/loss"] for row in rows if "val/loss" in row][0]
    assert last_value(rows, "val/loss") < first_loss / 10
    # training scalars, throughput and expert statistics reach the logger
    for key in ("train/loss", "train/ce", "train/aux_loss", "train/tok_s", "train/lr",
                "train/encoder.moe0/importance", "moe/encoder.moe0/load_cv", "moe/decoder.moe0/load/003",
                "moe/decoder.moe0/dropped_frac"):  # fmt: skip
        assert any(key in row for row in rows), key
    share_rows = [row for row in rows if "moe/encoder.moe0/load/000" in row]
    assert sum(share_rows[-1][f"moe/encoder.moe0/load/{e:03d}"] for e in range(4)) == pytest.approx(
        1.0, abs=1e-4
    )
    assert (root / "csv" / "version_0" / "expert_load" / "encoder.moe0.png").stat().st_size > 0
    assert (root / "csv" / "version_0" / "config.yaml").exists()


def test_checkpoint_translates_on_its_own(copy_run: tuple[Path, Path]) -> None:
    from nmt_moe.data.tokenizer import Tokenizer
    from nmt_moe.decoding.greedy import greedy_decode
    from nmt_moe.models import Seq2Seq, Seq2SeqConfig

    data, root = copy_run
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    extra = checkpoint["nmt_moe"]
    assert extra["version"] == 1
    model = Seq2Seq(Seq2SeqConfig.from_dict(extra["model_config"]))
    state = {
        k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")
    }
    model.load_state_dict(state)
    tokenizer = Tokenizer.from_bytes(extra["tokenizer"])
    sentences = (data / "test.src").read_text().splitlines()[:20]
    ids = [row + [3] for row in tokenizer.encode(sentences)]  # + EOS, as the data module does
    src = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in ids], batch_first=True)
    hypotheses = tokenizer.decode(greedy_decode(model, src, torch.tensor([len(r) for r in ids]))[0])
    assert sum(h == s for h, s in zip(hypotheses, sentences, strict=True)) >= 18
    assert list((root / "checkpoints").glob("best-*.ckpt"))


def test_checkpoint_reloads_to_the_same_validation_loss(copy_run: tuple[Path, Path]) -> None:
    data, root = copy_run
    trained = last_value(csv_metrics(root, 0), "val/loss")
    assert (
        train(
            "validate", data, root, "--wandb", "off", "--ckpt_path", str(root / "checkpoints" / "last.ckpt")
        )
        == 0
    )
    versions = sorted(root.glob("csv/version_*"), key=lambda p: int(p.name.split("_")[1]))
    reloaded = last_value(csv_metrics(root, int(versions[-1].name.split("_")[1])), "val/loss")
    assert reloaded == pytest.approx(trained, rel=1e-5, abs=1e-7)


def test_checkpoint_written_with_moe_options_still_validates(
    copy_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """A training checkpoint from before the typed model config: hyper-parameters holding the model as
    {class_path, init_args} with flat MoE keys and moe_options, and the same flat model_config."""
    data, root = copy_run
    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    config = dict(checkpoint["nmt_moe"]["model_config"])
    moe = config.pop("moe")
    old = {
        **config,
        **{key: moe.pop(key) for key in ("num_experts", "k", "gate", "d_hidden")},
        "moe_options": moe,
    }
    checkpoint["hyper_parameters"]["model"] = {"class_path": "nmt_moe.models.Seq2Seq", "init_args": old}
    checkpoint["nmt_moe"]["model_config"] = old
    torch.save(checkpoint, tmp_path / "old.ckpt")
    losses = {}
    for name, path in {"new": root / "checkpoints" / "last.ckpt", "old": tmp_path / "old.ckpt"}.items():
        assert train("validate", data, tmp_path / name, "--wandb", "off", "--ckpt_path", str(path)) == 0
        losses[name] = last_value(csv_metrics(tmp_path / name, 0), "val/loss")
    assert losses["old"] == losses["new"]


def test_print_config_shows_every_knob_with_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a recipe and with one: every model, MoE, optimisation and data setting is listed (none hidden
    in an untyped mapping or behind `model: null`); only vocab_size is left to data.pipeline by the link."""
    import dataclasses
    import inspect

    import yaml

    from nmt_moe.data.cleaning import CleaningConfig
    from nmt_moe.data.datamodule import TranslationDataModule
    from nmt_moe.data.pipeline import PipelineConfig
    from nmt_moe.models import Seq2SeqConfig
    from nmt_moe.moe import MoEConfig
    from nmt_moe.training.module import TranslationModule

    def names(kind: type) -> set[str]:
        return {field.name for field in dataclasses.fields(kind)}

    def arguments(kind: type) -> set[str]:
        return set(inspect.signature(kind.__init__).parameters) - {"self"}

    for recipe in ([], ["--config", str(RECIPE)]):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "fit", *recipe, "--print_config"])
        assert exit_.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        module, data = printed["model"], printed["data"]
        assert set(module) == arguments(TranslationModule)
        assert set(module["model"]) == names(Seq2SeqConfig) - {"vocab_size"}  # linked from the data
        assert set(module["model"]["moe"]) == names(MoEConfig)
        assert set(data) == arguments(TranslationDataModule)
        assert set(data["pipeline"]) == names(PipelineConfig)
        assert set(data["pipeline"]["cleaning"]) == names(CleaningConfig)
        if not recipe:  # the defaults themselves
            assert module["model"]["moe"] == dataclasses.asdict(MoEConfig())
            assert data["pipeline"]["cleaning"] == dataclasses.asdict(CleaningConfig())
            assert module["lr"] == inspect.signature(TranslationModule.__init__).parameters["lr"].default


def test_fit_resumes_from_last(copy_run: tuple[Path, Path]) -> None:
    data, root = copy_run
    before = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    args = ("--wandb", "off", "--trainer.max_epochs", str(before["epoch"] + 2), "--ckpt_path", "last")
    assert train("fit", data, root, *args) == 0
    after = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["epoch"] == before["epoch"] + 1
    assert after["global_step"] > before["global_step"]
    assert (
        after["callbacks"]["ExpertLoadMonitor"]["steps"][
            : len(before["callbacks"]["ExpertLoadMonitor"]["steps"])
        ]
        == (before["callbacks"]["ExpertLoadMonitor"]["steps"])
    )


def test_fit_in_bf16_mixed_learns_like_float32_and_keeps_float32_weights(tmp_path: Path) -> None:
    """The Multi30k recipes train in bf16-mixed on CPU: the loss follows float32's, weights stay fp32."""
    data = write_copy_task(tmp_path / "data")
    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        root = tmp_path / precision
        args = ("--wandb", "off", "--trainer.precision", precision, "--trainer.max_steps", "40")
        args += ("--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1")
        assert train("fit", data, root, *args) == 0
        losses[precision] = [row["train/loss"] for row in csv_metrics(root, 0) if "train/loss" in row]
    fp32, bf16 = losses["32-true"], losses["bf16-mixed"]
    assert len(bf16) == len(fp32) >= 35 and all(map(math.isfinite, bf16))
    assert sum(bf16[-10:]) < 0.85 * sum(bf16[:10])  # it learns ...
    assert sum(bf16[-10:]) == pytest.approx(sum(fp32[-10:]), rel=0.05)  # ... as float32 does
    state = torch.load(tmp_path / "bf16-mixed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}


def test_fit_without_validation_trains_and_checkpoints(tmp_path: Path) -> None:
    """Early stopping watches val/bleu; a run with validation switched off must train on, not crash."""
    data, root = write_copy_task(tmp_path / "data"), tmp_path / "run"
    args = ("--wandb", "off", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "2")
    assert train("fit", data, root, *args) == 0
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_wandb_offline_run_holds_metrics_pictures_and_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: W&B must go offline by itself
    monkeypatch.delenv("WANDB_MODE", raising=False)
    data, root = write_copy_task(tmp_path / "data"), tmp_path / "run"
    args = (
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "12",
        "--expert_load.every_n_steps",
        "4",
    )
    assert train("fit", data, root, *args) == 0
    # run.finish() only tells the W&B service process that the run is over; the service closes (and flushes)
    # the run file afterwards. teardown() waits for the service to exit, so the file is complete when read.
    wandb.teardown()
    runs = list((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected one offline W&B run under <default_root_dir>/wandb"
    records = next(runs[0].glob("run-*.wandb")).read_bytes()  # protobuf records: metric names appear verbatim
    for key in (b"train/loss", b"train/tok_s", b"val/bleu", b"val/loss", b"moe/encoder.moe0/load_cv", b"lr"):
        assert key in records, key
    assert b"expert_backend" in records  # the full config (every MoE knob) is logged with the run
    media = runs[0] / "files" / "media"
    assert list(media.glob("images/moe/encoder.moe0/load_heatmap_*.png"))
    assert list(media.glob("table/val/samples_*.table.json"))


def test_print_config_shows_every_part(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["train", "fit", "--config", str(RECIPE), "--print_config"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    expected = ["moe:", "num_experts: 4", "label_smoothing:", "vocab_size: 56"]
    expected += ["monitor: val/bleu", "every_n_steps: 10", "wandb: auto", "gradient_clip_val: 1.0"]
    for text in expected:
        assert text in out, text


def test_wandb_online_only_with_a_configured_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nmt_moe.training.tracking import wandb_api_key_configured

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not wandb_api_key_configured()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_api_key_configured()
    (tmp_path / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_api_key_configured()


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["fit", "--config", "/nonexistent.yaml"], "File does not exist"),
        (["fit", "--model.lr", "abc"], "model.lr"),
        (["fit", "--bogus", "1"], "unrecognized arguments"),
        (["nofit"], "invalid choice"),
    ],
)
def test_a_bad_flag_or_config_is_one_line_and_exit_2(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """jsonargparse printed the whole usage (~190 lines) before its error line."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nmt-moe train: error: ") and reason in err, err


def test_a_schedule_that_ends_inside_its_warm_up_is_one_line_before_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cosine schedule needs max_steps past warm-up and hold: found before the data is prepared (it was
    a traceback from configure_optimizers, after the cache was built)."""
    data, root = write_copy_task(tmp_path / "data"), tmp_path / "run"
    args = ("--wandb", "off", "--model.schedule", "cosine", "--model.warmup_steps", "50",
            "--trainer.max_steps", "40")  # fmt: skip
    assert train("fit", data, root, *args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_steps > warmup_steps + hold_steps" in err and "max_steps=40" in err
    assert not (data / "cache").exists()  # nothing prepared


def test_a_schedule_that_ends_inside_its_warm_up_by_epochs_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trained by epochs, the run's length is Lightning's estimate, known only once the data is set up:
    the same one line, exit 2 (not a traceback from configure_optimizers)."""
    data, root = write_copy_task(tmp_path / "data"), tmp_path / "run"
    args = ("--wandb", "off", "--model.schedule", "cosine", "--model.warmup_steps", "100000",
            "--trainer.max_steps", "-1", "--trainer.max_epochs", "1")  # fmt: skip
    assert train("fit", data, root, *args) == 2
    err = capsys.readouterr().err  # the data set up first: `datasets`' progress bars come before the error
    last = err.strip().splitlines()[-1]
    assert last.startswith("nmt-moe train: error: ") and "max_steps > warmup_steps + hold_steps" in last, err
    assert "Traceback" not in err

"""What `nmt-moe train` shows while it runs (bar or log lines), the library noise it hides, and the W&B
export run that carries the exported model."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import warnings
from pathlib import Path

import pytest
import wandb
from helpers.training import train, write_copy_task

from nmt_moe.cli import main
from nmt_moe.training.progress import TrainingProgress, format_duration, quiet_library_noise
from nmt_moe.training.tracking import latest_training_run, log_model_artifact

STEP_LINE = re.compile(r"^step (\d+)/(\d+) \| loss \d+\.\d{3} \| tok/s [\d,]+ \|.* left (\d+)m(\d\d)s$")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_mode_draws_a_bar_in_a_terminal_and_lines_elsewhere() -> None:
    assert not TrainingProgress(stream=_Terminal()).lines
    assert TrainingProgress(stream=io.StringIO()).lines
    assert TrainingProgress(mode="lines", stream=_Terminal()).lines
    assert not TrainingProgress(mode="bar", stream=io.StringIO()).lines
    with pytest.raises(ValueError, match="log_every_n_steps"):
        TrainingProgress(log_every_n_steps=0)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0, 59.6, 61, 3600 + 120 + 5)] == ["0m00s", "1m00s", "1m01s", "1h02m"]


def test_without_a_terminal_the_run_logs_step_loss_throughput_bleu_and_time_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["nmt-moe"])
    data, root = write_copy_task(tmp_path / "data"), tmp_path / "run"
    capsys.readouterr()
    args = ("--wandb", "off", "--trainer.max_steps", "30", "--trainer.val_check_interval", "15")
    args += ("--trainer.max_time", "00:00:30:00", "--progress.log_every_n_steps", "10")
    args += ("--model.val_max_sentences", "10", "--trainer.limit_val_batches", "2")
    assert train("fit", data, root, *args) == 0
    err = capsys.readouterr().err.splitlines()
    steps = [STEP_LINE.match(line) for line in err if line.startswith("step ")]
    assert [int(m[1]) for m in steps if m] == [10, 20, 30], err
    assert all(int(m[2]) == 30 for m in steps)
    assert all(int(m[3]) < 30 for m in steps)  # never more than the time budget left
    validations = [line for line in err if line.startswith("validation: step ")]
    assert len(validations) == 2 and all(re.search(r"\| val BLEU \d+\.\d\d \|", v) for v in validations)
    assert any(line.startswith("done: step 30/30") for line in err)
    assert not any("\r" in line for line in err)  # no bar redrawn into the log


def test_library_noise_is_hidden_and_other_warnings_are_not(caplog: pytest.LogCaptureFixture) -> None:
    with warnings.catch_warnings(record=True) as caught:
        quiet_library_noise()
        warnings.warn("Precision bf16-mixed is not supported by the model summary.  Estimated", stacklevel=1)
        warnings.warn("a warning the user can act on 5d1c", stacklevel=1)
    assert [str(w.message) for w in caught] == ["a warning the user can act on 5d1c"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("💡 Tip: install something")
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False"]


def test_the_exported_model_is_logged_as_an_artifact_of_an_export_run(tmp_path: Path) -> None:
    train_dir, bundle = tmp_path / "train", tmp_path / "export"
    (train_dir / "wandb" / "offline-run-20261205_000000-trainid1").mkdir(parents=True)
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"vocab_size": 8}))
    (bundle / "model.safetensors").write_bytes(b"weights")
    assert latest_training_run(train_dir)[0] == "trainid1"

    location = log_model_artifact(bundle, train_dir, mode="offline")
    wandb.teardown()  # the service closes the run file after finish(); wait for it
    run_dir = Path(location)
    assert run_dir.parent == train_dir / "export" / "wandb" and run_dir.name.startswith("offline-run-")
    records = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert b"model-trainid1" in records and b"trainid1" in records
    assert log_model_artifact(bundle, train_dir, mode="off") is None


def test_log_model_refuses_a_directory_that_is_not_a_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["log-model", "--bundle", str(tmp_path), "--train_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not an exported bundle" in err

"""Interrupted training loses nothing: `nmt-moe train` killed at a step and resumed with `--ckpt_path last`
ends with the same weights, optimizer state and logged metrics as an uninterrupted run of the same length.

Runs go through the real CLI in subprocesses (signals need a process of their own) on the tiny_copy recipe,
CPU, fixed seed. SIGTERM is in the default suite; SIGINT and SIGKILL (resume from the last periodic
checkpoint) are slow-marked. In-process tests on a toy module check the handler itself.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.training import RECIPE, Regression

from nmt_moe.training.faults import GracefulInterrupt, SafeCheckpointIO, TrainingInterrupted, exit_code

MAX_STEPS, EVERY = 15, 3  # last.ckpt every 3 steps (and at the end); validation at step 10


def start(data: Path, root: Path, *extra: str) -> subprocess.Popen:
    argv = [
        sys.executable, "-m", "nmt_moe.cli", "train", "fit", "--config", str(RECIPE),
        "--data.pipeline.train", str(data / "train"), "--data.pipeline.valid", str(data / "valid"),
        "--data.pipeline.test", str(data / "test"), "--data.cache_dir", str(data / "cache"),
        "--trainer.default_root_dir", str(root), "--wandb", "off", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.max_steps", str(MAX_STEPS),
        "--trainer.deterministic", "true", "--trainer.log_every_n_steps", "1",
        "--trainer.val_check_interval", "10", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--model.val_max_sentences", "8",
        "--last_checkpoint.every_n_train_steps", str(EVERY),
        # expert-load stats are summed over 4-step intervals: resuming a 3-step checkpoint is mid-interval
        "--expert_load.every_n_steps", "4", *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(path: Path, step: int, process: subprocess.Popen, timeout: float = 240) -> None:
    """Until `path` holds a checkpoint of at least `step` (written atomically: never read half-written)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        if path.exists() and torch.load(path, weights_only=True)["global_step"] >= step:
            return
        time.sleep(0.05)
    pytest.fail(f"no checkpoint of step {step} after {timeout} s")


def csv_rows(root: Path, version: int) -> list[dict[str, str]]:
    with open(root / "csv" / f"version_{version}" / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def by_step(rows: list[dict[str, str]], keys: tuple[str, ...]) -> dict[tuple[str, str], str]:
    """{(key, step): value} as logged (exact strings), for keys that do not depend on wall time."""
    return {(key, row["step"]): row[key] for row in rows for key in keys if key in row}


METRICS = (
    "train/loss",
    "train/ce",
    "train/acc",
    "train/lr",
    "val/loss",
    "val/bleu",
    "moe/encoder.moe0/load_cv",
)


def assert_same_run(reference: Path, resumed: Path) -> None:
    a = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == MAX_STEPS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    moments_a, moments_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert moments_a.keys() == moments_b.keys()
    for index, moments in moments_a.items():
        assert all(torch.equal(value, moments_b[index][name]) for name, value in moments.items())
    assert a["lr_schedulers"] == b["lr_schedulers"]
    # every metric the resumed process logged equals the reference's at the same step
    expected = by_step(csv_rows(reference, 0), METRICS)
    logged = by_step(csv_rows(resumed, 1), METRICS)
    assert logged and ("val/loss", "9") in logged  # the validation at step 10 ran after the resume
    assert {k: expected[k] for k in logged} == logged


def interrupt_and_resume(data: Path, tmp_path: Path, signum: int) -> None:
    reference = start(data, tmp_path / "reference")
    victim = start(data, tmp_path / "victim")
    last = tmp_path / "victim" / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(last, EVERY, victim)
    victim.send_signal(signum)
    _, err = victim.communicate(timeout=240)
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert EVERY <= saved_step < MAX_STEPS
    if signum == signal.SIGKILL:
        assert victim.returncode == -signal.SIGKILL
    else:  # a clean stop: message, checkpoint of the step reached, exit code 128 + signal
        assert victim.returncode == 128 + signum, err
        assert "Traceback" not in err
        assert f"saved {last} at step {saved_step}; resume with `--ckpt_path last`" in err
    resumed = start(data, tmp_path / "victim", "--ckpt_path", "last")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert reference.wait(timeout=240) == 0, reference.communicate()[1]
    assert_same_run(tmp_path / "reference", tmp_path / "victim")


def test_sigterm_saves_stops_and_resumes_exactly(copy_data: Path, tmp_path: Path) -> None:
    interrupt_and_resume(copy_data, tmp_path, signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_killed_run_resumes_exactly(signum: int, copy_data: Path, tmp_path: Path) -> None:
    interrupt_and_resume(copy_data, tmp_path, signum)


@pytest.mark.distributed
def test_sigterm_to_rank_0_stops_both_ddp_ranks_at_one_step(copy_data: Path, tmp_path: Path) -> None:
    """Only the launching process gets the signal; the ranks agree (all-reduce) and save one checkpoint."""
    ddp = ("--trainer.strategy", "ddp", "--trainer.devices", "2")
    run = start(copy_data, tmp_path, *ddp)
    last = tmp_path / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(last, EVERY, run)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=240)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    saved_step = torch.load(last, weights_only=True)["global_step"]
    assert f"saved {last} at step {saved_step}" in err and saved_step < MAX_STEPS
    resumed = start(copy_data, tmp_path, *ddp, "--ckpt_path", "last")
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    assert torch.load(last, weights_only=True)["global_step"] == MAX_STEPS


# --- in-process: the handler itself -------------------------------------------------------------------------


class SendSignal(pl.Callback):
    """Delivers `signum` to this process `times` times during training batch `at`."""

    def __init__(self, signum: int, at: int, times: int = 1) -> None:
        self.signum, self.at, self.times = signum, at, times

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: object, batch: object, batch_idx: int
    ) -> None:
        if batch_idx == self.at:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


def regression_trainer(tmp_path: Path, *callbacks: pl.Callback) -> pl.Trainer:
    return pl.Trainer(
        max_steps=8, callbacks=[GracefulInterrupt(dirpath=str(tmp_path)), *callbacks], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        plugins=[SafeCheckpointIO()],
    )  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_after_the_step_and_restores_handlers(signum: int, tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    trainer = regression_trainer(tmp_path, SendSignal(signum, at=3))
    with pytest.raises(TrainingInterrupted):  # leaves fit before the next batch
        trainer.fit(*regression_data())
    assert trainer.global_step == 4  # the step under way when the signal came was finished
    assert exit_code(trainer) == 128 + signum
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4
    assert {s: signal.getsignal(s) for s in before} == before


def test_second_sigint_stops_at_once_without_saving(tmp_path: Path) -> None:
    trainer = regression_trainer(tmp_path, SendSignal(signal.SIGINT, at=3, times=2))
    with pytest.raises(SystemExit):  # Lightning's KeyboardInterrupt shutdown
        trainer.fit(*regression_data())
    assert trainer.global_step == 3 and not (tmp_path / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_interrupt_checkpoint_goes_where_last_ckpt_is_kept(tmp_path: Path) -> None:
    """A recipe's first ModelCheckpoint may be its averaging one; the interrupt checkpoint must land beside
    the callback that keeps last.ckpt, where run.sh and users look for a run to resume."""
    average = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "average", every_n_train_steps=100)
    keeps_last = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = pl.Trainer(
        max_steps=8, callbacks=[average, keeps_last, GracefulInterrupt(), SendSignal(signal.SIGTERM, at=3)],
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=tmp_path, plugins=[SafeCheckpointIO()],
    )  # fmt: skip
    with pytest.raises(TrainingInterrupted):
        trainer.fit(*regression_data())
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (tmp_path / "average" / "last.ckpt").exists()


def regression_data() -> tuple[pl.LightningModule, torch.utils.data.DataLoader]:
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return Regression(set(), set()), torch.utils.data.DataLoader(data, batch_size=8)

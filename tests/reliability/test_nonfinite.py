"""Non-finite losses and gradients: the step is skipped (weights, optimizer moments and loss-free biases
untouched) and counted; too many in a row stop `nmt-moe train` with a message, exit code 3 and a
checkpoint holding the weights from before the fault."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers.training import Regression, train, write_copy_task

from nmt_moe.training.faults import EXIT_NONFINITE, NonFiniteGuard


def fit_regression(nan_loss_at: set[int], inf_grad_at: set[int], max_consecutive: int, steps: int = 8):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    data = torch.utils.data.TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))
    module, guard = Regression(nan_loss_at, inf_grad_at), NonFiniteGuard(max_consecutive=max_consecutive)
    trainer = pl.Trainer(
        max_steps=steps, callbacks=[guard], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir="/nonexistent",  # the guard must not save unless it stops the run
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    return module, guard, trainer


def test_isolated_faults_are_skipped_and_counted() -> None:
    module, guard, trainer = fit_regression(nan_loss_at={2}, inf_grad_at={5}, max_consecutive=2)
    assert guard.skipped == 2 and guard.consecutive == 0 and not guard.stopped
    assert trainer.global_step == 8 and not trainer.should_stop
    w = module.weights
    assert torch.equal(w[2], w[1]) and torch.equal(w[5], w[4])  # the faulty steps changed nothing
    assert not torch.equal(w[3], w[2]) and not torch.equal(w[6], w[5])  # training went on
    assert all(torch.isfinite(weight).all() for weight in w)
    # the optimizer counts only real steps: Adam's step counter skipped the two faults
    assert int(trainer.optimizers[0].state[module.layer.weight]["step"]) == 6


def test_guard_rejects_a_bad_limit() -> None:
    with pytest.raises(ValueError, match="max_consecutive must be >= 1, got 0"):
        NonFiniteGuard(max_consecutive=0)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["nmt-moe"])


def test_diverging_run_stops_with_the_weights_from_before_the_fault(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """lr=1e30: the first step blows the weights up, every later step is non-finite."""
    data, root = write_copy_task(tmp_path / "data"), tmp_path / "run"
    torch.set_num_threads(1)
    code = train(
        "fit", data, root, "--wandb", "off", "--model.lr", "1e30", "--model.warmup_steps", "1",
        "--model.model.moe.loss_free_bias", "true", "--nonfinite.max_consecutive", "3",
        "--trainer.max_steps", "20", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--model.val_max_sentences", "4",
        # a checkpoint after every step, to compare against
        "--checkpoint.monitor", "null", "--checkpoint.every_n_train_steps", "1",
        "--checkpoint.save_top_k", "-1", "--checkpoint.filename", "step{step}",
    )  # fmt: skip
    assert code == EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = root / "checkpoints" / "last.ckpt"
    assert f"stopping: 3 non-finite steps in a row (up to step 4). {last} holds the weights" in err
    ckpt = {
        name: torch.load(root / "checkpoints" / f"{name}.ckpt", weights_only=True)
        for name in ("step1", "step2", "step4", "last")
    }
    assert ckpt["last"]["global_step"] == 4
    before = ckpt["step1"]  # after the one good step
    for name in ("step2", "step4", "last"):
        for key, value in before["state_dict"].items():  # weights and loss-free biases untouched
            assert torch.equal(ckpt[name]["state_dict"][key], value), (name, key)
        moments = ckpt[name]["optimizer_states"][0]["state"]
        for index, state in before["optimizer_states"][0]["state"].items():
            assert all(torch.equal(moments[index][k], v) for k, v in state.items()), (name, index)
    assert all(torch.isfinite(v).all() for v in before["state_dict"].values() if v.is_floating_point())
    assert any(k.endswith("expert_bias") for k in before["state_dict"])
    assert ckpt["last"]["callbacks"]["NonFiniteGuard"] == {"skipped": 3, "consecutive": 3, "stopped": True}
    with open(root / "csv" / "version_0" / "metrics.csv") as f:
        skipped = [float(r["train/skipped_steps"]) for r in csv.DictReader(f) if r.get("train/skipped_steps")]
    assert skipped == [0.0, 1.0, 2.0, 3.0]

"""Reliability on several ranks (CPU, gloo, 2 processes; `-m distributed`).

- Loss-free balancing under plain data parallelism: every rank ends with the bias one process computes
  from the union of the ranks' batches (each rank used to update from its own counts, and DDP's buffer
  broadcast then gave every rank rank 0's bias).
- A rank killed (SIGKILL) in the middle of a step, between its forward and its backward: the other rank
  exits non-zero within 60 s instead of waiting in the gradient all-reduce, and `--ckpt_path last` then
  resumes to the weights of an uninterrupted run (`nmt-moe train` with strategy ddp, in subprocesses).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.distributed import free_ports, spawn
from helpers.training import RECIPE

from nmt_moe.moe import MoELayer
from nmt_moe.training.module import update_balancing_biases

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
WORLD, TOKENS, D_MODEL = 2, 40, 8


# --- loss-free bias ----------------------------------------------------------------------------------------


def balanced_layers() -> list[MoELayer]:
    """Two MoE layers with loss-free biases, one with a skewed router so the two ranks' loads differ."""
    torch.manual_seed(0)
    options = {"loss_free_bias": True, "bias_update_rate": 0.1}
    layers = [
        MoELayer(D_MODEL, 16, num_experts=4, k=2, gate="softmax_topk", **options),
        MoELayer(D_MODEL, 16, num_experts=6, k=1, gate="switch", **options),
    ]
    return [layer.train() for layer in layers]


def batches() -> torch.Tensor:
    """[W, N, d]: rank r's batch is batches()[r]; rank 1's tokens are shifted to load other experts."""
    torch.manual_seed(1)
    x = torch.randn(WORLD, TOKENS, D_MODEL)
    x[1] += 2.0
    return x


def _bias_worker(rank: int, world: int, out_dir: Path) -> None:
    layers = balanced_layers()
    for step in range(3):
        for layer in layers:
            layer(batches()[rank] * (step + 1))
        update_balancing_biases(layers, across_ranks=True)
    torch.save([layer.expert_bias for layer in layers], out_dir / f"bias{rank}.pt")


def one_process_biases(across: str) -> list[torch.Tensor]:
    """The biases after 3 steps in one process: on the union of the batches, or on rank 0's alone."""
    layers = balanced_layers()
    for step in range(3):
        for layer in layers:
            for rank in range(WORLD) if across == "union" else [0]:
                layer(batches()[rank] * (step + 1))
        update_balancing_biases(layers, across_ranks=False)
    return [layer.expert_bias for layer in layers]


def test_loss_free_bias_moves_with_the_load_of_all_ranks(tmp_path: Path) -> None:
    spawn(_bias_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"bias{r}.pt") for r in range(WORLD)]
    union, rank0_only = one_process_biases("union"), one_process_biases("rank0")
    for layer, expected in enumerate(union):
        assert bool(expected.ne(0).any())
        for rank in range(WORLD):
            assert torch.equal(ranks[rank][layer], expected), (rank, layer)
    # the old behaviour (rank 0's own counts, broadcast) gives another bias: the check above can fail
    assert any(not torch.equal(a, b) for a, b in zip(union, rank0_only, strict=True))


# --- a rank killed mid-step --------------------------------------------------------------------------------

DDP_STEPS, SAVE_EVERY, KILL_AT = 12, 3, 7  # the kill interrupts step 8: resume from step 6's last.ckpt
EXIT_WITHIN = 60.0  # seconds


def ddp_train(data: Path, root: Path, *extra: str, port: int, fault: dict | None = None) -> subprocess.Popen:
    """`nmt-moe train fit` on the tiny_copy recipe, 2 gloo ranks meeting at `port` (runs started together
    need distinct ports: `free_ports`); `fault`: a SignalAt's init_args."""
    root.mkdir(parents=True, exist_ok=True)
    configs = ["--config", str(RECIPE)]
    if fault is not None:
        callback = {"class_path": "helpers.fault_injection.SignalAt", "init_args": fault}
        (root / "fault.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
        configs += ["--config", str(root / "fault.yaml")]
    argv = [
        sys.executable, "-m", "nmt_moe.cli", "train", "fit", *configs,
        "--data.pipeline.train", str(data / "train"), "--data.pipeline.valid", str(data / "valid"),
        "--data.pipeline.test", str(data / "test"), "--data.cache_dir", str(data / "cache"),
        "--trainer.default_root_dir", str(root), "--wandb", "off", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.max_steps", str(DDP_STEPS), "--trainer.limit_val_batches", "0",
        "--trainer.num_sanity_val_steps", "0", "--last_checkpoint.every_n_train_steps", str(SAVE_EVERY),
        "--trainer.deterministic", "true", *extra,
    ]  # fmt: skip
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it no longer runs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return False


def test_killed_rank_stops_the_others_and_the_run_resumes_exactly(
    copy_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    ports = free_ports(4)  # three runs at once, then the resumed one
    reference = ddp_train(copy_data, tmp_path / "reference", port=ports[0])
    victims = {}
    for rank in (1, 0):  # rank 0 is the process we started; rank 1 its child
        stamp = tmp_path / f"kill{rank}"
        fault = {"when": "backward", "step": KILL_AT, "signal": "SIGKILL", "rank": rank, "stamp": str(stamp)}
        run = ddp_train(copy_data, tmp_path / f"victim{rank}", port=ports[1 + rank], fault=fault)
        victims[rank] = (run, stamp)

    # rank 1 killed: rank 0 (our process) must fail, not hang in the all-reduce
    launcher, stamp = victims[1]
    _, err = launcher.communicate(timeout=600)
    exited = time.time()
    assert launcher.returncode not in (0, None), err[-2000:]
    assert exited - float(Path(f"{stamp}.rank1").read_text()) < EXIT_WITHIN

    # rank 0 killed: its child, rank 1, must not outlive it by more than a minute
    launcher, stamp = victims[0]
    launcher.communicate(timeout=600)
    assert launcher.returncode == -9
    assert wait_gone(int(Path(f"{stamp}.pid1").read_text()), EXIT_WITHIN)

    last = tmp_path / "victim1" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == KILL_AT - KILL_AT % SAVE_EVERY
    resumed = ddp_train(copy_data, tmp_path / "victim1", "--ckpt_path", "last", port=ports[3])
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-2000:]
    a = torch.load(tmp_path / "reference" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == DDP_STEPS
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for index, moments in a["optimizer_states"][0]["state"].items():
        assert all(torch.equal(v, b["optimizer_states"][0]["state"][index][k]) for k, v in moments.items())

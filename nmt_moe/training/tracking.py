"""Weights & Biases around a training run: where the run went, and the exported model as an artifact.

Training logs through Lightning's `WandbLogger` (metrics, expert-load heat-maps, sample tables, the resolved
config). Offline runs (the default without an API key) stay on disk until `wandb sync` uploads them, so
the user is told where they are and the command to run. The exported bundle is made after training, in
another process, so it is logged by a small "export" run in the training run's group, which records the
training run's id: W&B shows the model beside the run that produced it
(`nmt-moe log-model --bundle OUT/export --train_dir OUT/train`).
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path
from typing import Any

WANDB_MODES = ("auto", "online", "offline", "off")


def wandb_api_key_configured() -> bool:
    """True when W&B could log online: `WANDB_API_KEY` is set or ~/.netrc has an api.wandb.ai entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def run_location(run: Any) -> str:
    """The run's URL when it syncs online, else its local directory."""
    if getattr(run, "offline", False) or not getattr(run, "url", None):
        return str(run.settings.sync_dir)
    return str(run.url)


def announce_runs(run: Any) -> None:
    """One line on stderr saying where the run is and, offline, how to upload it (a no-op off rank 0,
    where Lightning hands out a dummy experiment without settings)."""
    if not hasattr(run, "settings"):
        return
    location = run_location(run)
    if location.startswith("http"):
        print(f"W&B run: {location}", file=sys.stderr, flush=True)
    else:
        print(f"W&B run saved offline in {location}; upload it with: wandb sync {location}", file=sys.stderr)


def latest_training_run(train_dir: Path) -> tuple[str, Path] | None:
    """(run id, run directory) of the newest W&B run under `train_dir/wandb`, online or offline."""
    runs = sorted((train_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    runs = [r for r in runs if r.is_dir() and not r.is_symlink()]
    if not runs:
        return None
    newest = runs[-1]
    return newest.name.rsplit("-", 1)[-1], newest


def resolve_mode(mode: str) -> str | None:
    """W&B's init mode for our `--wandb` choice; None for off."""
    if mode == "off":
        return None
    if mode == "auto":
        return "online" if wandb_api_key_configured() else "offline"
    return mode


def log_model_artifact(
    bundle: Path, train_dir: Path, mode: str = "auto", project: str = "nmt-moe"
) -> str | None:
    """Logs the bundle directory as a "model" artifact from an export run grouped with the newest training
    run under `train_dir`. Returns where the export run went (None when W&B is off)."""
    import wandb

    (train_dir / "export").mkdir(parents=True, exist_ok=True)
    wandb_mode = resolve_mode(mode)
    if wandb_mode is None:
        return None
    found = latest_training_run(train_dir)
    train_id = found[0] if found else None
    run = wandb.init(
        project=project,
        dir=str(train_dir / "export"),  # apart from the training runs latest_training_run looks at
        mode=wandb_mode,
        job_type="export",
        group=train_id,
        config={"train_run_id": train_id, "bundle": str(bundle)},
    )
    try:
        name = f"model-{train_id or run.id}"
        artifact = wandb.Artifact(name, type="model", metadata={"train_run_id": train_id})
        artifact.add_dir(str(bundle))
        run.log_artifact(artifact)
        location = run_location(run)
    finally:
        run.finish()
    return location

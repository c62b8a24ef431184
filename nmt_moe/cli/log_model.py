"""`nmt-moe log-model`: log an exported model as a W&B artifact beside the run that trained it
(the work is `nmt_moe.training.tracking.log_model_artifact`; the recipes call it after `export`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from nmt_moe.cli.errors import run_command
from nmt_moe.cli.parsing import Command, parse


def log_model(
    bundle: Path,
    train_dir: Path,
    wandb: Literal["auto", "online", "offline", "off"] = "auto",
    project: str = "nmt-moe",
) -> int:
    """Log an exported bundle as a W&B "model" artifact, from an export run grouped with the training run.

    Args:
        bundle: what `nmt-moe export` wrote
        train_dir: the training run's default_root_dir (its newest W&B run is the one the model came from)
        wandb: auto (online when an API key is configured, else offline), online, offline or off
        project: W&B project
    """
    if not (bundle / "config.json").is_file():
        raise ValueError(f"{bundle} is not an exported bundle (no config.json)")
    os.environ.setdefault("WANDB_SILENT", "true")
    from nmt_moe.training.tracking import log_model_artifact

    location = log_model_artifact(bundle, train_dir, wandb, project)
    if location is not None:
        how = f"; upload it with: wandb sync {location}" if not location.startswith("http") else ""
        print(f"W&B model artifact logged by the export run {location}{how}", file=sys.stderr)
    return 0


COMMAND = Command(prog="nmt-moe log-model", function=log_model)


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: log_model(**parse(COMMAND, argv)))

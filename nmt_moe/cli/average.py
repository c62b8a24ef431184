"""`nmt-moe average`: the element-wise mean of several checkpoints of one run
(the work is `nmt_moe.averaging`)."""

from __future__ import annotations

import sys
from pathlib import Path

from nmt_moe.cli.errors import UsageError, run_command
from nmt_moe.cli.parsing import Command, parse


def average(output: Path, checkpoints: list[Path] | None = None, last: int | None = None) -> int:
    """Average the weights of several checkpoints of one training run into a new checkpoint.

    For translating or exporting: optimizer state is dropped.

    Args:
        output: checkpoint file to write
        checkpoints: checkpoints to average (.ckpt files, or sharded directories of an expert-parallel run);
            with --last, the one directory to take them from
        last: average the N latest checkpoints of the directory given (`--last N DIR`)
    """
    if not checkpoints or (last is not None and len(checkpoints) != 1):
        raise UsageError("give either checkpoint paths or --last N DIR")
    import torch

    from nmt_moe.averaging import average_checkpoints, last_checkpoints
    from nmt_moe.checkpoint import atomic_write
    from nmt_moe.model_files import check_output_path

    check_output_path(output)  # before reading the checkpoints, not after averaging them
    if last is not None:
        if last < 1:
            raise ValueError(f"--last N must be a positive integer, got {last}")
        checkpoints = last_checkpoints(checkpoints[0], last)
    averaged = average_checkpoints(checkpoints)
    with atomic_write(output) as handle:
        torch.save(averaged, handle)
    print(f"averaged {len(checkpoints)} checkpoints -> {output}", file=sys.stderr)
    return 0


COMMAND = Command(prog="nmt-moe average", function=average, aliases={"-o": "--output"},
                  positional="checkpoints")  # fmt: skip


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: average(**parse(COMMAND, argv)))

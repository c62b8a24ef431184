"""`nmt-moe export`: a self-contained model directory from a training checkpoint
(the work is `nmt_moe.checkpoint.export_bundle`)."""

from __future__ import annotations

import sys
from pathlib import Path

from nmt_moe.cli.errors import run_command
from nmt_moe.cli.parsing import Command, parse


def export(checkpoint: Path, output: Path) -> int:
    """Write a self-contained model directory from a training checkpoint.

    weights.pt, config.json and sentencepiece.model: all `nmt-moe translate -m DIR` needs.

    Args:
        checkpoint: training checkpoint (.ckpt), sharded checkpoint directory or another export directory
        output: directory to write
    """
    from nmt_moe.checkpoint import export_bundle

    export_bundle(checkpoint, output)
    print(f"exported {checkpoint} -> {output}", file=sys.stderr)
    return 0


COMMAND = Command(prog="nmt-moe export", function=export, aliases={"-o": "--output"}, positional="checkpoint")


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: export(**parse(COMMAND, argv)))

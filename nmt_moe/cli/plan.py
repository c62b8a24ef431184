"""`nmt-moe plan`: size a training config without allocating it (the work is `nmt_moe.plan`).

nmt-moe plan recipes/wmt14_en_de/config.yaml --gpus 8 --expert-parallel-size 8
"""

from __future__ import annotations

import json as jsonlib
from pathlib import Path

from nmt_moe.cli.errors import run_command
from nmt_moe.cli.parsing import Command, parse


def plan(
    recipe: Path,
    gpus: int = 1,
    expert_parallel_size: int = 1,
    tokens_per_batch: int | None = None,
    src_len: float = 30.0,
    gpu_memory_gib: float = 80.0,
    json: bool = False,
) -> int:
    """Size a training config without allocating it.

    Parameters (total and active), FLOPs per target token, and memory per device, phase by phase.

    Args:
        recipe: training config YAML (as for `nmt-moe train fit --config`)
        gpus: devices in the job
        expert_parallel_size: devices sharing one copy of the experts
        tokens_per_batch: tokens per device and step (default: the config's data.max_tokens)
        src_len: mean source length in tokens
        gpu_memory_gib: memory of one GPU to check the peak against
        json: print one JSON object instead of text
    """
    from nmt_moe.plan import format_plan
    from nmt_moe.plan import plan as size

    report = size(
        recipe, gpus=gpus, expert_parallel_size=expert_parallel_size, tokens_per_batch=tokens_per_batch,
        src_len=src_len, gpu_memory_gib=gpu_memory_gib,
    )  # fmt: skip
    print(jsonlib.dumps(report, indent=2) if json else format_plan(report))
    return 0


COMMAND = Command(prog="nmt-moe plan", function=plan, positional="recipe")


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: plan(**parse(COMMAND, argv)))

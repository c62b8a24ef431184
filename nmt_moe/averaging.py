"""Checkpoint averaging: the element-wise mean of the last checkpoints of a run (`nmt-moe average`,
nmt_moe/cli/average.py).

Averaging the weights of the final few checkpoints smooths out the noise of the last updates; the recipes
average the newest 3 of their periodic `step=N` checkpoints before exporting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from nmt_moe.checkpoint import ModelLoadError, load_weights_only, nmt_moe_section
from nmt_moe.sharded_checkpoint import (
    STATE_PREFIX,
    ShardedCheckpointError,
    is_sharded_checkpoint,
    read_meta,
    read_tensor,
    tensor_index,
)


def average_checkpoints(paths: Sequence[str | Path]) -> dict[str, Any]:
    """Element-wise mean of the floating-point weights of training checkpoints of one model.

    Integer buffers are taken from the last checkpoint. The result keeps the last checkpoint's `nmt_moe`
    section, hyper-parameters and step counters, but no optimizer state: it is for translating and
    exporting, not for resuming training.
    """
    if not paths:
        raise ModelLoadError("no checkpoints to average")
    sharded = [is_sharded_checkpoint(path) for path in paths]
    if any(sharded):
        if not all(sharded):
            raise ModelLoadError("cannot average sharded checkpoint directories with .ckpt files; average "
                                 "checkpoints of one run")  # fmt: skip
        return average_sharded(paths)
    total: dict[str, Tensor] = {}
    last: dict[str, Any] = {}
    reference_config = None
    for path in map(Path, paths):
        checkpoint = load_weights_only(path)
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ModelLoadError(f"{path}: not a training checkpoint (no state_dict)")
        config = nmt_moe_section(checkpoint.get("nmt_moe"), path)["model_config"]
        if reference_config is None:
            reference_config = config
        elif config != reference_config:
            raise ModelLoadError(
                f"{path}: model config differs from {paths[0]}; average one model's checkpoints"
            )
        state = checkpoint["state_dict"]
        if total and state.keys() != total.keys():
            raise ModelLoadError(f"{path}: parameter names differ from {paths[0]}")
        for key, value in state.items():
            if key in total and total[key].shape != value.shape:
                raise ModelLoadError(
                    f"{path}: {key} has shape {tuple(value.shape)}, not {tuple(total[key].shape)}"
                )
            if value.is_floating_point():
                total[key] = total[key] + value.double() if key in total else value.double()
            else:
                total[key] = value
        last = checkpoint
    averaged = {
        key: (value / len(paths)).to(last["state_dict"][key].dtype) if value.is_floating_point() else value
        for key, value in total.items()
    }
    kept = ("nmt_moe", "hyper_parameters", "epoch", "global_step", "pytorch-lightning_version")
    result = {key: last[key] for key in kept if key in last}
    result["state_dict"] = averaged
    result["averaged_from"] = [str(p) for p in paths]
    return result


def average_sharded(paths: Sequence[str | Path]) -> dict[str, Any]:
    """`average_checkpoints` for sharded checkpoint directories (written under expert parallelism), one
    tensor at a time: each weight is read in full from every checkpoint in turn and averaged in fp64, so
    peak memory is the averaged weights plus about three copies of the largest tensor."""
    paths = [Path(p) for p in paths]
    try:
        metas = [read_meta(path) for path in paths]
        indexes = [
            {key: item for key, item in tensor_index(path).items() if key.startswith(STATE_PREFIX)}
            for path in paths
        ]
        for path, meta, index in zip(paths, metas, indexes, strict=True):
            config = nmt_moe_section(meta.get("nmt_moe"), path)["model_config"]
            if config != nmt_moe_section(metas[0].get("nmt_moe"), paths[0])["model_config"]:
                raise ModelLoadError(
                    f"{path}: model config differs from {paths[0]}; average one model's checkpoints"
                )
            shapes = {key: (tuple(item.size), item.properties.dtype) for key, item in index.items()}
            if shapes != {key: (tuple(item.size), item.properties.dtype) for key, item in indexes[0].items()}:
                raise ModelLoadError(f"{path}: parameter names or shapes differ from {paths[0]}")
        averaged = {}
        for key, item in indexes[-1].items():
            total = None
            for path in paths:
                value = read_tensor(path, key, item)
                if not value.is_floating_point():
                    total = value  # integer buffers: the last checkpoint's
                elif total is None:
                    total = value.double()
                else:
                    total += value
            averaged[key[len(STATE_PREFIX) :]] = (
                (total / len(paths)).to(item.properties.dtype) if total.is_floating_point() else total
            )
    except ShardedCheckpointError as error:
        raise ModelLoadError(str(error)) from error
    kept = ("nmt_moe", "hyper_parameters", "epoch", "global_step", "pytorch-lightning_version")
    result = {key: metas[-1][key] for key in kept if key in metas[-1]}
    result["state_dict"] = averaged
    result["averaged_from"] = [str(p) for p in paths]
    return result


def last_checkpoints(directory: str | Path, n: int) -> list[Path]:
    """The `n` latest checkpoints in `directory`, oldest first.

    Order is the `step=N` in Lightning's file names (file modification time where a name has none);
    `last*.ckpt` copies are skipped since they duplicate the newest checkpoint.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: not a directory")
    found = [p for p in directory.glob("*.ckpt") if not p.name.startswith("last")]

    def order(path: Path) -> tuple[float, float]:
        step = re.search(r"step=(\d+)", path.name)
        return (float(step[1]) if step else -1.0, path.stat().st_mtime)

    found.sort(key=order)
    if len(found) < n:
        raise ModelLoadError(
            f"{directory}: has {len(found)} checkpoints (last*.ckpt excluded), fewer than {n}"
        )
    return found[-n:]

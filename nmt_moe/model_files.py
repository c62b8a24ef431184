"""Checks on model files and output paths, made before anything is built, allocated, imported or written.

A checkpoint or export bundle may come from anywhere. Its config can disagree with its weights (a model
built from it fails deep inside `load_state_dict`), ask for a model too large to allocate (a 400M-piece
vocabulary is hundreds of GB), or, in a training checkpoint's hyper-parameters, name any importable class
for LightningCLI to import and build on `--ckpt_path`. An output path can be missing or unwritable, which
would only show after the work is done. Each check raises `ModelLoadError` with one line naming the file
and the fault; the CLIs print it and exit with code 2.

The weights are the ground truth: the config is compared with them on the meta device (shapes only, no
memory), so nothing is allocated that the weight file does not already hold.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nmt_moe.models import Seq2Seq, Seq2SeqConfig

MODEL_PREFIX = "model."  # the Seq2Seq's keys inside a Lightning checkpoint's state_dict
# What a training checkpoint's hyper-parameters may name: our own model, by either import path.
ALLOWED_CLASS_PATHS = frozenset({"nmt_moe.models.Seq2Seq", "nmt_moe.models.seq2seq.Seq2Seq"})
CLASS_PATH_KEYS = ("class_path", "_class_path")
# The function LightningModule.load_from_checkpoint imports and calls to build the module (LightningCLI's).
ALLOWED_INSTANTIATORS = frozenset(
    {"pytorch_lightning.cli.instantiate_module", "lightning.pytorch.cli.instantiate_module"}
)


class ModelLoadError(Exception):
    """A model, checkpoint or output path that cannot be used (missing, corrupt, unsafe or incompatible)."""


# --- config against weights --------------------------------------------------------------------------------


def expected_shapes(config: Mapping[str, Any], layer_bound: int, where: Path) -> dict[str, torch.Size]:
    """Parameter and buffer shapes of the Seq2Seq `config` describes, built on the meta device (no memory).

    `layer_bound` caps the LSTM layer counts first: each layer is a Python module even on the meta
    device, so a config asking for 10**9 layers would exhaust memory before any shape is compared.
    """
    for name in ("encoder_layers", "decoder_layers"):
        value = config.get(name)
        if isinstance(value, int) and value > layer_bound:
            raise ModelLoadError(
                f"{where}: model config asks for {name}={value}, but the weights hold only "
                f"{layer_bound} tensors; config and weights do not belong together"
            )
    try:
        with torch.device("meta"):
            model = Seq2Seq(Seq2SeqConfig.from_dict(config))
    except (TypeError, ValueError, OverflowError, RuntimeError) as error:
        raise ModelLoadError(
            f"{where}: model config does not fit this nmt-moe's Seq2Seq ({error})"
        ) from error
    return {key: value.shape for key, value in model.state_dict().items()}


def check_weights_fit(config: Any, state: Any, where: str | Path) -> None:
    """Refuse, before the model is built, weights that are not the ones `config` describes.

    Same tensor names and shapes, hence the same parameter count; the first differences are named.
    """
    where = Path(where)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{where}: model config is not a JSON object")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelLoadError(f"{where}: weights are not a state dict of tensors")
    shapes = expected_shapes(config, len(state), where)
    missing = sorted(shapes.keys() - state.keys())
    unexpected = sorted(state.keys() - shapes.keys())
    wrong = [key for key in shapes if key in state and state[key].shape != shapes[key]]
    if not (missing or unexpected or wrong):
        return
    implied = sum(math.prod(shape) for shape in shapes.values())
    held = sum(value.numel() for value in state.values())
    details = [f"{key}: config {tuple(shapes[key])}, weights {tuple(state[key].shape)}" for key in wrong[:2]]
    details += [f"missing {', '.join(missing[:2])}"] if missing else []
    details += [f"unexpected {', '.join(unexpected[:2])}"] if unexpected else []
    raise ModelLoadError(
        f"{where}: model config and weights do not match (config implies {implied:,} values, the weights "
        f"hold {held:,}; {'; '.join(details)}); config and weights come from different models"
    )


def model_state(checkpoint_state: Mapping[str, Any]) -> dict[str, Any]:
    """The Seq2Seq's entries of a Lightning checkpoint's state_dict, prefix removed."""
    n = len(MODEL_PREFIX)
    return {key[n:]: value for key, value in checkpoint_state.items() if key.startswith(MODEL_PREFIX)}


# --- training checkpoints given to LightningCLI -------------------------------------------------------------


def _class_paths(value: Any) -> Iterator[Any]:
    """Every value stored under a class-path key, at any depth of nested dicts and lists."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in CLASS_PATH_KEYS:
                yield item
            yield from _class_paths(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _class_paths(item)


def check_training_checkpoint(checkpoint: Any, where: str | Path) -> None:
    """What LightningCLI takes from `--ckpt_path` before any check of ours runs: its hyper-parameters are
    merged into the config and the model is built from them. Only our own model class may be named (any
    other class path would be imported, running its module's code), and the model they describe must be
    the one the checkpoint's weights hold (else it would be allocated first, at any size)."""
    where = Path(where)
    if not isinstance(checkpoint, dict):
        raise ModelLoadError(f"{where}: not a training checkpoint (no state_dict)")
    hparams = checkpoint.get("hyper_parameters") or {}
    for class_path in _class_paths(hparams):
        if class_path not in ALLOWED_CLASS_PATHS:
            raise ModelLoadError(
                f"{where}: its hyper-parameters name the class {class_path!r}; a checkpoint may only name "
                f"{' or '.join(sorted(ALLOWED_CLASS_PATHS))}, nothing else is imported from a checkpoint"
            )
    instantiator = hparams.get("_instantiator") if isinstance(hparams, Mapping) else None
    if instantiator is not None and instantiator not in ALLOWED_INSTANTIATORS:
        raise ModelLoadError(f"{where}: its hyper-parameters name the function {instantiator!r} to build the "
                             "model; only LightningCLI's instantiate_module is accepted")  # fmt: skip
    model = hparams.get("model") if isinstance(hparams, Mapping) else None
    if isinstance(model, Mapping):  # the model config; {class_path, init_args} in older checkpoints
        config = model.get("init_args", model)
        check_weights_fit(config, model_state(checkpoint.get("state_dict") or {}), where)


# --- output paths ------------------------------------------------------------------------------------------


def check_output_path(path: str | Path, what: str = "output file") -> None:
    """Refuse, before any work is done, an output path that cannot be written: a missing or unwritable
    directory, or a directory where a file is to go. Checked by creating (and removing) a file beside it,
    which is what the atomic writers do and holds whatever the process's privileges are."""
    path = Path(path)
    parent = path.parent
    if what.endswith("file") and path.is_dir():
        raise ModelLoadError(f"{path}: is a directory; give a file name for the {what}")
    if not parent.is_dir():
        reason = "is not a directory" if parent.exists() else "does not exist"
        raise ModelLoadError(f"{path}: cannot write the {what}: directory {parent} {reason}")
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=f".{path.name}."):
            pass
    except OSError as error:
        raise ModelLoadError(
            f"{path}: cannot write the {what} in {parent} ({error.strerror or type(error).__name__})"
        ) from error

"""The config layout before issue 17's typed configs, recognised so it fails in one line or is converted.

Before, a recipe gave the model as `model.model: {class_path: nmt_moe.models.Seq2Seq, init_args: {...}}`
with num_experts, k, gate and d_hidden beside the model's keys and every other MoE knob in an untyped
`moe_options` mapping, and the data settings flat under `data:`. Configs and flags in that layout are
refused with one line naming the new keys (jsonargparse would list every key it expected); training
checkpoints whose hyper-parameters hold it are read as the new layout.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from nmt_moe.data.cleaning import CleaningConfig
from nmt_moe.data.pipeline import PipelineConfig
from nmt_moe.models import Seq2SeqConfig

MOVED_TO_PIPELINE = [f.name for f in dataclasses.fields(PipelineConfig) if f.name != "cleaning"]
MOVED_TO_CLEANING = [f.name for f in dataclasses.fields(CleaningConfig)]
OLD_MODEL_LAYOUT = (
    "model.model.class_path/init_args and moe_options are the old layout: the Seq2Seq's settings now sit "
    "directly under model.model (e.g. model.model.hidden_size) and every MoE setting under model.model.moe "
    "(num_experts, k, gate, d_hidden and the former moe_options keys, e.g. "
    "model.model.moe.num_shared_experts)"
)


def old_layout_keys(config: dict[str, Any]) -> str | None:
    """What in a config's `model:` / `data:` sections is in the old layout, and where it lives now (one
    line); None when nothing is."""
    module, data = config.get("model"), config.get("data")
    model = module.get("model") if isinstance(module, dict) else None
    if isinstance(model, dict) and ({"class_path", "init_args", "moe_options"} & model.keys()):
        return OLD_MODEL_LAYOUT
    data = data if isinstance(data, dict) else {}
    moved = [key for key in data if key in MOVED_TO_PIPELINE + MOVED_TO_CLEANING]
    if not moved:
        return None
    new = [f"data.pipeline.{'cleaning.' if key in MOVED_TO_CLEANING else ''}{key}" for key in moved]
    return (
        f"data.{', data.'.join(moved)}: the settings that make the prepared data moved to "
        f"{', '.join(new)} (data.pipeline.*; cleaning filters under data.pipeline.cleaning.*)"
    )


def old_layout_in_argv(argv: list[str]) -> str | None:
    """One line naming the new keys for the first `--config` file or flag of `argv` in the old layout."""
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag == "--config":
            path = Path(value or (argv[i + 1] if i + 1 < len(argv) else ""))
            loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
            why = old_layout_keys(loaded) if isinstance(loaded, dict) else None
            if why:
                return f"{path}: {why}"
        elif flag.startswith(("--model.model.init_args", "--model.model.class_path")):
            return f"{flag}: {OLD_MODEL_LAYOUT}"
        elif flag.startswith("--data."):
            why = old_layout_keys({"data": {flag.removeprefix("--data.").split(".")[0]: None}})
            if why:
                return f"{flag}: {why}"
    return None


def model_hparams_in_new_layout(model: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `model` hyper-parameters as the nested Seq2SeqConfig dict LightningCLI parses: the
    old {class_path, init_args} form with flat MoE keys converted, the new one returned as it is."""
    if "init_args" not in model:
        return model
    return dataclasses.asdict(Seq2SeqConfig.from_dict(model["init_args"]))

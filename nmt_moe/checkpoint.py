"""Load, save and export models; every load is `torch.load(..., weights_only=True)`.

A model path is either
  * a Lightning training checkpoint: `state_dict` with keys `model.<...>` for the Seq2Seq, plus
    `checkpoint["nmt_moe"] = {"version": 1, "model_config": ..., "tokenizer": <SentencePiece bytes>}`; or
  * a sharded training checkpoint: a directory written under expert parallelism by
    torch.distributed.checkpoint (see sharded_checkpoint.py), read tensor by tensor into the model; or
  * an export bundle: a directory with `weights.pt` (the Seq2Seq state dict), `config.json`
    ({"version": 1, "model_config": ...}) and `sentencepiece.model`: all a translation needs.

Files are written atomically (temp file in the same directory, then `os.replace`), so an interrupted run
never leaves a truncated file that looks complete. Problems with a model path raise `ModelLoadError`, whose
one-line message says what is wrong and what to do; the CLIs print it and exit with code 2
(nmt_moe/cli/errors.py). `nmt-moe export` is nmt_moe/cli/export.py.

This module imports neither Lightning nor `datasets`: `nmt-moe translate` starts fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from nmt_moe.atomic_files import replace_path, umask_mode
from nmt_moe.data.tokenizer import Tokenizer
from nmt_moe.model_files import ModelLoadError, check_weights_fit
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.sharded_checkpoint import (
    STATE_PREFIX,
    ShardedCheckpointError,
    is_sharded_checkpoint,
    load_into,
    read_meta,
    tensor_index,
)

FORMAT_VERSION = 1
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "weights.pt", "config.json", "sentencepiece.model"
MODEL_PREFIX = "model."  # the Seq2Seq's keys inside a Lightning checkpoint's state_dict


# --- atomic files ------------------------------------------------------------------------------------------


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on success fsync and `os.replace` it onto `path`, on error delete it.

    Readers see either the old file or the complete new one, never a half-written one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, umask_mode())  # mkstemp's 0600 would outlive the rename
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        # a sharded checkpoint directory of the same name may be there (resumed without expert parallelism)
        replace_path(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- reading -----------------------------------------------------------------------------------------------


def load_weights_only(path: str | Path) -> Any:
    """torch.load with weights_only=True, turning its many failure modes into one clear ModelLoadError.

    Lightning's checkpoint plugin (`nmt_moe.training.faults.SafeCheckpointIO`) loads through this too, so
    no entry point ever unpickles arbitrary objects.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such file (pass a training checkpoint or an export directory)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused:  # weights_only refused to import a class or function: never unpickle such a file
            raise ModelLoadError(
                f"{path}: holds objects that cannot be loaded safely with weights_only=True ({refused[1]}); "
                "re-export it with `nmt-moe export` from a trusted environment"
            ) from error
        raise ModelLoadError(  # garbage bytes also end up in the (legacy) unpickler
            f"{path}: not a readable PyTorch file, probably truncated or corrupt (UnpicklingError); "
            "use another checkpoint or re-save it"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise ModelLoadError(
            f"{path}: not a readable PyTorch file, probably truncated or corrupt ({type(error).__name__}); "
            "use another checkpoint or re-save it"
        ) from error


def nmt_moe_section(section: Any, path: Path) -> dict[str, Any]:
    """Validate the {"version", "model_config", ...} dict shared by checkpoints and bundles."""
    if not isinstance(section, dict) or "model_config" not in section:
        raise ModelLoadError(
            f"{path}: has no nmt-moe model config; it was not written by `nmt-moe train` or `nmt-moe export`"
        )
    version = section.get("version")
    if version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{path}: format version {version!r}, this nmt-moe reads version {FORMAT_VERSION}; "
            "use the nmt-moe release that wrote it"
        )
    if not isinstance(section["model_config"], dict):
        raise ModelLoadError(f"{path}: model_config is not a dict")
    return section


def read_model_files(path: str | Path) -> tuple[dict[str, Any], dict[str, Tensor], bytes]:
    """(model config, Seq2Seq state dict, SentencePiece model bytes) from a checkpoint or a bundle."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        model, tokenizer_bytes = load_sharded_model(path)
        return model.config, model.state_dict(), tokenizer_bytes
    if path.is_dir():
        missing = [
            name for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (path / name).is_file()
        ]
        if missing:
            raise ModelLoadError(
                f"{path}: export directory lacks {', '.join(missing)}; re-create it with `nmt-moe export`"
            )
        try:
            section = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelLoadError(f"{path / CONFIG_FILE}: not valid JSON ({error})") from error
        section = nmt_moe_section(section, path / CONFIG_FILE)
        state = load_weights_only(path / WEIGHTS_FILE)
        if not isinstance(state, dict):
            raise ModelLoadError(f"{path / WEIGHTS_FILE}: not a state dict")
        return section["model_config"], state, (path / TOKENIZER_FILE).read_bytes()

    checkpoint = load_weights_only(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ModelLoadError(f"{path}: not a training checkpoint (no state_dict)")
    section = nmt_moe_section(checkpoint.get("nmt_moe"), path)
    if not isinstance(section.get("tokenizer"), bytes):
        raise ModelLoadError(f"{path}: checkpoint carries no SentencePiece model (nmt_moe.tokenizer)")
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(MODEL_PREFIX)
    }
    if not state:
        raise ModelLoadError(f"{path}: state_dict has no `{MODEL_PREFIX}*` weights")
    return section["model_config"], state, section["tokenizer"]


def load_sharded_model(path: Path) -> tuple[Seq2Seq, bytes]:
    """The Seq2Seq of a sharded checkpoint directory (written under expert parallelism) and its SentencePiece
    bytes. DCP reads every chunk straight into the model's parameters (full expert banks consolidated there):
    peak memory is the model plus one chunk."""
    try:
        section = nmt_moe_section(read_meta(path).get("nmt_moe"), path)
        if not isinstance(section.get("tokenizer"), bytes):
            raise ModelLoadError(f"{path}: checkpoint carries no SentencePiece model (nmt_moe.tokenizer)")
        prefix = STATE_PREFIX + MODEL_PREFIX
        saved = {  # shapes only, on the meta device: checked before the model is allocated
            key[len(prefix) :]: torch.empty(tuple(item.size), device="meta")
            for key, item in tensor_index(path).items()
            if key.startswith(prefix)
        }
        check_weights_fit(section["model_config"], saved, path)
        model = _seq2seq(section["model_config"], path)
        targets = {prefix + key: value for key, value in model.state_dict().items()}  # views of the weights
        load_into(path, targets, distributed=False)
    except (ShardedCheckpointError, pickle.UnpicklingError, RuntimeError, OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: unreadable sharded checkpoint ({type(error).__name__}: "
                             f"{str(error).splitlines()[0] if str(error) else ''})") from error  # fmt: skip
    return model.eval(), section["tokenizer"]


def _seq2seq(config: dict[str, Any], where: Path) -> Seq2Seq:
    try:
        return Seq2Seq(Seq2SeqConfig.from_dict(config))
    except (TypeError, ValueError) as error:
        raise ModelLoadError(
            f"{where}: model config does not fit this nmt-moe's Seq2Seq ({error})"
        ) from error


def build_model(config: dict[str, Any], state: dict[str, Tensor], tokenizer_bytes: bytes, where: Path):
    """Seq2Seq (eval mode) and Tokenizer from their parts, checking that the parts agree."""
    check_weights_fit(config, state, where)  # on the meta device, before anything is allocated
    model = _seq2seq(config, where)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ModelLoadError(
            f"{where}: weights do not match the model config (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); the checkpoint is incomplete or from another model"
        )
    return model.eval(), _tokenizer(tokenizer_bytes, config, where)


def _tokenizer(tokenizer_bytes: bytes, config: dict[str, Any], where: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_bytes(tokenizer_bytes)
    except (RuntimeError, ValueError) as error:
        raise ModelLoadError(f"{where}: unusable SentencePiece model ({error})") from error
    if tokenizer.vocab_size != config.get("vocab_size"):
        raise ModelLoadError(
            f"{where}: SentencePiece vocabulary has {tokenizer.vocab_size} pieces but the model "
            f"{config.get('vocab_size')}; tokenizer and weights come from different runs"
        )
    return tokenizer


def check_resumable(
    checkpoint: dict[str, Any], model: Seq2Seq, tokenizer: Tokenizer | None, where: str | Path
) -> None:
    """Refuse, in one line, a training checkpoint that does not fit the model and tokenizer being trained.

    Without this, resuming with another config dies deep inside `load_state_dict` (size-mismatch traceback),
    and resuming with another SentencePiece model of the same size silently trains on ids that now mean
    other pieces.
    """
    where = Path(where)
    section = nmt_moe_section(checkpoint.get("nmt_moe"), where)
    saved, now = _flat_config(section["model_config"]), _flat_config(model.config)
    state = {
        key[len(MODEL_PREFIX) :]: value
        for key, value in checkpoint.get("state_dict", {}).items()
        if key.startswith(MODEL_PREFIX)
    }
    with torch.device("meta"):  # full (unsharded) shapes, whatever expert parallelism did to `model`
        own = Seq2Seq(Seq2SeqConfig.from_dict(model.config)).state_dict()
    if state.keys() != own.keys() or any(state[key].shape != own[key].shape for key in own):
        changed = [f"{key}={saved.get(key)!r} there, {now.get(key)!r} here" for key in sorted(saved.keys() |
                   now.keys()) if saved.get(key) != now.get(key)]  # fmt: skip
        reason = "; ".join(changed[:4]) or "different parameters"
        raise ModelLoadError(
            f"{where}: its weights do not fit this model ({reason}); "
            "resume with the model settings the checkpoint was trained with"
        )
    saved_tokenizer = section.get("tokenizer")
    if tokenizer is not None and isinstance(saved_tokenizer, bytes):
        saved_pieces = Tokenizer.from_bytes(saved_tokenizer).sp
        if saved_pieces.get_piece_size() != tokenizer.vocab_size or any(
            saved_pieces.id_to_piece(i) != tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)
        ):
            raise ModelLoadError(
                f"{where}: was trained with another SentencePiece vocabulary than the data module's; point "
                "data.cache_dir at the prepared data of the run that wrote the checkpoint"
            )


def _flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """A model config as {"hidden_size": ..., "moe.k": ...}, old flat layouts read as the new one, so two
    configs' differences can be named key by key."""
    try:
        config = dataclasses.asdict(Seq2SeqConfig.from_dict(config))
    except (TypeError, ValueError):
        pass  # named as it is
    moe = config.get("moe")
    nested = {f"moe.{key}": value for key, value in moe.items()} if isinstance(moe, dict) else {}
    return {**{key: value for key, value in config.items() if key != "moe"}, **nested}


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Seq2Seq, Tokenizer]:
    """The Seq2Seq (eval mode, on `device`) and its Tokenizer from a checkpoint or an export directory."""
    if is_sharded_checkpoint(path):  # loaded in place: no second copy of the weights
        model, tokenizer_bytes = load_sharded_model(Path(path))
        return model.to(device), _tokenizer(tokenizer_bytes, model.config, Path(path))
    config, state, tokenizer_bytes = read_model_files(path)
    model, tokenizer = build_model(config, state, tokenizer_bytes, Path(path))
    return model.to(device), tokenizer


# --- writing -----------------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, model: Seq2Seq, tokenizer: Tokenizer, **extra: Any) -> None:
    """A minimal checkpoint in the training format (what `nmt-moe train` writes, minus trainer state)."""
    checkpoint = {
        "state_dict": {MODEL_PREFIX + key: value for key, value in model.state_dict().items()},
        "nmt_moe": {
            "version": FORMAT_VERSION,
            "model_config": model.config,
            "tokenizer": tokenizer.to_bytes(),
        },
        **extra,
    }
    with atomic_write(path) as handle:
        torch.save(checkpoint, handle)


def export_bundle(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write the export directory for `checkpoint` (itself a checkpoint or a bundle); returns out_dir.

    The bundle is assembled in a temp directory and renamed into place, replacing an older bundle in one
    atomic step (`atomic_files.replace_path`).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    config, state, tokenizer_bytes = read_model_files(checkpoint)
    if is_sharded_checkpoint(checkpoint):  # already loaded into a model: check the tokenizer only
        _tokenizer(tokenizer_bytes, config, checkpoint)
    else:
        build_model(config, state, tokenizer_bytes, checkpoint)  # refuse to export what cannot load
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or _is_bundle(out_dir))):
        raise ModelLoadError(f"{out_dir}: exists and is not an export directory; choose another output path")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        staging.chmod(umask_mode(directory=True))
        torch.save({key: value.contiguous() for key, value in state.items()}, staging / WEIGHTS_FILE)
        section = {"version": FORMAT_VERSION, "model_config": config}
        (staging / CONFIG_FILE).write_text(json.dumps(section, indent=2) + "\n", encoding="utf-8")
        (staging / TOKENIZER_FILE).write_bytes(tokenizer_bytes)
        replace_path(staging, out_dir)  # one atomic rename: the old bundle or the new, never none
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _is_bundle(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()

"""Sharded checkpoints: a directory written by `torch.distributed.checkpoint` (DCP), as Lightning's
ModelParallelStrategy lays it out.

    last.ckpt/                 a directory, so `--ckpt_path last` finds it like a file
      .metadata                DCP's index: every tensor's global shape and where its chunks live
      __<rank>_0.distcp        what rank <rank> wrote: its own expert shards, and its share of the
                               replicated tensors (DCP writes each replicated tensor once)
      meta.pt                  everything that is not a tensor: trainer state, hyper-parameters, the
                               nmt_moe section, optimizer param_groups (torch.save, loaded weights_only)

Tensor keys are flat: `state_dict/<name>` for weights, `optimizer_<i>/<parameter name>/<state key>` for
optimizer state (Adam moments, Adafactor factors, step counts). Expert weights and their optimizer state are
DTensors sharded over the expert dimension, so a checkpoint written on any layout loads on any other: DCP
reads each rank's slice of the chunks it needs (see training/expert_parallel.py).

Safety. DCP unpickles `.metadata` and would `torch.load(weights_only=False)` any non-tensor item; this module
reads `.metadata` with an unpickler that admits only DCP's own metadata classes, refuses checkpoints holding
non-tensor items, and reads tensors weights_only, so nothing here can run code from a checkpoint.

Writing is atomic at the directory level: shards and `meta.pt` go to `.<name>.partial/` and the directory is
renamed into place after every rank finished, so an interrupted save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from nmt_moe.atomic_files import replace_path

META_FILE, DCP_METADATA = "meta.pt", ".metadata"
STATE_PREFIX = "state_dict/"


class ShardedCheckpointError(Exception):
    """A sharded checkpoint directory that cannot be read safely (caught as ModelLoadError by callers)."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a complete sharded checkpoint directory (a partial one lacks meta.pt)."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA).is_file() and (path / META_FILE).is_file()


# --- reading -----------------------------------------------------------------------------------------------


_ALLOWED = {  # besides DCP's classes: what DCP's Metadata pickles to (torch 2.13), all inert
    ("torch.serialization", "_get_layout"),  # torch.strided, by name
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, torch.Size and dtypes, and a few builtins: nothing callable."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise ShardedCheckpointError(
            f"{DCP_METADATA} refers to {module}.{name}, which a checkpoint never needs"
        )


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is unpickled with an allowlist and holds tensors only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / DCP_METADATA
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as error:
            raise ShardedCheckpointError(
                f"{path}: unreadable DCP metadata ({type(error).__name__})"
            ) from error
        if not isinstance(metadata, Metadata):
            raise ShardedCheckpointError(f"{path}: not DCP metadata")
        for key, item in metadata.state_dict_metadata.items():
            if isinstance(item, BytesStorageMetadata):  # DCP would torch.load it with weights_only=False
                raise ShardedCheckpointError(
                    f"{path}: holds a non-tensor item {key!r}; refusing to unpickle it"
                )
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_meta(path: str | Path) -> dict[str, Any]:
    """The non-tensor part (`meta.pt`), loaded with weights_only=True."""
    meta = torch.load(Path(path) / META_FILE, map_location="cpu", weights_only=True)
    if not isinstance(meta, dict):
        raise ShardedCheckpointError(f"{path}/{META_FILE}: not a dict")
    return meta


def tensor_index(path: str | Path) -> dict[str, TensorStorageMetadata]:
    """Every tensor key with its global shape and dtype (from `.metadata`; reads no tensor)."""
    metadata = SafeReader(str(path)).read_metadata()
    return dict(metadata.state_dict_metadata)  # all TensorStorageMetadata: SafeReader refused anything else


def load_into(path: str | Path, targets: dict[str, Tensor], distributed: bool) -> None:
    """Fill `targets` (plain tensors or DTensors, keyed as in the checkpoint) in place from `path`.

    Each target receives exactly its slice: a rank's DTensor shard reads only the chunks it overlaps. Peak
    memory is the targets plus one chunk being read. `distributed=False` reads in this process alone.
    """
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(targets, storage_reader=SafeReader(str(path)), no_dist=not distributed)


def read_tensor(path: str | Path, key: str, item: TensorStorageMetadata) -> Tensor:
    """One full tensor (`item` from `tensor_index`), assembled from its chunks."""
    target = torch.empty(item.size, dtype=item.properties.dtype)
    load_into(path, {key: target}, distributed=False)
    return target


def consolidated_state(path: str | Path, prefix: str = STATE_PREFIX) -> dict[str, Tensor]:
    """Full tensors for every key under `prefix` (prefix removed), read chunk by chunk into their final
    buffers: peak memory is the result plus one chunk, never the checkpoint twice."""
    wanted = {key: item for key, item in tensor_index(path).items() if key.startswith(prefix)}
    targets = {
        key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in wanted.items()
    }  # full [E, ...] for expert weights
    if targets:
        load_into(path, targets, distributed=False)
    return {key[len(prefix) :]: value for key, value in targets.items()}


def full_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint as one process's Lightning checkpoint dict (full tensors, optimizer state by index):
    resuming a sharded run without expert parallelism. Holds the whole model and optimizer in memory."""
    checkpoint = read_meta(path)
    checkpoint["state_dict"] = consolidated_state(path)
    skeletons = checkpoint.pop("optimizer_skeletons", [])
    checkpoint["optimizer_states"] = [
        unflatten_optimizer(skeleton, consolidated_state(path, f"optimizer_{i}/"))
        for i, skeleton in enumerate(skeletons)
    ]
    return checkpoint


# --- optimizer state: by index (torch) <-> by parameter name (checkpoint) ----------------------------------


def flatten_optimizer(state: dict[str, Any], names: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An `optimizer.state_dict()` -> ({"<parameter name>/<key>": tensor}, skeleton without tensors).

    `names[i]` is the name of the optimizer's i-th parameter; the skeleton keeps param_groups, non-tensor
    state values and the names, so `unflatten_optimizer` rebuilds the dict.
    """
    tensors: dict[str, Tensor] = {}
    plain: dict[int, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        plain[index] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{names[index]}/{key}"] = value
            else:
                plain[index][key] = value
    skeleton = {"param_groups": state["param_groups"], "state": plain, "names": list(names)}
    return tensors, skeleton


def unflatten_optimizer(skeleton: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Inverse of `flatten_optimizer`; `tensors` keyed "<parameter name>/<key>"."""
    index_of = {name: index for index, name in enumerate(skeleton["names"])}
    state: dict[int, dict[str, Any]] = {index: dict(entry) for index, entry in skeleton["state"].items()}
    for key, value in tensors.items():
        name, _, item = key.rpartition("/")
        state.setdefault(index_of[name], {})[item] = value
    return {"state": state, "param_groups": skeleton["param_groups"]}


# --- writing -----------------------------------------------------------------------------------------------


def save_sharded(
    path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any], is_writer: bool,
    barrier: Callable[[], None],
) -> None:  # fmt: skip
    """Write a sharded checkpoint (collective: every rank calls it with its own shards).

    `tensors` are plain tensors (replicated: DCP writes each once) or DTensors (each rank writes its shard);
    `meta` is written by the rank with `is_writer`. Shards go to `.<name>.partial/`, which replaces `path`
    only when complete.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    if is_writer:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    dcp.save(tensors, storage_writer=FileSystemWriter(str(partial)))  # returns once .metadata is written
    if is_writer:
        with open(partial / META_FILE, "wb") as handle:
            torch.save(meta, handle)
            handle.flush()
            os.fsync(handle.fileno())
        _replace_dir(partial, path)
    barrier()


def _replace_dir(new: Path, path: Path) -> None:
    """Move `new` onto `path` (a file or directory may be there) in one atomic rename where the system can
    (atomic_files.replace_path), then make the rename durable."""
    replace_path(new, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

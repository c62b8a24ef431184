"""`ExpertParallelStrategy`: DDP for everything but the experts, which are sharded over the ranks
(Shazeer et al., 2017, section 3.1; layout in moe/parallel.py). The one place that drives expert
parallelism during training:

- setup: shards every MoE layer of the LightningModule (`MoELayer.shard`) before DDP wraps it, and tells
  DDP not to average or broadcast the shards;
- after backward: finishes the shards' gradients (sum over replicas, mean over ranks, as DDP does);
- `clip_grad_norm_`: clipping by the global norm (the module's `configure_gradient_clipping` calls it);
- checkpoints: through `torch.distributed.checkpoint` (nmt_moe/sharded_checkpoint.py). Every rank writes
  only its expert shards and their optimizer state; DCP writes the replicated rest once; no rank ever holds
  another rank's experts. Loading reads this rank's slice of a sharded checkpoint written on any layout
  (4 ranks -> 2, 2 -> 1 in nmt_moe.training.faults, ...), or slices a one-process `.ckpt` file (1 -> 2).

The module sets `expert_parallel_size`; `nmt-moe train` picks this strategy in place of "ddp" when it is
above 1. With expert_parallel_size=1 the strategy is plain DDP with one-file checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn.parallel import DistributedDataParallel

from nmt_moe.checkpoint import ModelLoadError
from nmt_moe.moe import collectives, parallel
from nmt_moe.sharded_checkpoint import (
    STATE_PREFIX,
    flatten_optimizer,
    is_sharded_checkpoint,
    load_into,
    read_meta,
    save_sharded,
    tensor_index,
    unflatten_optimizer,
)


class ExpertParallelStrategy(DDPStrategy):
    """DDPStrategy with sharded experts and sharded (DCP) checkpoints; takes DDPStrategy's arguments."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.expert_parallel: collectives.ExpertParallel | None = None  # set in setup when size > 1
        self._mesh: DeviceMesh | None = None  # [replicas, expert_parallel_size], for DTensor checkpoints
        self._local_experts: dict[str, int] = {}  # expert parameter name -> experts this rank holds
        self._loaded_in_place = False  # the last load_checkpoint wrote into the parameters itself

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # load into the sharded model and its optimizer, as ModelParallelStrategy does

    def setup(self, trainer: pl.Trainer) -> None:
        self._shard_experts(getattr(self.lightning_module, "expert_parallel_size", 1))
        super().setup(trainer)

    def _shard_experts(self, size: int) -> None:
        if size == 1 or self.expert_parallel is not None:
            return
        module = self.lightning_module
        self.expert_parallel = collectives.init_expert_parallel(size)
        parallel.shard_experts(module, self.expert_parallel)
        names = parallel.expert_parameter_names(module)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
        params = dict(module.named_parameters())
        self._local_experts = {name: params[name].shape[0] for name in names}
        world = self.expert_parallel.world_size
        self._mesh = init_device_mesh(
            self.root_device.type, (world // size, size), mesh_dim_names=("replica", "expert")
        )  # rank r sits at (r // size, r % size): the layout of collectives.init_expert_parallel

    # ---- gradients ----------------------------------------------------------------------------------------

    def post_backward(self, closure_loss: Tensor) -> None:
        super().post_backward(closure_loss)
        if self.expert_parallel is not None:  # shard grads: sum over replicas, mean over ranks like DDP
            collectives.finish_expert_grads(
                parallel.sharded_parameters(self.lightning_module), self.expert_parallel
            )

    def clip_grad_norm_(self, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
        """Norm clipping by the global norm (the shards' squares summed over the expert-parallel group)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        sharded = parallel.sharded_parameters(self.lightning_module)
        return collectives.clip_grad_norm_(params, sharded, max_norm, self.expert_parallel)

    # ---- checkpoints --------------------------------------------------------------------------------------

    def _global(self, name: str, tensor: Tensor) -> Tensor:
        """A DTensor over the expert dimension for an expert shard (or its per-expert optimizer state);
        other tensors unchanged (replicated: DCP writes them once)."""
        local = self._local_experts.get(name)
        if local is None or tensor.dim() == 0 or tensor.shape[0] != local:
            return tensor
        shape = (local * self.expert_parallel.size, *tensor.shape[1:])
        stride = torch.empty(shape, device="meta").stride()
        placements = [Replicate(), Shard(0)]
        return DTensor.from_local(tensor, self._mesh, placements, run_check=False, shape=shape, stride=stride)

    def _parameter_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        name_of = {id(p): name for name, p in self.lightning_module.named_parameters()}
        return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self.expert_parallel is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        state = checkpoint.pop("state_dict")
        tensors = {STATE_PREFIX + key: self._global(key, value) for key, value in state.items()}
        skeletons = []
        for i, (optimizer_state, optimizer) in enumerate(
            zip(checkpoint.pop("optimizer_states", []), self.optimizers, strict=False)
        ):
            flat, skeleton = flatten_optimizer(optimizer_state, self._parameter_names(optimizer))
            tensors.update(
                {f"optimizer_{i}/{key}": self._global(key.rpartition("/")[0], v) for key, v in flat.items()}
            )
            skeletons.append(skeleton)
        checkpoint["optimizer_skeletons"] = skeletons
        save_sharded(path, tensors, checkpoint, self.is_global_zero, self.barrier)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        self._loaded_in_place = False
        path = Path(self.broadcast(str(checkpoint_path)))
        if self.expert_parallel is None or not is_sharded_checkpoint(path):
            return super().load_checkpoint(path, weights_only)  # a .ckpt: sliced in load_*_state_dict
        checkpoint = read_meta(path)
        index = tensor_index(path)
        state = {key: self._global(key, value) for key, value in self.lightning_module.state_dict().items()}
        _check_fits(path, index, state)
        targets = {STATE_PREFIX + key: value for key, value in state.items()}  # views of the parameters
        optimizer_states = []
        skeletons = checkpoint.pop("optimizer_skeletons", [])
        for i, skeleton in enumerate(skeletons[: len(self.optimizers)]):  # none under validate/test
            local = self._optimizer_buffers(index, f"optimizer_{i}/")
            targets.update(
                {f"optimizer_{i}/{key}": self._global(key.rpartition("/")[0], v) for key, v in local.items()}
            )
            optimizer_states.append((skeleton, local))
        load_into(path, targets, distributed=True)  # each rank reads only its slices
        checkpoint["state_dict"] = state  # expert entries are DTensors: full shapes for check_resumable
        checkpoint["optimizer_states"] = [unflatten_optimizer(s, local) for s, local in optimizer_states]
        self._loaded_in_place = True
        return checkpoint

    def _optimizer_buffers(self, index: Mapping[str, Any], prefix: str) -> dict[str, Tensor]:
        """Empty local tensors for one optimizer's saved state ("<parameter>/<key>" -> this rank's shape)."""
        buffers = {}
        for key, item in index.items():
            if not key.startswith(prefix):
                continue
            name = key[len(prefix) :].rpartition("/")[0]
            shape = list(item.size)
            if (
                name in self._local_experts
                and shape
                and shape[0] == self._local_experts[name] * self.expert_parallel.size
            ):
                shape[0] = self._local_experts[name]
            buffers[key[len(prefix) :]] = torch.empty(
                shape, dtype=item.properties.dtype, device=self.root_device
            )
        return buffers

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self._loaded_in_place:
            return  # DCP wrote into the parameters
        state = dict(checkpoint["state_dict"])
        if self.expert_parallel is not None:  # full [E, ...] tensors of a one-process checkpoint
            parallel.shard_expert_state(state, self.lightning_module)
        super().load_model_state_dict({**checkpoint, "state_dict": state}, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        if self.expert_parallel is not None and not self._loaded_in_place:
            for optimizer in self.optimizers:  # full per-expert moments of a one-process checkpoint
                parallel.shard_optimizer_state(optimizer, self.lightning_module)


def _check_fits(path: Path, index: Mapping[str, Any], state: Mapping[str, Tensor]) -> None:
    """One-line error when the checkpoint's weights are not this model's (instead of DCP's traceback)."""
    saved = {
        key[len(STATE_PREFIX) :]: tuple(item.size)
        for key, item in index.items()
        if key.startswith(STATE_PREFIX)
    }
    here = {key: tuple(value.shape) for key, value in state.items()}
    if saved != here:
        differ = sorted(key for key in saved.keys() | here.keys() if saved.get(key) != here.get(key))
        raise ModelLoadError(
            f"{path}: its weights do not fit this model ({', '.join(differ[:3])} differ); "
            "resume with the model settings the checkpoint was trained with"
        )

"""The LightningModule that trains a `Seq2Seq`: label-smoothed cross entropy plus the MoE auxiliary losses,
Adam or Adafactor with warm-up schedules, and validation by loss, perplexity and sacreBLEU of greedy output.

The model is given as its typed `Seq2SeqConfig`, so LightningCLI lists every model and MoE knob, with its
default, under `model.model.*` and `model.model.moe.*`, and nothing here repeats them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from nmt_moe.checkpoint import check_resumable
from nmt_moe.data.tokenizer import PAD_ID, Tokenizer
from nmt_moe.decoding.greedy import greedy_decode
from nmt_moe.evaluation import score
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import MoELayer, collectives, moe_layers
from nmt_moe.training.expert_parallel import ExpertParallelStrategy
from nmt_moe.training.lockstep import greedy_decode_lockstep
from nmt_moe.training.schedules import Schedule, lr_multiplier

CHECKPOINT_VERSION = 1
OPTIMIZERS = ("adam", "adamw", "adafactor")


class TranslationModule(pl.LightningModule):
    def __init__(
        self,
        model: Seq2SeqConfig,
        *,
        label_smoothing: float = 0.1,
        optimizer: Literal["adam", "adamw", "adafactor"] = "adam",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.98),
        weight_decay: float = 0.0,
        warmup_steps: int = 1000,
        hold_steps: int = 0,
        schedule: Schedule = "inverse_sqrt",
        max_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        val_max_sentences: int = 500,
        val_max_len_a: float = 1.5,
        val_max_len_b: int = 10,
        num_val_samples: int = 8,
        expert_parallel_size: int = 1,
    ) -> None:
        """
        Args:
            model: the Seq2Seq to train, by its config (in YAML `model: {embed_dim: ..., moe: {k: ...}}`);
                `nmt-moe train` fills `vocab_size` from `data.pipeline.vocab_size`.
            label_smoothing: epsilon of the label-smoothed cross entropy.
            optimizer: "adam", "adamw" (decoupled weight decay) or "adafactor" (`torch.optim.Adafactor`,
                factored second moments: the memory-light choice for large expert banks).
            lr: peak learning rate, reached at the end of warm-up.
            betas: Adam's betas (unused by Adafactor).
            warmup_steps: optimizer steps of linear warm-up.
            hold_steps: optimizer steps at the peak rate after warm-up, before the decay (the paper's
                WMT schedule: 2000 warm-up, 8000 hold, then inverse square root).
            schedule: decay after warm-up: "inverse_sqrt", "cosine" (to `min_lr_ratio * lr` at `max_steps`)
                or "constant".
            max_steps: end of the cosine schedule; defaults to the trainer's total optimizer steps.
            val_max_sentences: validation/test sentences (the first ones of the split) to greedy-decode and
                score with BLEU/chrF; 0 skips decoding (then do not monitor `val/bleu`).
            val_max_len_a, val_max_len_b: greedy output is at most `a * source_length + b` tokens.
            num_val_samples: sample translations kept for the W&B table after each validation.
            expert_parallel_size: split every MoE layer's experts across this many ranks (all-to-all
                exchange; must divide the world size and num_experts; see docs/PARALLEL.md). 1 = every rank
                holds all experts (plain data parallel, one-file checkpoints); above 1 checkpoints are
                sharded directories (each rank writes its own experts).
        """
        super().__init__()
        if isinstance(model, Mapping):  # hyper-parameters given back as saved (load_from_checkpoint)
            model = Seq2SeqConfig.from_dict(model)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if val_max_sentences < 0:
            raise ValueError(f"val_max_sentences must be >= 0, got {val_max_sentences}")
        if expert_parallel_size < 1:
            raise ValueError(f"expert_parallel_size must be >= 1, got {expert_parallel_size}")
        seq2seq = Seq2Seq(model)
        for _, layer in moe_layers(seq2seq):
            if layer.num_experts % expert_parallel_size:  # fail now, not after data preparation
                raise ValueError(f"expert_parallel_size={expert_parallel_size} must divide num_experts="
                                 f"{layer.num_experts}")  # fmt: skip
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}: expected one of {OPTIMIZERS}")
        # Check the schedule now, not at the first step (cosine without max_steps uses the trainer's total).
        lr_multiplier(
            schedule, warmup_steps, max_steps or warmup_steps + hold_steps + 1, min_lr_ratio, hold_steps
        )
        # Hyper-parameters hold primitives only, so checkpoints load with weights_only=True: the model config
        # is stored as the nested dict LightningCLI parses back into a Seq2SeqConfig.
        self.save_hyperparameters(ignore=["model"])
        self.hparams["model"] = dataclasses.asdict(model)
        self.model = seq2seq
        self.moe_layers = [layer for _, layer in moe_layers(self.model)]
        self.eval_metrics = torch.nn.ModuleDict(
            {name: MeanMetric() for name in ("loss", "nll", "acc")}
        )  # token-weighted means over an evaluation epoch, synced across ranks
        self._decoded: list[tuple[int, str]] = []  # (index in split, hypothesis)
        self.val_samples: list[dict[str, str]] = []

    # ---- training -------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        """Teacher-forced logits [B, T, V] for `tgt[:, 1:]` and the MoE outputs by layer name."""
        out = self.model(batch["src"], batch["src_lengths"], batch["tgt"][:, :-1])
        return out.logits, out.moe

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        logits, moe = self(batch)  # [B, T, V]
        target = batch["tgt"][:, 1:]  # [B, T]
        ce = F.cross_entropy(
            logits.flatten(0, 1),
            target.flatten(),
            ignore_index=PAD_ID,
            label_smoothing=self.hparams.label_smoothing,
        )
        aux = sum((out.aux_loss for out in moe.values()), start=ce.new_zeros(()))
        loss = ce + aux
        log = {"batch_size": target.shape[0], "on_step": True, "on_epoch": False}  # step values, unweighted
        self.log("train/loss", loss, prog_bar=True, **log)
        self.log("train/ce", ce, **log)
        self.log("train/acc", token_accuracy(logits, target), **log)
        if self._trainer is not None:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], **log)
        if moe:
            self.log("train/aux_loss", aux, **log)
        for layer, out in moe.items():
            self.log(f"train/{layer}/aux_loss", out.aux_loss, **log)
            for name, value in out.losses.items():
                self.log(f"train/{layer}/{name}", value, **log)
        stats = {
            layer: {
                "load": out.load.detach(),  # [E]
                "importance": out.importance.detach(),  # [E]
                "dropped": torch.as_tensor(out.dropped).detach(),  # assignments over capacity
            }
            for layer, out in moe.items()
        }
        return {"loss": loss, "moe": stats}  # "moe" feeds the ExpertLoadMonitor callback

    # ---- expert parallelism (docs/PARALLEL.md; driven by training/expert_parallel.py) ---------------------

    @property
    def expert_parallel_size(self) -> int:
        """Ranks each MoE layer's experts are split over (read by `ExpertParallelStrategy`)."""
        return self.hparams.expert_parallel_size

    def setup(self, stage: str) -> None:
        if self.expert_parallel_size > 1 and not isinstance(self.trainer.strategy, ExpertParallelStrategy):
            raise RuntimeError(
                f"expert_parallel_size={self.expert_parallel_size} needs ExpertParallelStrategy "
                "(`nmt-moe train` picks it for --trainer.strategy ddp)"
            )

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        """With sharded experts, norm clipping uses the global norm (shards' squares summed over ranks)."""
        strategy = self.trainer.strategy
        sharded = isinstance(strategy, ExpertParallelStrategy) and strategy.expert_parallel is not None
        if not sharded or not gradient_clip_val or gradient_clip_algorithm == "value":
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        strategy.clip_grad_norm_(optimizer, gradient_clip_val)

    def _experts_sharded(self) -> bool:
        return (
            self._trainer is not None and getattr(self.trainer.strategy, "expert_parallel", None) is not None
        )

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        data_parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        plain_data_parallel = data_parallel and self.expert_parallel_size == 1  # EP layers count globally
        update_balancing_biases(self.moe_layers, across_ranks=plain_data_parallel)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay)
        else:  # adafactor
            optimizer = torch.optim.Adafactor(params, lr=hp.lr, weight_decay=hp.weight_decay)
        run_steps = None
        if hp.schedule == "cosine" and hp.max_steps is None:  # Lightning's estimate sets up the data
            run_steps = int(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_schedule(run_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_schedule(self, run_steps: int | None) -> Callable[[int], float]:
        """The learning-rate multiplier per optimizer step. A cosine schedule ends at `model.max_steps`, or
        without it at `run_steps` (the run's total optimizer steps); raises ScheduleError if that is inside
        warm-up + hold."""
        hp = self.hparams
        end = hp.max_steps or run_steps
        return lr_multiplier(hp.schedule, hp.warmup_steps, end, hp.min_lr_ratio, hp.get("hold_steps", 0))

    # ---- validation and test ----------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val", "valid")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test", "test")

    def _evaluation_step(self, batch: dict[str, Tensor]) -> None:
        logits, _ = self(batch)  # [B, T, V]
        target = batch["tgt"][:, 1:]  # [B, T]
        n_tokens = (target != PAD_ID).sum()
        flat_logits, flat_target = logits.flatten(0, 1).float(), target.flatten()
        loss = F.cross_entropy(
            flat_logits, flat_target, ignore_index=PAD_ID, label_smoothing=self.hparams.label_smoothing
        )
        nll = F.cross_entropy(flat_logits, flat_target, ignore_index=PAD_ID)
        self.eval_metrics["loss"].update(loss, n_tokens)
        self.eval_metrics["nll"].update(nll, n_tokens)
        self.eval_metrics["acc"].update(token_accuracy(logits, target), n_tokens)

        if self.hparams.val_max_sentences == 0:
            return
        keep = (batch["index"] < self.hparams.val_max_sentences).nonzero().squeeze(1)  # [N]
        src, src_lengths = batch["src"][keep], batch["src_lengths"][keep]
        lengths = {"max_len_a": self.hparams.val_max_len_a, "max_len_b": self.hparams.val_max_len_b}
        if self._experts_sharded():  # every rank joins every step's all-to-all, even with nothing to decode
            hyp_ids = greedy_decode_lockstep(self.model, src, src_lengths, **lengths)
        elif len(keep):
            hyp_ids, _ = greedy_decode(self.model, src, src_lengths, **lengths)
        if len(keep) == 0:
            return
        hypotheses = self._tokenizer().decode(hyp_ids)
        self._decoded += zip(batch["index"][keep].tolist(), hypotheses, strict=True)

    def _evaluation_epoch_end(self, prefix: str, split: str) -> None:
        # Every value below is already global (torchmetrics and the gather sync across ranks); sync_dist
        # averages identical numbers and keeps Lightning from warning about epoch-level logs under DDP.
        log = {"sync_dist": True}
        nll = self.eval_metrics["nll"].compute()
        self.log(f"{prefix}/loss", self.eval_metrics["loss"].compute(), prog_bar=True, **log)
        self.log(f"{prefix}/nll", nll, **log)
        self.log(f"{prefix}/ppl", nll.exp(), **log)
        self.log(f"{prefix}/acc", self.eval_metrics["acc"].compute(), **log)
        for metric in self.eval_metrics.values():
            metric.reset()

        decoded, self._decoded = self._decoded, []
        if self.trainer.world_size > 1:
            gathered: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, decoded)
            decoded = [row for part in gathered for row in part]
        if not decoded:
            return
        decoded = sorted(dict(decoded).items())  # by index; DDP may serve a sentence twice
        datamodule = self.trainer.datamodule
        references = datamodule.references(split)
        refs = [references[index] for index, _ in decoded]
        scores = score([hyp for _, hyp in decoded], refs)
        self.log(f"{prefix}/bleu", scores.bleu, prog_bar=True, **log)
        self.log(f"{prefix}/chrf", scores.chrf, **log)
        sources = datamodule.sources(split)
        self.val_samples = [
            {"source": sources[index], "hypothesis": hyp, "reference": references[index]}
            for index, hyp in decoded[: self.hparams.num_val_samples]
        ]

    # ---- checkpoints ------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds what a checkpoint needs to translate on its own: model config and SentencePiece model."""
        checkpoint["nmt_moe"] = {
            "version": CHECKPOINT_VERSION,
            "model_config": self.model.config,
            "tokenizer": self._tokenizer().to_bytes(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model or vocabulary (one-line error instead of a size-mismatch
        traceback). Expert shards are the strategy's business (training/expert_parallel.py)."""
        trainer = self._trainer  # None under load_from_checkpoint
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        where = getattr(trainer, "ckpt_path", None) or "checkpoint"
        check_resumable(checkpoint, self.model, tokenizer, where)

    def _tokenizer(self) -> Tokenizer:
        datamodule = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError(
                "TranslationModule needs the trainer's datamodule to have a `tokenizer` (to decode "
                "validation output and store it in checkpoints): train with a TranslationDataModule"
            )
        return tokenizer


def update_balancing_biases(layers: Sequence[MoELayer], across_ranks: bool) -> None:
    """Loss-free balancing after an optimizer step: each layer's bias moves against its load.

    Under plain data parallelism each rank counted only its own tokens: with `across_ranks` the counts of
    all layers are summed over the ranks first (one all-reduce), so every rank makes the update one process
    would make on the union of the batches (and DDP's broadcast of rank 0's buffers changes nothing). Under
    expert parallelism the layers count the global batch already. Collective with `across_ranks`.
    """
    balanced = [layer for layer in layers if layer.loss_free_bias]
    if not across_ranks or not balanced:
        for layer in balanced:
            layer.update_bias()
        return
    loads = collectives.sum_over_ranks(torch.cat([layer.load_since_update for layer in balanced]))  # [ΣE]
    for layer, load in zip(balanced, loads.split([layer.num_experts for layer in balanced]), strict=True):
        layer.update_bias(load)


def token_accuracy(logits: Tensor, target: Tensor) -> Tensor:
    """Share of real (non-padding) target tokens that argmax predicts: logits [B, T, V], target [B, T]."""
    real = target != PAD_ID  # [B, T]
    correct = (logits.argmax(-1) == target) & real
    return correct.sum() / real.sum().clamp_min(1)

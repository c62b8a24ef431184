"""The LightningCLI behind `nmt-moe train`: its callbacks, argument links, defaults and config checks.

`cli/train.py` runs it and turns its errors into exit codes; this module holds what the CLI is.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
import yaml
from jsonargparse import Namespace
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from nmt_moe.checkpoint import load_weights_only
from nmt_moe.data.datamodule import TranslationDataModule
from nmt_moe.model_files import ModelLoadError, check_training_checkpoint
from nmt_moe.training.callbacks import ExpertLoadMonitor, SampleTranslations, TokensPerSecond
from nmt_moe.training.faults import GracefulInterrupt, NonFiniteGuard, SafeCheckpointIO, StepSeed
from nmt_moe.training.module import TranslationModule
from nmt_moe.training.old_layout import model_hparams_in_new_layout, old_layout_in_argv
from nmt_moe.training.progress import TrainingProgress
from nmt_moe.training.tracking import WANDB_MODES, wandb_api_key_configured


class ConfigError(Exception):
    """A setting that cannot work; reported in one line before training starts."""


def default_precision() -> str:
    """bf16 autocast where the GPU supports it; full fp32 elsewhere (bf16 on this CPU is 4-8x slower)."""
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def checkpoint_dir(default_root_dir: str | None) -> str:
    return str(Path(default_root_dir or ".") / "checkpoints")


def monitor_loss_without_bleu(config: Any) -> None:
    """With `model.val_max_sentences 0` nothing is decoded and `val/bleu` never exists: the best checkpoint
    and early stopping follow `val/loss` (lower is better) where they were left on the BLEU default, instead
    of ModelCheckpoint failing at the first save."""
    for key in ("checkpoint", "early_stopping"):
        if config[key].monitor == "val/bleu":
            config[key].monitor, config[key].mode = "val/loss", "min"
    if "val/bleu" in (config.checkpoint.filename or ""):
        config.checkpoint.filename = "best-step{step}-loss{val/loss:.3f}"


class SaveConfigToLoggers(SaveConfigCallback):
    """Writes config.yaml (overwriting on a rerun into the same directory) and logs it to every logger."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class OneLineErrorParser(LightningArgumentParser):
    """A bad flag or config file is one line on stderr and exit code 2, as in every other command
    (jsonargparse prints the whole usage, ~190 lines, before its error line)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse parsing internally: it catches this and carries on
            super().error(message, ex)
        print(f"nmt-moe train: error: {' '.join(message.split())}", file=sys.stderr)
        raise SystemExit(2)


class TrainCLI(LightningCLI):
    """LightningCLI with the callbacks, links and checks every nmt-moe run has (see cli/train.py)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--wandb",
            choices=WANDB_MODES,
            default="auto",
            help="W&B logging: auto (online only when an API key is configured), online, offline, "
            "or off (CSV logger instead). Ignored when --trainer.logger names another logger.",
        )
        parser.link_arguments("data.pipeline.vocab_size", "model.model.vocab_size")
        # Best by BLEU, and a separate "last" (overwritten at every save): ModelCheckpoint(save_last=True)
        # in Lightning 2.6 refreshes last.ckpt only when the best one changes, which breaks resuming.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/bleu",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 1,
                "checkpoint.filename": "best-step{step}-bleu{val/bleu:.2f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "last_checkpoint.filename": "last",
                "last_checkpoint.monitor": None,
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(EarlyStopping, "early_stopping")
        parser.set_defaults(
            {
                "early_stopping.monitor": "val/bleu",
                "early_stopping.mode": "max",
                "early_stopping.patience": 10,
                # A run without validation (--trainer.limit_val_batches 0) has no val/bleu: train on.
                "early_stopping.strict": False,
            }
        )
        parser.add_lightning_class_args(ExpertLoadMonitor, "expert_load")
        parser.add_lightning_class_args(TokensPerSecond, "throughput")
        parser.add_lightning_class_args(TrainingProgress, "progress")
        parser.add_lightning_class_args(SampleTranslations, "samples")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(StepSeed, "step_seed")
        # last: its checkpoint holds the other callbacks' states after the step
        parser.add_lightning_class_args(GracefulInterrupt, "interrupt")
        # last.ckpt, the best checkpoint and the interrupt/fault checkpoints all live in
        # <default_root_dir>/checkpoints, where `--ckpt_path last` and the recipes look for them.
        for key in ("checkpoint", "last_checkpoint", "interrupt", "nonfinite"):
            parser.link_arguments("trainer.default_root_dir", f"{key}.dirpath", compute_fn=checkpoint_dir)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Configs and flags in the layout before the typed model and data configs are refused in one line
        naming the new keys (jsonargparse would list every key it expected instead)."""
        why = old_layout_in_argv(args) if isinstance(args, list) else None
        if why:
            raise ConfigError(why)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI merges `--ckpt_path`'s hyper-parameters into the config and builds what they
        describe. Done here through our loader (one-line errors, weights_only), after checking them (our
        model only, and a model of the checkpoint's own weights); a model config saved in the older
        {class_path, init_args} form with flat MoE keys is read as the new nested one."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not (path and Path(path).is_file()):
            return
        checkpoint = load_weights_only(path)
        check_training_checkpoint(checkpoint, path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if isinstance(hparams.get("model"), dict):
            try:
                hparams["model"] = model_hparams_in_new_layout(hparams["model"])
            except (TypeError, ValueError) as error:
                raise ModelLoadError(
                    f"{path}: its model config does not fit this nmt-moe ({error})"
                ) from error
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:  # a bad setting (k > num_experts, unknown gate, ...), named by it
            raise ConfigError(str(error)) from error

    def before_fit(self) -> None:
        world, size = self.trainer.world_size, self.model.hparams.get("expert_parallel_size", 1)
        if world % size:
            raise ConfigError(f"model.expert_parallel_size={size} must divide the world size {world} "
                              "(trainer.devices x trainer.num_nodes)")  # fmt: skip
        if self.trainer.max_steps > 0:  # the schedule against the run's length before the data is set up
            self.model.lr_schedule(self.trainer.max_steps)  # (by epochs: at fit, from Lightning's estimate)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.enable_progress_bar is False:  # no bar: our progress callback logs lines
            config.trainer.enable_progress_bar = True
            config.progress.mode = "lines"
        if config.model.get("val_max_sentences", 1) == 0:
            monitor_loss_without_bleu(config)
        if config.model.get("expert_parallel_size", 1) > 1 and config.trainer.strategy in ("ddp", "auto"):
            strategy = (
                "nmt_moe.training.expert_parallel.ExpertParallelStrategy"  # sharded experts, checkpoints
            )
            config.trainer.strategy = Namespace(class_path=strategy, init_args=Namespace())
        logger = config.trainer.logger
        if not (isinstance(logger, Namespace) and logger.get("class_path", "").endswith("WandbLogger")):
            return  # the user chose another logger (or none)
        root = config.trainer.default_root_dir or "."
        if config.wandb == "off":
            config.trainer.logger = Namespace(
                class_path="pytorch_lightning.loggers.CSVLogger",
                init_args=Namespace(save_dir=root, name="csv"),
            )
            return
        online = config.wandb == "online" or (config.wandb == "auto" and wandb_api_key_configured())
        logger.init_args.offline = not online
        if logger.init_args.get("save_dir") in (None, "."):
            logger.init_args.save_dir = root


def build_cli(argv: list[str]) -> TrainCLI:
    """Parses `argv` and runs the subcommand (fit/validate/test), as LightningCLI does on construction."""

    return TrainCLI(
        TranslationModule,
        TranslationDataModule,
        args=argv,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "default_root_dir": "runs",
            "precision": default_precision(),
            "gradient_clip_val": 1.0,
            "use_distributed_sampler": False,  # the data module's batch sampler shards across ranks
            "plugins": [SafeCheckpointIO()],  # atomic checkpoint writes, weights_only loads
            "logger": {
                "class_path": "pytorch_lightning.loggers.WandbLogger",
                "init_args": {"project": "nmt-moe"},
            },
        },
        seed_everything_default=1234,
        auto_configure_optimizers=False,
        parser_kwargs={"prog": "nmt-moe train"},
        parser_class=OneLineErrorParser,
    )

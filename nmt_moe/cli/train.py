"""`nmt-moe train`: LightningCLI over `TranslationModule` and `TranslationDataModule`.

Subcommands `fit`, `validate`, `test` (and `--print_config`) come from LightningCLI. On top of its defaults:
- `data.vocab_size` is linked to the Seq2Seq's `vocab_size` (`model.model.init_args.vocab_size`);
- always on: checkpoints best by `val/bleu` (`val/loss` with `--model.val_max_sentences 0`, which decodes
  nothing; `--checkpoint.*`) and `last.ckpt` after every validation
  (`--last_checkpoint.*`), both under `<default_root_dir>/checkpoints` so `--ckpt_path last` finds them;
  early stopping (`--early_stopping.*`), expert-load logging (`--expert_load.*`), tokens/s
  (`--throughput.*`), W&B sample tables, and progress (`--progress.*`: a bar with step / total, loss,
  tokens/s, validation BLEU and time left in a terminal, the same fields as log lines elsewhere;
  `--trainer.enable_progress_bar false` gives the lines);
- the logger is W&B, offline unless an API key is configured; `--wandb off` switches to a CSV logger, and any
  `--trainer.logger` replaces it (`--trainer.logger false` logs nothing); the run's directory (offline) or
  URL is printed at the end, with the `wandb sync` command that uploads an offline run;
- the full parsed config is written beside the logs and sent to the loggers' hyper-parameters;
- fault handling (`nmt_moe/training/faults.py`): checkpoints written atomically and loaded weights_only,
  SIGINT/SIGTERM save `last.ckpt` and stop (`--interrupt.*`, exit code 128 + signal), non-finite steps are
  skipped and too many in a row stop the run (`--nonfinite.*`, exit code 3), per-step seeding for exact
  resumes (`--step_seed.*`); an unusable checkpoint is a one-line error (exit code 2).

The model, data and trainer flags are LightningCLI's, built in `nmt_moe/training/lightning_cli.py`; this
module only maps what can go wrong to one stderr line and an exit code (cli/errors.py for the shared format).
"""

from __future__ import annotations

import os
import signal
import sys

from nmt_moe.cli.errors import error_line

PROG = "nmt-moe train"


def main(argv: list[str]) -> int:
    """Runs LightningCLI on `argv` (e.g. ["fit", "--config", "recipes/x/config.yaml"]) and turns what can go
    wrong into one line on stderr and an exit code."""
    from pytorch_lightning.loggers import WandbLogger
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from nmt_moe.model_files import ModelLoadError
    from nmt_moe.training.faults import CheckpointWriteError, TrainingInterrupted, exit_code
    from nmt_moe.training.lightning_cli import ConfigError, build_cli
    from nmt_moe.training.progress import quiet_library_noise
    from nmt_moe.training.schedules import ScheduleError
    from nmt_moe.training.tracking import announce_runs

    quiet_library_noise()
    os.environ.setdefault("WANDB_SILENT", "true")  # its banner and warnings; announce_runs says what matters
    try:
        cli = build_cli(argv)
    except ConfigError as error:
        print(error_line(PROG, f"bad config: {error}"), file=sys.stderr)
        return 2
    except ScheduleError as error:  # a cosine schedule that ends inside warm-up + hold
        print(error_line(PROG, f"bad config: {error}"), file=sys.stderr)
        return 2
    except ModelLoadError as error:  # corrupt, unsafe or mismatched checkpoint given as --ckpt_path
        print(error_line(PROG, error), file=sys.stderr)
        return 2
    except SIGTERMException:  # before training started (GracefulInterrupt handles it from then on)
        print(f"{PROG}: SIGTERM before training started; nothing saved", file=sys.stderr)
        return 128 + signal.SIGTERM
    except CheckpointWriteError as error:  # e.g. a full disk: the run stops, its last checkpoint intact
        print(error_line(PROG, error), file=sys.stderr)
        return 1
    except TrainingInterrupted as stop:  # the checkpoint is saved and the message printed
        import wandb

        if wandb.run is not None:
            wandb.run.finish(exit_code=128 + stop.signum)
        return 128 + stop.signum
    for logger in cli.trainer.loggers:
        if isinstance(logger, WandbLogger):
            announce_runs(logger.experiment)
            logger.experiment.finish()  # flush the run now, so main can run again in one process
    return exit_code(cli.trainer)

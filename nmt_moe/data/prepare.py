"""`nmt-moe prepare`: run the data pipeline ahead of training and print what it did.

Reads the same settings as training's `data:` section, from a config file (a full `nmt-moe train`
config or a file of data settings alone) and/or flags named after `TranslationDataModule`'s arguments:

    nmt-moe prepare --config recipes/multi30k/config.yaml
    nmt-moe prepare --pipeline.src_lang en --pipeline.tgt_lang de --pipeline.train data/train \
        --pipeline.valid data/val --pipeline.vocab_size 8000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from nmt_moe.data.datamodule import TranslationDataModule


def _data_section(config_path: str) -> dict[str, Any]:
    """The data settings in a config file: its `data:` section (LightningCLI layout) or the whole file."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    section = loaded.get("data", loaded)
    if isinstance(section, dict) and "init_args" in section:  # data: {class_path: ..., init_args: {...}}
        section = section["init_args"]
    return dict(section or {})


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="nmt-moe prepare", description=__doc__, exit_on_error=False)
    parser.add_argument("--config", help="YAML with a data: section (or data settings at the top level)")
    parser.add_argument("--summary_json", help="also write the summary to this JSON file")
    parser.add_class_arguments(TranslationDataModule, fail_untyped=False)
    return parser


def summarize(dm: TranslationDataModule, seconds: float) -> dict[str, Any]:
    """What prepare reports: pairs kept per filter, vocab, tokens per side, padding of the batches."""
    assert dm.prepared is not None
    summary = dict(dm.prepared.summary)
    summary["cache_dir"] = str(dm.prepared.path)
    summary["from_cache"] = dm.prepared.from_cache
    summary["seconds"] = round(seconds, 2)
    summary["padding_fraction"] = {split: round(dm.padding_fraction(split), 4) for split in dm.splits}
    summary["max_tokens"] = dm.max_tokens
    summary["train_batches_per_epoch"] = len(dm.batch_sampler("train", shuffle=True))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"prepared {summary['src_lang']}->{summary['tgt_lang']} in {summary['seconds']} s "
        f"({'cache hit' if summary['from_cache'] else 'built'}): {summary['cache_dir']}",
        f"vocab size {summary['vocab_size']} ({summary['spm_model_type']}, "
        f"{'joint' if summary['joint_vocab'] else 'per-language'})",
    ]
    for split, info in summary["splits"].items():
        dropped = ", ".join(f"{name} -{count}" for name, count in info["dropped"].items()) or "no filters"
        lines.append(
            f"{split:>5}: {info['pairs_in']} pairs in, {dropped}, {info['pairs']} kept; "
            f"tokens src {info['src_tokens']} tgt {info['tgt_tokens']}; "
            f"padding {summary['padding_fraction'].get(split, 0.0):.1%}"
        )
    lines.append(
        f"train: {summary['train_batches_per_epoch']} batches per epoch at max_tokens={summary['max_tokens']}"
    )
    return "\n".join(lines)


BAD_INPUT = (ValueError, OSError, ConnectionError, KeyError, yaml.YAMLError)  # FileNotFoundError: OSError


def _error(error: BaseException) -> int:
    """Bad input: one line on stderr, exit code 2 (as the other commands), no traceback."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"nmt-moe prepare: error: {message}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _progress_on_stdout() -> Iterator[None]:
    """Progress (our log lines, `datasets`' progress bars, library warnings) goes to stdout, beside the
    summary, so that stderr holds nothing but the one error line of a failed run, however late it fails."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stderr(sys.stdout):
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


NOT_DATA_MODULE = ("config", "summary_json", "__path__")


def prepare_main(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = _parser()
    try:
        if known.config:
            parser.set_defaults(**_data_section(known.config))
        args = parser.parse_args(argv)
    except (*BAD_INPUT, ArgumentError) as error:
        return _error(error)
    start = time.perf_counter()
    try:
        with _progress_on_stdout():
            init = vars(parser.instantiate_classes(args))  # the pipeline section becomes a PipelineConfig
            dm = TranslationDataModule(**{k: v for k, v in init.items() if k not in NOT_DATA_MODULE})
            dm.prepare_data()
            dm.setup("fit")
    except BAD_INPUT as error:
        return _error(error)
    summary = summarize(dm, time.perf_counter() - start)
    print(format_summary(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2))
    return 0

"""`nmt-moe prepare`: run the data pipeline ahead of training and print what it did.

Reads the same settings as training's `data:` section, from a config file (a full `nmt-moe train`
config or a file of data settings alone) and/or flags named after `TranslationDataModule`'s arguments:

    nmt-moe prepare --config recipes/multi30k/config.yaml
    nmt-moe prepare --pipeline.src_lang en --pipeline.tgt_lang de --pipeline.train data/train \
        --pipeline.valid data/val --pipeline.vocab_size 8000

Unlike the other commands, a bad flag here returns exit code 2 (rather than raising SystemExit(2)): the
flags come from the data module's signature and are checked like the rest of its input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError, ArgumentParser

from nmt_moe.cli.errors import run_command
from nmt_moe.data.datamodule import TranslationDataModule
from nmt_moe.data.prepare import format_summary, prepare

PROG = "nmt-moe prepare"


def data_section(config_path: str) -> dict[str, Any]:
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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__, exit_on_error=False)
    parser.add_argument("--config", help="YAML with a data: section (or data settings at the top level)")
    parser.add_argument("--summary_json", help="also write the summary to this JSON file")
    parser.add_class_arguments(TranslationDataModule, fail_untyped=False)
    return parser


def parse_settings(argv: list[str]) -> tuple[dict[str, Any], str | None]:
    """(TranslationDataModule arguments, --summary_json) from the config file and the flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parser = build_parser()
    try:
        if known.config:
            parser.set_defaults(**data_section(known.config))
        args = parser.instantiate(parser.parse_args(argv))  # nested dataclass settings built as such
    except ArgumentError as error:
        raise ValueError(str(error)) from None
    settings = {k: v for k, v in vars(args).items() if k not in ("config", "summary_json", "__path__")}
    return settings, args.summary_json


@contextlib.contextmanager
def progress_on_stdout() -> Iterator[None]:
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


def run(argv: list[str]) -> int:
    settings, summary_json = parse_settings(argv)
    with progress_on_stdout():
        summary = prepare(settings)
    print(format_summary(summary))
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str]) -> int:
    return run_command(PROG, lambda: run(argv))

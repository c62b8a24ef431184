"""The `nmt-moe` entry point: dispatches to one thin module per command in this package.

Each command module holds a typed function whose signature and docstring are its command line
(jsonargparse, as litgpt; `train` is LightningCLI) and a `main(argv) -> int`; libraries never parse
arguments. Modules are imported lazily, so `nmt-moe translate` does not pay for Lightning's import and
`nmt-moe --help` answers at once. Exit codes: cli/errors.py.
"""

from __future__ import annotations

import importlib
import sys

from nmt_moe.allocator import keep_freed_memory

# command -> one-line help; the command's code is nmt_moe/cli/<command>.py ("-" written "_")
COMMANDS: dict[str, str] = {
    "prepare": "clean, tokenize and cache a parallel corpus",
    "train": "train, validate or test a model (LightningCLI: fit/validate/test)",
    "translate": "translate a file or stdin with greedy or beam search",
    "score": "log-probability of given translations (forced decoding), per line pair",
    "serve": "an HTTP translation server (FastAPI) with dynamic batching",
    "evaluate": "score hypotheses against references with sacreBLEU",
    "export": "write a self-contained model bundle from a training checkpoint",
    "average": "average the parameters of several checkpoints",
    "plan": "size a recipe without allocating it: parameters, FLOPs, memory per device",
    "routing": "report which tokens and languages each expert receives",
    "log-model": "log an exported model as a W&B artifact beside the run that trained it",
}


def _usage() -> str:
    lines = ["usage: nmt-moe <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, help_ in COMMANDS.items()]
    lines += [
        "",
        "Run `nmt-moe <command> --help` for the options of one command; every command also reads",
        "them from a YAML file given as --config (train: `nmt-moe train fit --config FILE`).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        known = ", ".join(COMMANDS)
        message = f"unknown command {command!r} (one of {known}; see nmt-moe --help)"
        print(f"nmt-moe: error: {message}", file=sys.stderr)
        return 2
    keep_freed_memory()  # before the first large tensor: training and decoding reuse their buffers
    module = importlib.import_module(f"nmt_moe.cli.{command.replace('-', '_')}")
    return int(module.main(rest) or 0)

"""The `nmt-moe` entry point.

Each subcommand lives with the code it drives; this file only dispatches, importing lazily so that
`nmt-moe translate` does not pay for Lightning's import and `nmt-moe --help` answers at once.
"""

from __future__ import annotations

import importlib
import sys

from nmt_moe.allocator import keep_freed_memory

# subcommand -> (module holding `main(argv: list[str]) -> int | None`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("nmt_moe.data.prepare", "clean, tokenize and cache a parallel corpus"),
    "train": ("nmt_moe.training.cli", "train, validate or test a model (LightningCLI: fit/validate/test)"),
    "translate": ("nmt_moe.decoding.translate", "translate a file or stdin with greedy or beam search"),
    "score": ("nmt_moe.scoring", "log-probability of given translations (forced decoding), per line pair"),
    "serve": ("nmt_moe.serving.app", "an HTTP translation server (FastAPI) with dynamic batching"),
    "evaluate": ("nmt_moe.evaluation", "score hypotheses against references with sacreBLEU"),
    "export": ("nmt_moe.checkpoint", "write a self-contained model bundle from a training checkpoint"),
    "average": ("nmt_moe.averaging", "average the parameters of several checkpoints"),
    "plan": ("nmt_moe.plan", "size a recipe without allocating it: parameters, FLOPs, memory per device"),
    "routing": ("nmt_moe.routing", "report which tokens and languages each expert receives"),
}


def _usage() -> str:
    lines = ["usage: nmt-moe <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `nmt-moe <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"nmt-moe: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    keep_freed_memory()  # before the first large tensor: training and decoding reuse their buffers
    module = importlib.import_module(SUBCOMMANDS[command][0])
    entry = getattr(module, f"{command}_main")
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""`nmt-moe routing`: which tokens and which target languages each expert of a trained model receives
(the counting is `nmt_moe.routing`; see its docstring for how lines, targets and languages are read)."""

from __future__ import annotations

import json
from pathlib import Path

from nmt_moe.cli.errors import UsageError, run_command
from nmt_moe.cli.parsing import Command, parse
from nmt_moe.data.text_io import read_text_file
from nmt_moe.decoding.options import BatchOptions


def routing(
    model: Path,
    input: Path,
    tgt: Path | None = None,
    langs: str | None = None,
    lang_of_line: Path | None = None,
    target_lang: str | None = None,
    output: Path = Path("routing"),
    top: int = 8,
    max_experts: int = 32,
    max_tokens: int = BatchOptions.max_tokens,
    device: str = "cpu",
) -> int:
    """Report which tokens and which target languages each expert of a model receives.

    Per MoE layer: a table on stdout, routing.json and routing.png in the report directory.

    Args:
        model: training checkpoint (.ckpt) or export dir
        input: source text, one sentence a line
        tgt: references to teacher-force on (default: the model's greedy output)
        langs: comma-separated target languages: route every line into each
        lang_of_line: file with one language code per input line
        target_lang: prefix this <2xx> tag to every line
        output: report directory
        top: pieces shown per expert
        max_experts: experts shown per layer, most loaded first
        max_tokens: batch budget in source tokens
        device: torch device
    """
    if sum(x is not None for x in (langs, lang_of_line, target_lang)) > 1:
        raise UsageError("--langs, --lang-of-line and --target-lang exclude each other")
    from nmt_moe.checkpoint import load_model
    from nmt_moe.routing import format_report, plot_report, routing_report, to_json

    loaded, tokenizer = load_model(model, device)
    lines = read_text_file(input)
    targets = read_text_file(tgt) if tgt else None
    languages = read_text_file(lang_of_line) if lang_of_line else None
    wanted = [lang.strip() for lang in langs.split(",") if lang.strip()] if langs else []
    report = routing_report(
        loaded, tokenizer, lines, targets=targets, langs=wanted, lang_of_line=languages,
        target_lang=target_lang, max_tokens=max_tokens,
    )  # fmt: skip
    output.mkdir(parents=True, exist_ok=True)
    (output / "routing.json").write_text(json.dumps(to_json(report, tokenizer), ensure_ascii=False))
    plot_report(report, output / "routing.png")
    print(format_report(report, tokenizer, max_experts=max_experts, top=top))
    print(f"\nwrote {output / 'routing.json'} and {output / 'routing.png'}")
    return 0


COMMAND = Command(prog="nmt-moe routing", function=routing,
                  aliases={"-m": "--model", "-i": "--input", "-o": "--output"})  # fmt: skip


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: routing(**parse(COMMAND, argv)))

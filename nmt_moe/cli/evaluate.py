"""`nmt-moe evaluate`: sacreBLEU BLEU and chrF of a hypothesis file, or of a model's translation of a source
file, against one or more references (the scoring itself is `nmt_moe.evaluation`)."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path

from nmt_moe.cli.common import MODEL_ALIASES, set_threads, warn_stderr
from nmt_moe.cli.errors import UsageError, run_command
from nmt_moe.cli.parsing import Command, parse
from nmt_moe.data.text_io import one_line, read_text_file
from nmt_moe.decoding.options import BatchOptions, DecodeOptions
from nmt_moe.evaluation import Scores, format_scores, score


def evaluate(
    ref: list[Path],
    hyp: Path | None = None,
    model: Path | None = None,
    src: Path | None = None,
    output: Path | None = None,
    tokenize: str = "13a",
    json: bool = False,
    target_lang: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    options: DecodeOptions = DecodeOptions(),  # noqa: B008 (frozen)
    batching: BatchOptions = BatchOptions(),  # noqa: B008 (frozen)
) -> int:
    """Score a hypothesis file, or a model's translation of --src, against references with sacreBLEU.

    BLEU and chrF with their signatures; -i HYP or -m MODEL --src SRC, and one or more -r REF.

    Args:
        ref: reference file; repeat for more
        hyp: hypothesis file (detokenised text, one line per reference line)
        model: training checkpoint (.ckpt) or export dir to translate --src with
        src: with -m: source file to translate and score
        output: with -m: also write the translations here (atomically)
        tokenize: sacreBLEU BLEU tokenizer
        json: print one JSON object instead of text
        target_lang: prepend the <2xx> tag (models trained with target_lang_token)
        device: torch device
        threads: torch CPU threads (default: torch's choice)
        options: search settings
        batching: batching settings
    """
    if (hyp is None) == (model is None):
        raise UsageError("give either -i HYP or -m MODEL --src SRC")
    if model is not None and src is None:
        raise UsageError("-m MODEL needs --src SRC (the source text to translate)")
    references = [read_text_file(path) for path in ref]
    if hyp is not None:
        hypotheses = read_text_file(hyp)
    else:
        assert model is not None and src is not None
        hypotheses = translate_file(model, src, output, target_lang, device, threads, options, batching)
    scores = score(hypotheses, references, tokenize=tokenize)
    if json:
        print(jsonlib.dumps(report(scores, hyp or f"{model} on {src}", ref, len(hypotheses)), indent=2))
    else:
        print(format_scores(scores), end="")
    return 0


def translate_file(
    model: Path, src: Path, output: Path | None, target_lang: str | None, device: str, threads: int | None,
    options: DecodeOptions, batching: BatchOptions,
) -> list[str]:  # fmt: skip
    """The best translation of each line of `src`, written to `output` too when given."""
    from nmt_moe.checkpoint import atomic_write, load_model
    from nmt_moe.decoding.translate import translate_lines
    from nmt_moe.model_files import check_output_path

    sources = read_text_file(src)
    if output:
        check_output_path(output)  # before translating, not after
    set_threads(threads)
    loaded, tokenizer = load_model(model, device)
    results = translate_lines(
        loaded, tokenizer, sources, options, max_tokens=batching.max_tokens,
        max_sentences=batching.max_sentences, max_input_tokens=batching.max_input_tokens,
        target_lang=target_lang, progress=True, warn=warn_stderr,
    )  # fmt: skip
    texts = tokenizer.decode([nbest[0].tokens if nbest else [] for nbest in results])
    hypotheses = [one_line(text) for text in texts]
    if output:
        with atomic_write(output, "w", encoding="utf-8") as handle:
            handle.write("".join(h + "\n" for h in hypotheses))
    return hypotheses


def report(scores: Scores, hypotheses: object, references: list[Path], lines: int) -> dict[str, object]:
    return {
        "bleu": scores.bleu, "chrf": scores.chrf, "bleu_signature": scores.bleu_signature,
        "chrf_signature": scores.chrf_signature, "bleu_detail": scores.bleu_detail,
        "hypotheses": str(hypotheses), "references": [str(path) for path in references], "lines": lines,
    }  # fmt: skip


COMMAND = Command(
    prog="nmt-moe evaluate",
    function=evaluate,
    flat={"options": DecodeOptions, "batching": BatchOptions},
    skip=frozenset({"nbest", "experts", "sampling"}),
    aliases={**MODEL_ALIASES, "-i": "--hyp", "-r": "--ref", "-o": "--output"},
)


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: evaluate(**parse(COMMAND, argv)))

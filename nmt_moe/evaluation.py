"""sacreBLEU scoring, shared by validation during training and by `nmt-moe evaluate`.

Hypotheses are detokenised text and references the raw target text: sacreBLEU applies its own
tokenisation (13a by default), which is what makes scores comparable across papers and toolkits.
"""

from __future__ import annotations

from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass(frozen=True)
class Scores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    bleu_detail: str  # e.g. "BLEU = 35.1 67.0/42.1/28.3/19.5 (BP = 1.000 ...)"


def score(hypotheses: list[str], references: list[list[str]] | list[str], tokenize: str = "13a") -> Scores:
    """Corpus BLEU and chrF of `hypotheses` against one or more reference streams.

    `references` is either one list of strings (a single reference per line) or a list of such lists.
    """
    if references and isinstance(references[0], str):
        references = [references]  # type: ignore[list-item]
    for ref in references:
        if len(ref) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} hypotheses but a reference stream has {len(ref)} lines")
    bleu, chrf = BLEU(tokenize=tokenize), CHRF()
    bleu_score = bleu.corpus_score(hypotheses, references)
    chrf_score = chrf.corpus_score(hypotheses, references)
    return Scores(
        bleu=bleu_score.score,
        chrf=chrf_score.score,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        bleu_detail=str(bleu_score),
    )


# --- `nmt-moe evaluate` ------------------------------------------------------------------------------------


def _read_text_lines(path: str) -> list[str]:
    """Line-preserving strict UTF-8 read (the same rules as `nmt-moe translate`)."""
    from pathlib import Path

    from nmt_moe.decoding.translate import read_lines

    return read_lines(Path(path).read_bytes(), path)


def format_scores(scores: Scores) -> str:
    """Human-readable report: each score with its sacreBLEU signature."""
    return (
        f"{scores.bleu_detail}\n  {scores.bleu_signature}\n"
        f"chrF2 = {scores.chrf:.2f}\n  {scores.chrf_signature}\n"
    )


def evaluate_main(argv: list[str]) -> int:
    """Score a hypothesis file, or translate `--src` with `-m MODEL` first, against one or more references."""
    import argparse
    import json
    import sys

    from nmt_moe.decoding.translate import (
        InputError,
        add_decoding_arguments,
        check_decoding_arguments,
        decode_options,
        translate_lines,
        warn_stderr,
    )

    parser = argparse.ArgumentParser(
        prog="nmt-moe evaluate",
        description="sacreBLEU BLEU and chrF (with signatures) of a hypothesis file, or of the translation "
        "of --src by -m MODEL, against one or more reference files.",
    )
    parser.add_argument("-i", "--hyp", help="hypothesis file (detokenised text, one line per reference line)")
    parser.add_argument("-r", "--ref", action="append", required=True, help="reference file; repeat for more")
    parser.add_argument("--src", help="with -m: source file to translate and score")
    parser.add_argument("-o", "--output", help="with -m: also write the translations here (atomically)")
    parser.add_argument("--tokenize", default="13a", help="sacreBLEU BLEU tokenizer (default 13a)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_decoding_arguments(parser)
    args = parser.parse_args(argv)
    if (args.hyp is None) == (args.model is None):
        parser.error("give either -i HYP or -m MODEL --src SRC")
    if args.model is not None and args.src is None:
        parser.error("-m MODEL needs --src SRC (the source text to translate)")
    check_decoding_arguments(parser, args)

    from nmt_moe.checkpoint import ModelLoadError, atomic_write, load_model
    from nmt_moe.model_files import check_output_path

    try:
        references = [_read_text_lines(path) for path in args.ref]
        if args.hyp is not None:
            hypotheses = _read_text_lines(args.hyp)
        else:
            sources = _read_text_lines(args.src)
            if args.output:
                check_output_path(args.output)  # before translating, not after
            if args.threads:
                import torch

                torch.set_num_threads(args.threads)
            model, tokenizer = load_model(args.model, args.device)
            results = translate_lines(
                model, tokenizer, sources, decode_options(args), max_tokens=args.max_tokens,
                max_sentences=args.max_sentences, max_input_tokens=args.max_input_tokens,
                target_lang=args.target_lang, progress=True, warn=warn_stderr,
            )  # fmt: skip
            texts = tokenizer.decode([nbest[0].tokens if nbest else [] for nbest in results])
            hypotheses = [text.replace("\r", " ").replace("\n", " ") for text in texts]
            if args.output:
                with atomic_write(args.output, "w", encoding="utf-8") as handle:
                    handle.write("".join(h + "\n" for h in hypotheses))
        scores = score(hypotheses, references, tokenize=args.tokenize)
    except (InputError, ModelLoadError, OSError, ValueError, KeyError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        report = {
            "bleu": scores.bleu, "chrf": scores.chrf, "bleu_signature": scores.bleu_signature,
            "chrf_signature": scores.chrf_signature, "bleu_detail": scores.bleu_detail,
            "hypotheses": args.hyp or f"{args.model} on {args.src}", "references": args.ref,
            "lines": len(hypotheses),
        }  # fmt: skip
        print(json.dumps(report, indent=2))
    else:
        print(format_scores(scores), end="")
    return 0

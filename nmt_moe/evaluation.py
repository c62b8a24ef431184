"""sacreBLEU scoring, shared by validation during training and by `nmt-moe evaluate`
(nmt_moe/cli/evaluate.py).

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


def format_scores(scores: Scores) -> str:
    """Human-readable report: each score with its sacreBLEU signature."""
    return (
        f"{scores.bleu_detail}\n  {scores.bleu_signature}\n"
        f"chrF2 = {scores.chrf:.2f}\n  {scores.chrf_signature}\n"
    )

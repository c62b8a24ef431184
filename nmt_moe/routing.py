"""Which tokens and which target languages each expert of a trained model receives.

The analysis the MoE papers show (experts that specialise in syntax, punctuation, a language), for any
model: run it over a text file and count, per MoE layer, every (token, expert) assignment.

    nmt-moe routing -m runs/multi30k_en_de/export -i test.en --tgt test.de -o runs/routing
    nmt-moe routing -m runs/multi30k_multilingual/export -i test.en --langs de,fr,cs -o runs/routing

The model reads each source line and is teacher-forced on a target: the reference (`--tgt`) when given,
otherwise its own greedy translation. Encoder MoE layers see source pieces; decoder MoE layers see the
target piece the decoder has just read at that position (`<s>` first). A token visiting k experts counts
once for each, so a layer's counts sum to routed tokens x k.

Languages: `--langs de,fr,cs` routes every line once per target language, prefixed with its `<2xx>` tag;
`--lang-of-line FILE` names each line's language; `--target-lang xx` prefixes one tag to every line;
otherwise a `<2xx>` tag at the start of a line names its language, and untagged lines count as "all".
Writes routing.json (all counts) and routing.png (per layer, each language's share of assignments per
expert) to the report directory, and prints a table.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nmt_moe.data.batching import make_batches, pad_ids
from nmt_moe.data.text_io import encode_sources
from nmt_moe.data.tokenizer import BOS_ID, PAD_ID, Tokenizer, lang_token
from nmt_moe.decoding.greedy import greedy_decode
from nmt_moe.decoding.options import BatchOptions
from nmt_moe.models import Seq2Seq
from nmt_moe.moe import MoELayer

TAG = re.compile(r"^\s*<2([^>\s]+)>")
ALL = "all"


@dataclass
class LayerRouting:
    """Counts of one MoE layer over the whole input."""

    num_experts: int
    experts_per_token: int
    routed_tokens: int = 0
    load: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [E] assignments
    by_language: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [L, E]
    pieces: list[Counter[int]] = field(default_factory=list)  # per expert: piece id -> assignments

    def top_pieces(self, expert: int, tokenizer: Tokenizer, n: int) -> list[tuple[str, int]]:
        return [(tokenizer.sp.id_to_piece(p), c) for p, c in self.pieces[expert].most_common(n)]


@dataclass
class RoutingReport:
    languages: list[str]
    sentences: int
    layers: dict[str, LayerRouting]  # "encoder.moe0", "decoder.moe0", ...


# --- counting ----------------------------------------------------------------------------------------------


@torch.no_grad()
def route(
    model: Seq2Seq,
    sources: Sequence[list[int]],
    languages: Sequence[int],
    num_languages: int,
    targets: Sequence[list[int]] | None = None,
    *,
    max_tokens: int = BatchOptions.max_tokens,
    max_sentences: int = 128,
) -> tuple[dict[str, LayerRouting], int]:
    """Counts per MoE layer for `sources` (ids + EOS, as `encode_sources` makes them; empty = skipped).

    languages[i] is the language index of line i. targets[i] are the target piece ids (no BOS/EOS) to
    teacher-force on; None = the model's own greedy output. Returns the layers and the sentences routed.
    """
    model.eval()
    device = next(model.parameters()).device
    moe_layers = _moe_layers(model)
    stats = {
        name: LayerRouting(
            layer.num_experts,
            layer.experts_per_token,
            load=torch.zeros(layer.num_experts, dtype=torch.long),
            by_language=torch.zeros(num_languages, layer.num_experts, dtype=torch.long),
            pieces=[Counter() for _ in range(layer.num_experts)],
        )
        for name, layer in moe_layers.items()
    }
    keys: dict[str, list[Tensor]] = {name: [] for name in stats}  # expert * V + piece, per assignment
    vocab = model.decoder.output.out_features
    routed = 0
    for batch in make_batches([len(s) for s in sources], max_tokens, max_sentences):
        src = pad_ids([sources[i] for i in batch]).to(device)  # [B, S]
        lengths = torch.tensor([len(sources[i]) for i in batch], device=device)  # [B]
        if targets is None:
            hyps, _ = greedy_decode(model, src, lengths)
        else:
            hyps = [targets[i] for i in batch]
        tgt_in = pad_ids([[BOS_ID, *h] for h in hyps]).to(device)  # [B, T]
        out = model(src, lengths, tgt_in)
        lang = torch.tensor([languages[i] for i in batch], device=device)  # [B]
        for name, moe in out.moe.items():
            tokens = src if name.startswith("encoder") else tgt_in  # [B, L]; PAD exactly where not routed
            rows, cols = (tokens != PAD_ID).nonzero(as_tuple=True)  # row-major: the layer's routing order
            experts = moe.expert_index  # [N, k]
            if experts.shape[0] != rows.shape[0]:
                raise RuntimeError(f"{name}: routed {experts.shape[0]} tokens, expected {rows.shape[0]}")
            valid = experts >= 0  # the batchwise gate pads rows with -1
            piece = tokens[rows, cols].unsqueeze(1).expand_as(experts)[valid]  # [A]
            row_lang = lang[rows].unsqueeze(1).expand_as(experts)[valid]  # [A]
            chosen = experts[valid]  # [A]
            layer = stats[name]
            layer.routed_tokens += int(experts.shape[0])
            E = layer.num_experts
            layer.load += torch.bincount(chosen, minlength=E).cpu()
            layer.by_language += (
                torch.bincount(row_lang * E + chosen, minlength=num_languages * E)
                .view(num_languages, E)
                .cpu()
            )
            keys[name].append((chosen * vocab + piece).cpu())
        routed += len(batch)
    for name, layer in stats.items():
        if keys[name]:
            unique, counts = torch.cat(keys[name]).unique(return_counts=True)
            for key, count in zip(unique.tolist(), counts.tolist(), strict=True):
                layer.pieces[key // vocab][key % vocab] += count
    return stats, routed


def _moe_layers(model: Seq2Seq) -> dict[str, MoELayer]:
    """The model's MoE layers by the names its forward reports them under ("encoder.moe0", ...)."""
    layers = {}
    for side in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(model, side).moe):
            if isinstance(layer, MoELayer):
                layers[f"{side}.moe{i}"] = layer
    if not layers:
        raise ValueError("the model has no MoE layers (ffn is 'dense' or 'none'): nothing to report")
    return layers


def line_languages(
    lines: Sequence[str], lang_of_line: Sequence[str] | None = None
) -> tuple[list[str], list[int]]:
    """(language names, language index per line): from `lang_of_line`, else from `<2xx>` tags (untagged
    lines are "all")."""
    if lang_of_line is not None:
        if len(lang_of_line) != len(lines):
            raise ValueError(
                f"--lang-of-line has {len(lang_of_line)} lines but the input has {len(lines)}: one language "
                "code per input line"
            )
        names = [name.strip() for name in lang_of_line]
    else:
        names = [m[1] if (m := TAG.match(line)) else ALL for line in lines]
    languages = sorted(set(names))
    index = {name: i for i, name in enumerate(languages)}
    return languages, [index[name] for name in names]


def routing_report(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    lines: Sequence[str],
    *,
    targets: Sequence[str] | None = None,
    langs: Sequence[str] = (),
    lang_of_line: Sequence[str] | None = None,
    target_lang: str | None = None,
    max_tokens: int = BatchOptions.max_tokens,
    max_input_tokens: int = BatchOptions.max_input_tokens,
) -> RoutingReport:
    """Route `lines` (once per language of `langs`, tag-prefixed, when given) and count."""
    if targets is not None and len(targets) != len(lines):
        raise ValueError(f"--tgt has {len(targets)} lines but the input has {len(lines)}")
    if langs and (targets is not None or lang_of_line is not None or target_lang):
        raise ValueError("--langs routes every line into each language: it excludes --tgt, --lang-of-line "
                         "and --target-lang")  # fmt: skip
    if langs:
        languages = list(langs)
        sources, line_lang = [], []
        for i, lang in enumerate(languages):
            sources += encode_sources(lines, tokenizer, max_input_tokens=max_input_tokens,
                                      prefix=[_tag_id(tokenizer, lang)])  # fmt: skip
            line_lang += [i] * len(lines)
        target_ids = None
    else:
        prefix = [_tag_id(tokenizer, target_lang)] if target_lang else []
        sources = encode_sources(lines, tokenizer, max_input_tokens=max_input_tokens, prefix=prefix)
        if target_lang and lang_of_line is None:
            languages, line_lang = [target_lang], [0] * len(lines)
        else:
            languages, line_lang = line_languages(lines, lang_of_line)
        target_ids = None if targets is None else tokenizer.encode(list(targets))
        if target_ids is not None:  # a line without a source or without a target is not routed
            sources = [s if t else [] for s, t in zip(sources, target_ids, strict=True)]
    layers, routed = route(model, sources, line_lang, len(languages), target_ids, max_tokens=max_tokens)
    return RoutingReport(languages, routed, layers)


def _tag_id(tokenizer: Tokenizer, lang: str) -> int:
    try:
        return tokenizer.token_id(lang_token(lang))
    except KeyError:
        raise ValueError(
            f"the model's vocabulary has no {lang_token(lang)} tag: was it trained with target_lang_token "
            f"and {lang!r} as a target language?"
        ) from None


# --- output ------------------------------------------------------------------------------------------------


def to_json(report: RoutingReport, tokenizer: Tokenizer, top: int = 20) -> dict[str, Any]:
    return {
        "languages": report.languages,
        "sentences": report.sentences,
        "layers": {
            name: {
                "num_experts": layer.num_experts,
                "experts_per_token": layer.experts_per_token,
                "routed_tokens": layer.routed_tokens,
                "load": layer.load.tolist(),
                "by_language": dict(zip(report.languages, layer.by_language.tolist(), strict=True)),
                "top_pieces": [layer.top_pieces(e, tokenizer, top) for e in range(layer.num_experts)],
            }
            for name, layer in report.layers.items()
        },
    }


def format_report(report: RoutingReport, tokenizer: Tokenizer, max_experts: int = 32, top: int = 8) -> str:
    """Per layer: the most loaded experts with their most frequent pieces; per language: its top experts."""
    lines = [f"{report.sentences} sentences routed; languages: {', '.join(report.languages)}"]
    for name, layer in report.layers.items():
        total = int(layer.load.sum())
        used = int((layer.load > 0).sum())
        lines += [
            "",
            f"{name}: {layer.routed_tokens} tokens x {layer.experts_per_token} experts = {total} "
            f"assignments, {used}/{layer.num_experts} experts used",
            f"  {'expert':>6} {'share':>6}  most frequent pieces (count)",
        ]
        order = torch.argsort(layer.load, descending=True, stable=True)[:max_experts].tolist()
        for e in order:
            if layer.load[e] == 0:
                break
            pieces = " ".join(f"{p}({c})" for p, c in layer.top_pieces(e, tokenizer, top))
            lines.append(f"  {e:>6} {float(layer.load[e]) / max(total, 1):6.1%}  {pieces}")
        if report.languages != [ALL]:
            lines.append(f"  {'lang':>6} {'assign':>8}  top experts (share of the language's assignments)")
            for lang, row in zip(report.languages, layer.by_language, strict=True):
                n = int(row.sum())
                best = torch.argsort(row, descending=True, stable=True)[:6].tolist()
                shares = " ".join(f"{e}:{float(row[e]) / max(n, 1):.0%}" for e in best if row[e] > 0)
                lines.append(f"  {lang:>6} {n:>8}  {shares}")
    return "\n".join(lines)


def plot_report(report: RoutingReport, path: Path) -> None:
    """One heat-map per MoE layer: rows languages, columns experts, colour = share of the language's
    assignments that went to the expert (each row sums to 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.layers)
    height = len(names) * (1.5 + 0.4 * len(report.languages))
    fig, axes = plt.subplots(len(names), 1, figsize=(12, height), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        counts = report.layers[name].by_language.float()  # [L, E]
        share = counts / counts.sum(1, keepdim=True).clamp(min=1)
        image = ax.imshow(share.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(f"{name}: share of each language's assignments per expert")
        ax.set_yticks(range(len(report.languages)), report.languages)
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

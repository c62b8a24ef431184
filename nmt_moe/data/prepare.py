"""What `nmt-moe prepare` (nmt_moe/cli/prepare.py) does: run the data pipeline ahead of training and
summarise it: pairs kept per filter, vocabulary, tokens per side, padding of the batches.
"""

from __future__ import annotations

import time
from typing import Any

from nmt_moe.data.datamodule import TranslationDataModule


def prepare(settings: dict[str, Any]) -> dict[str, Any]:
    """Build (or find in its cache) the data a `TranslationDataModule(**settings)` trains on; its summary."""
    start = time.perf_counter()
    dm = TranslationDataModule(**settings)
    dm.prepare_data()
    dm.setup("fit")
    return summarize(dm, time.perf_counter() - start)


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

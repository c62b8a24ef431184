"""Data pipeline benchmark on Multi30k train (JSON on stdout).

Measures, in one run: SentencePiece training time per model type; encoding time and sentences/s of the
pipeline's `datasets.map` encode against plain batched SentencePiece encoding (the baseline, same run);
padding fraction of token-bucketed batches against unbucketed (random) batches of the same budget; and
the time of a full `prepare` built from scratch and then found in the cache.

    python scripts/bench_data.py [--data ../shared/data/multi30k] [--vocab_size 8000] [--num_proc 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np

from nmt_moe.data.batching import bucket_batches, padding_fraction
from nmt_moe.data.cleaning import CleaningConfig, clean_text
from nmt_moe.data.pipeline import PipelineConfig, _encode_batch, prepare
from nmt_moe.data.sources import load_local
from nmt_moe.data.tokenizer import train_tokenizer


def _timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def _random_batches(src: np.ndarray, tgt: np.ndarray, max_tokens: int, seed: int) -> list[np.ndarray]:
    """Baseline: the same token budget filled in random order, no length bucketing."""
    order = np.random.default_rng(seed).permutation(len(src))
    batches, start, widest = [], 0, 0
    for position, index in enumerate(order.tolist()):
        wider = max(widest, int(max(src[index], tgt[index])))
        if (position - start + 1) * wider > max_tokens:
            batches.append(order[start:position])
            start, wider = position, int(max(src[index], tgt[index]))
        widest = wider
    batches.append(order[start:])
    return batches


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k")
    )
    parser.add_argument("--src_lang", default="en")
    parser.add_argument("--tgt_lang", default="de")
    parser.add_argument("--vocab_size", type=int, default=8000)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--max_tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    args = parser.parse_args(argv)
    prefix = Path(args.data) / "train"
    if not Path(f"{prefix}.{args.src_lang}").exists():
        print(f"no corpus at {prefix}.{args.src_lang}; pass --data", file=sys.stderr)
        return 1
    datasets.disable_progress_bars()
    out: dict = {"corpus": str(prefix), "vocab_size": args.vocab_size, "num_proc": args.num_proc}

    with tempfile.TemporaryDirectory() as tmp:
        raw = load_local(prefix, args.src_lang, args.tgt_lang, cache_dir=Path(tmp) / "raw")
        text, _ = clean_text(raw, CleaningConfig())
        sentences = text["src"][:] + text["tgt"][:]
        out["pairs"] = len(text)

        out["spm_train_seconds"] = {}
        tokenizers = {}
        for model_type in ("bpe", "unigram"):
            tokenizers[model_type], seconds = _timed(
                train_tokenizer, sentences, args.vocab_size, model_type=model_type
            )
            out["spm_train_seconds"][model_type] = round(seconds, 3)
        tok = tokenizers["bpe"]

        _, baseline = _timed(tok.encode, sentences, num_threads=1)
        encoded, seconds = _timed(
            text.map,
            _encode_batch,
            batched=True,
            batch_size=2000,
            num_proc=args.num_proc,
            fn_kwargs={"src_tok": tok, "tgt_tok": tok, "src_prefix": []},
            remove_columns=["src", "tgt"],
            load_from_cache_file=False,
        )
        out["encode"] = {
            "sentences": len(sentences),
            "pipeline_seconds": round(seconds, 3),
            "pipeline_sentences_per_s": round(len(sentences) / seconds),
            "baseline_spm_seconds": round(baseline, 3),
            "baseline_spm_sentences_per_s": round(len(sentences) / baseline),
            "pipeline_over_baseline_speed": round(baseline / seconds, 3),
        }

        numeric = encoded.with_format("numpy")
        src, tgt = np.asarray(numeric["src_len"]), np.asarray(numeric["tgt_len"])
        out["padding"] = {}
        for max_tokens in args.max_tokens:
            bucketed = padding_fraction(
                bucket_batches(src, tgt, max_tokens, np.random.default_rng(0)), src, tgt
            )
            unbucketed = padding_fraction(_random_batches(src, tgt, max_tokens, 0), src, tgt)
            out["padding"][str(max_tokens)] = {
                "bucketed": round(bucketed, 4),
                "random_baseline": round(unbucketed, 4),
                "ratio": round(bucketed / unbucketed, 3),
            }

        config = PipelineConfig(
            src_lang=args.src_lang,
            tgt_lang=args.tgt_lang,
            train=(str(prefix),),
            vocab_size=args.vocab_size,
            spm_model_type="bpe",
        )
        built, build_seconds = _timed(prepare, config, Path(tmp) / "cache", args.num_proc)
        hit, hit_seconds = _timed(prepare, config, Path(tmp) / "cache", args.num_proc)
        assert not built.from_cache and hit.from_cache
        out["prepare_seconds"] = {"build": round(build_seconds, 3), "cache_hit": round(hit_seconds, 4)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

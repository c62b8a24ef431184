"""Translation speed on Multi30k test_2016_flickr: greedy and beam 5, batched vs one sentence at a time,
float32 vs int8, and (where a GPU is present) beam 5 in bf16 on CUDA.

Prints one JSON object. Every ratio compares runs measured in this process, in this run:
  * `batched_over_unbatched`: sentences/s with batches of `--batch-sentences` over batches of 1, measured
    on the same first `--unbatched-sentences` sentences (one at a time is slow, so a subset);
  * `int8_over_float32`: the same model after `nmt_moe.decoding.int8.quantize_int8` (`translate --int8`),
    measured right after the float32 one.
There is no peer baseline here: a figure measured on another day or machine would not be comparable.
scripts/bench_opennmt.py trains and times OpenNMT-py beside nmt-moe in one run.
Timings exclude start-up and model loading but include SentencePiece encoding and decoding to text; each
is the median of `--repeats` passes after one warm-up pass.
`startup_s` is measured separately: a fresh `nmt-moe translate` process from start to its first output line.

Without `--model`, a random-weight model of the reference size is built (2-layer 256-unit LSTMs, `--ffn none`
by default, a SentencePiece vocabulary of 8k trained on Multi30k train in about a second). Speed does not
depend on the weights except through output lengths; random weights rarely emit EOS, so the maximum output
length is capped at the source length (max_len_a=1, max_len_b=0), close to real target lengths, and the
JSON reports the target tokens produced. Prefer `--model` with a trained checkpoint when one exists.

    python scripts/bench_translate.py [--model CKPT_OR_DIR] [--threads 2] [--unbatched-sentences 200]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nmt_moe.checkpoint import export_bundle, load_model, save_checkpoint
from nmt_moe.data.text_io import encode_sources
from nmt_moe.data.tokenizer import Tokenizer, train_tokenizer
from nmt_moe.decoding.int8 import quantize_int8
from nmt_moe.decoding.options import DecodeOptions
from nmt_moe.decoding.translate import translate_sources
from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.models.seq2seq import parameter_counts
from nmt_moe.moe import MoEConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "multi30k"


def random_model(data: Path, src: str, tgt: str, ffn: str) -> tuple[Seq2Seq, Tokenizer]:
    """Reference-size model with random weights and an 8k joint SentencePiece vocabulary."""
    lines = []
    for lang in (src, tgt):
        lines += (data / f"train.{lang}").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer(lines, 8000, model_type="bpe")
    torch.manual_seed(0)
    model = Seq2Seq(Seq2SeqConfig(
        vocab_size=tokenizer.vocab_size, embed_dim=256, hidden_size=256, encoder_layers=2, decoder_layers=2,
        attention="general", input_feeding=True, dropout=0.0, ffn=ffn,
        moe=MoEConfig(num_experts=8, k=2, d_hidden=512),
    ))  # fmt: skip
    return model.eval(), tokenizer


def measure(
    model: Any,
    tokenizer: Tokenizer,
    lines: list[str],
    options: DecodeOptions,
    batch_sentences: int,
    max_tokens: int = 10**9,
    repeats: int = 1,
) -> dict:
    """End-to-end time (encode, search, decode to text) of `lines`: the median of `repeats` passes after
    one untimed warm-up pass. `translate_sources` runs greedy search for beam 1 without penalties."""
    times = []
    for run in range(repeats + 1):
        start = time.perf_counter()
        sources = encode_sources(lines, tokenizer, max_input_tokens=1024)
        results = translate_sources(
            model, sources, options, max_tokens=max_tokens, max_sentences=batch_sentences
        )
        outputs = [nbest[0].tokens for nbest in results]
        tokenizer.decode(outputs)
        if run:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    target_tokens = sum(map(len, outputs))
    return {
        "sentences": len(lines),
        "seconds": round(seconds, 3),
        "seconds_all_runs": [round(t, 3) for t in times],
        "sentences_per_s": round(len(lines) / seconds, 1),
        "target_tokens_per_s": round(target_tokens / seconds, 1),
        "mean_target_tokens": round(target_tokens / len(lines), 2),
        "load_average": os.getloadavg(),
    }


def cuda_bf16_beam5(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    lines: list[str],
    options: DecodeOptions,
    batch_sentences: int,
    repeats: int,
) -> dict:
    """Beam 5 under bf16 autocast on the first CUDA device, or why it was not measured."""
    if not torch.cuda.is_available():
        return {"measured": False, "reason": "no CUDA device in this run"}
    gpu = copy.deepcopy(model).to("cuda")
    bf16 = dataclasses.replace(options, bf16=True)
    result = measure(gpu, tokenizer, lines, bf16, batch_sentences, repeats=repeats)
    return {"measured": True, "device": torch.cuda.get_device_name(0), **result}


def startup_time(bundle: Path, line: str, options: DecodeOptions, threads: int) -> dict:
    """Seconds from launching `nmt-moe translate` to its first output line (import, load, one sentence)."""
    argv = [sys.executable, "-m", "nmt_moe.cli", "translate", "-m", str(bundle), "--beam", "5",
            "--max-len-a", str(options.max_len_a), "--max-len-b", str(options.max_len_b),
            "--threads", str(threads)]  # fmt: skip
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((line + "\n").encode())
        proc.stdin.close()
        proc.stdout.readline()
        timings.append(time.perf_counter() - start)
        proc.wait()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return {
        "startup_s": round(min(timings), 3),
        "python_import_torch_s": round(time.perf_counter() - start, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, help="checkpoint or export dir (default: random reference size)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--src", default="en")
    parser.add_argument("--tgt", default="de")
    parser.add_argument("--ffn", default="none", choices=("none", "dense", "moe"), help="random model only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sentences", type=int, default=64)
    parser.add_argument("--unbatched-sentences", type=int, default=200)
    parser.add_argument("--limit", type=int, default=None, help="test sentences (default all)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed passes per measurement; the median counts"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.model:
        model, tokenizer = load_model(args.model)
        options = {"greedy": DecodeOptions(beam_size=1, alpha=0.0), "beam5": DecodeOptions(beam_size=5)}
        source = str(args.model)
    else:
        model, tokenizer = random_model(args.data, args.src, args.tgt, args.ffn)
        capped = dict(max_len_a=1.0, max_len_b=0)
        options = {"greedy": DecodeOptions(beam_size=1, alpha=0.0, **capped),
                   "beam5": DecodeOptions(beam_size=5, **capped)}  # fmt: skip
        source = f"random weights, ffn={args.ffn} (output capped at source length)"
    lines = (
        (args.data / f"test_2016_flickr.{args.src}").read_text(encoding="utf-8").splitlines()[: args.limit]
    )
    subset = lines[: args.unbatched_sentences]

    int8 = quantize_int8(copy.deepcopy(model))
    results: dict[str, dict] = {}
    for name in ("greedy", "beam5"):
        opts, reps = options[name], args.repeats
        full = measure(model, tokenizer, lines, opts, args.batch_sentences, repeats=reps)
        full_int8 = measure(int8, tokenizer, lines, opts, args.batch_sentences, repeats=reps)
        cli_default = measure(model, tokenizer, lines, opts, 256, max_tokens=4096, repeats=reps)
        batched = measure(model, tokenizer, subset, opts, args.batch_sentences, repeats=reps)
        alone = measure(model, tokenizer, subset, opts, 1, repeats=reps)
        results[name] = {
            "batched_full_test_set": full,
            "batched_full_test_set_int8": full_int8,
            "cli_default_batching_full_test_set": cli_default,
            "batched_subset": batched,
            "unbatched_subset": alone,
            "batched_over_unbatched": round(batched["sentences_per_s"] / alone["sentences_per_s"], 2),
            "int8_over_float32": round(full_int8["sentences_per_s"] / full["sentences_per_s"], 2),
        }
    results["beam5_bf16_cuda"] = cuda_bf16_beam5(
        model, tokenizer, lines, options["beam5"], args.batch_sentences, args.repeats
    )

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "bench.ckpt"
        save_checkpoint(checkpoint, model, tokenizer)
        bundle = export_bundle(checkpoint, Path(tmp) / "bundle")
        startup = startup_time(bundle, lines[0], options["beam5"], args.threads)

    machine = {
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "default"),
        "load_average_at_end": os.getloadavg(),
    }
    report = {
        "benchmark": "translate",
        "machine": machine,
        "model": {"source": source, "parameters": parameter_counts(model), "vocab_size": tokenizer.vocab_size,
                  "config": model.config},
        "data": f"{args.data.name}/test_2016_flickr.{args.src} ({len(lines)} sentences)",
        "batch_sentences": args.batch_sentences,
        "results": results,
        "startup": startup,
        "targets": {"beam5_batched_over_unbatched": ">= 5"},
        "peer_comparison": "none here; scripts/bench_opennmt.py measures OpenNMT-py in the same run",
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

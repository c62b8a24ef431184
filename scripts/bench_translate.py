"""Translation speed on Multi30k test_2016_flickr: greedy and beam 5, batched vs one sentence at a time.

Prints one JSON object. Every ratio compares runs of the same model in the same process:
  * `batched_over_unbatched`: sentences/s with batches of `--batch-sentences` over batches of 1, measured
    on the same first `--unbatched-sentences` sentences (one at a time is slow, so a subset);
  * `over_opennmt`: batched sentences/s on the whole test set over OpenNMT-py 3.5.1's numbers measured on
    this machine (2-layer 256-unit LSTM, 8k vocab, 8.5M parameters, batches of 64, 2 threads: beam 5 98
    sentences/s and 1,295 target tokens/s, greedy 217 sentences/s; see shared/notes/libraries.md).
Timings exclude start-up and model loading but include SentencePiece encoding and decoding to text.
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
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nmt_moe.checkpoint import export_bundle, load_model, save_checkpoint
from nmt_moe.data.tokenizer import Tokenizer, train_tokenizer
from nmt_moe.decoding.greedy import greedy_decode
from nmt_moe.decoding.translate import DecodeOptions, encode_sources, make_batches, translate_sources
from nmt_moe.models import Seq2Seq
from nmt_moe.models.seq2seq import parameter_counts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "multi30k"
OPENNMT = {
    "beam5": {"sentences_per_s": 98.0, "target_tokens_per_s": 1295.0},
    "greedy": {"sentences_per_s": 217.0},
}


def random_model(data: Path, src: str, tgt: str, ffn: str) -> tuple[Seq2Seq, Tokenizer]:
    """Reference-size model with random weights and an 8k joint SentencePiece vocabulary."""
    lines = []
    for lang in (src, tgt):
        lines += (data / f"train.{lang}").read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer(lines, 8000, model_type="bpe")
    torch.manual_seed(0)
    model = Seq2Seq(
        vocab_size=tokenizer.vocab_size, embed_dim=256, hidden_size=256, encoder_layers=2, decoder_layers=2,
        attention="general", input_feeding=True, dropout=0.0, ffn=ffn, num_experts=8, k=2, d_hidden=512,
    )  # fmt: skip
    return model.eval(), tokenizer


def run_greedy(
    model: Seq2Seq, sources: list[list[int]], options: DecodeOptions, batch_sentences: int, max_tokens: int
) -> list[list[int]]:
    """greedy_decode (the model engineer's batched greedy search) with the same batching as translate."""
    outputs: list[list[int]] = [[] for _ in sources]
    for batch in make_batches([len(s) for s in sources], max_tokens, batch_sentences):
        lengths = torch.tensor([len(sources[i]) for i in batch])
        src = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
        for row, i in enumerate(batch):
            src[row, : len(sources[i])] = torch.tensor(sources[i])
        tokens, _ = greedy_decode(
            model, src, lengths, max_len_a=options.max_len_a, max_len_b=options.max_len_b
        )
        for i, toks in zip(batch, tokens, strict=True):
            outputs[i] = toks
    return outputs


def measure(
    model: Seq2Seq,
    tokenizer: Tokenizer,
    lines: list[str],
    mode: str,
    options: DecodeOptions,
    batch_sentences: int,
    max_tokens: int = 10**9,
    repeats: int = 1,
) -> dict:
    """End-to-end time (encode, search, decode to text) of `lines`; the fastest of `repeats` runs, since a
    shared machine only ever adds time."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sources = encode_sources(lines, tokenizer, max_input_tokens=1024)
        if mode == "greedy":
            outputs = run_greedy(model, sources, options, batch_sentences, max_tokens)
        else:
            results = translate_sources(
                model, sources, options, max_tokens=max_tokens, max_sentences=batch_sentences
            )
            outputs = [nbest[0].tokens for nbest in results]
        tokenizer.decode(outputs)
        times.append(time.perf_counter() - start)
    seconds = min(times)
    target_tokens = sum(map(len, outputs))
    return {
        "sentences": len(lines),
        "seconds": round(seconds, 3),
        "seconds_all_runs": [round(t, 3) for t in times],
        "sentences_per_s": round(len(lines) / seconds, 1),
        "target_tokens_per_s": round(target_tokens / seconds, 1),
        "mean_target_tokens": round(target_tokens / len(lines), 2),
    }


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
    parser.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest counts")
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

    measure(
        model, tokenizer, lines[:16], "beam", options["beam5"], args.batch_sentences, repeats=args.repeats
    )  # warm-up
    results: dict[str, dict] = {}
    for name in ("greedy", "beam5"):
        mode = "greedy" if name == "greedy" else "beam"
        full = measure(
            model, tokenizer, lines, mode, options[name], args.batch_sentences, repeats=args.repeats
        )
        cli_default = measure(
            model, tokenizer, lines, mode, options[name], 256, max_tokens=4096, repeats=args.repeats
        )
        batched = measure(
            model, tokenizer, subset, mode, options[name], args.batch_sentences, repeats=args.repeats
        )
        alone = measure(model, tokenizer, subset, mode, options[name], 1, repeats=args.repeats)
        results[name] = {
            "batched_full_test_set": full,
            "cli_default_batching_full_test_set": cli_default,
            "batched_subset": batched,
            "unbatched_subset": alone,
            "batched_over_unbatched": round(batched["sentences_per_s"] / alone["sentences_per_s"], 2),
            "over_opennmt": round(full["sentences_per_s"] / OPENNMT[name]["sentences_per_s"], 2),
            "cli_default_over_opennmt": round(
                cli_default["sentences_per_s"] / OPENNMT[name]["sentences_per_s"], 2
            ),
        }
    # greedy through beam_search (beam 1), to show what the general search costs over plain greedy
    results["beam1_via_beam_search"] = measure(
        model, tokenizer, lines, "beam", options["greedy"], args.batch_sentences, repeats=args.repeats
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
        "opennmt_reference": OPENNMT,
        "targets": {"beam5_batched_over_unbatched": ">= 5", "beam5_over_opennmt": ">= 1.5"},
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

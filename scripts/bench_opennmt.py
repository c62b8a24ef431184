"""nmt-moe against OpenNMT-py 3.5.1 on the same machine, data and model size, in one run.

Both toolkits train through their real entry points (`onmt_train`, `nmt-moe train fit`) the reference model
of issues 4 and 5: a 2-layer 256-unit LSTM encoder-decoder with general (Luong) attention and a joint 8k BPE
SentencePiece vocabulary on Multi30k en-de, batches of --batch-tokens tokens (batch size x longest side,
both toolkits' rule), no validation. Training speed is source + target tokens/s over the last half of the
steps, from each toolkit's own log. Ours runs in every variant a user may pick: with and without input
feeding (OpenNMT-py always feeds), float32 and bf16-mixed (OpenNMT-py has no CPU bf16); it also decodes
in float32 and under `--bf16`.

Then each trained model translates test_2016_flickr (beam 5 and greedy, 64 sentences per batch) with every
output forced to exactly --output-length tokens (min = max length in both toolkits), so both decoders do the
same work whatever their few training steps taught them. Times exclude start-up and model loading
(OpenNMT-py's own `-report_time`; ours times `translate_lines` in this process).

OpenNMT-py pins torch<2.3, so it lives in its own virtual environment (see ../shared/notes/libraries.md):

    python -m venv onmt-venv && onmt-venv/bin/pip install torch==2.13.0 \
      && onmt-venv/bin/pip install --no-deps OpenNMT-py==3.5.1 && onmt-venv/bin/pip install configargparse \
         pyyaml sacrebleu sentencepiece six "pyonmttok>=1.37,<2" spacy rapidfuzz pyahocorasick fasttext-wheel
    python scripts/bench_opennmt.py --onmt-python onmt-venv/bin/python
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "multi30k"
ONMT_REPORT = re.compile(r"Step\s+(\d+)/.*?(\d+)/\s*(\d+) tok/s")
ONMT_PARAMS = re.compile(r"\* number of parameters: (\d+)")
MODES = (("beam5", 5), ("greedy", 1))
LANGS = ("en", "de")
ONMT_TIME = re.compile(r"Total translation time \(s\): ([\d.]+)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onmt-python", type=Path, required=True, help="python of the OpenNMT-py venv")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--steps", type=int, default=40, help="training steps per model")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-length", type=int, default=14, help="tokens per translation (both)")
    parser.add_argument("--limit", type=int, default=None, help="test sentences (default all 1,000)")
    parser.add_argument("--work", type=Path, default=None, help="keep files here (default a temp dir)")
    args = parser.parse_args()
    if not (args.data / "train.en").exists():
        sys.exit(f"bench_opennmt: no Multi30k at {args.data}")
    if subprocess.run([str(args.onmt_python), "-c", "import onmt"], capture_output=True).returncode:
        sys.exit(f"bench_opennmt: {args.onmt_python} cannot import onmt; see --help for the venv recipe")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args, work), indent=2))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    lines = (args.data / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[: args.limit]
    onmt = train_opennmt(args, work / "onmt")
    ours = {
        f"nmt_moe_{feed}_{precision}": train_ours(args, work / f"ours_{feed}_{precision}", feed, precision)
        for feed in ("input_feeding", "no_input_feeding")
        for precision in ("32-true", "bf16-mixed")
    }
    checkpoint = onmt.pop("checkpoint")
    onmt["translate"] = {mode: translate_opennmt(args, checkpoint, beam) for mode, beam in MODES}
    for name, result in ours.items():
        export = result.pop("export")
        if name.endswith("32-true"):  # how a model was trained does not change how fast it decodes
            result["translate"] = {
                f"{mode}{suffix}": translate_ours(args, export, lines, beam, bf16)
                for mode, beam in MODES
                for suffix, bf16 in (("", False), ("_bf16", True))
            }
    base_train = onmt["train_tokens_per_s"]
    summary = {}
    for name, result in ours.items():
        summary[name] = {"train_vs_opennmt": round(result["train_tokens_per_s"] / base_train, 2)}
        for mode, speed in result.get("translate", {}).items():
            theirs = onmt["translate"][mode.removesuffix("_bf16")]["sentences_per_s"]
            summary[name][f"{mode}_vs_opennmt"] = round(speed["sentences_per_s"] / theirs, 2)
    return {
        "setup": {
            "threads": args.threads,
            "steps": args.steps,
            "batch_tokens": args.batch_tokens,
            "output_length": args.output_length,
            "test_sentences": len(lines),
        },
        "opennmt_py": onmt,
        **ours,
        "ratios": summary,
    }


# --- OpenNMT-py --------------------------------------------------------------------------------------------


def train_opennmt(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """SentencePiece-encode the corpus, build the vocabulary, train; tokens/s from its step reports."""
    import sentencepiece as spm

    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "spm_input.txt"
    corpus.write_text("".join((args.data / f"train.{lang}").read_text(encoding="utf-8") for lang in LANGS))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "spm"), vocab_size=8000, model_type="bpe",
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    for split in ("train", "val", "test_2016_flickr"):
        for lang in LANGS:
            text = (args.data / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
            pieces = [" ".join(p) for p in sp.encode(text, out_type=str)]
            if split == "test_2016_flickr":
                pieces = pieces[: args.limit]
            (work / f"{split}.sp.{lang}").write_text("\n".join(pieces) + "\n")
    config = {
        "save_data": str(work / "data"),
        "src_vocab": str(work / "vocab.txt"),
        "share_vocab": True,
        "overwrite": True,
        "data": {
            "corpus_1": {"path_src": str(work / "train.sp.en"), "path_tgt": str(work / "train.sp.de")},
            "valid": {"path_src": str(work / "val.sp.en"), "path_tgt": str(work / "val.sp.de")},
        },
        "encoder_type": "brnn",
        "decoder_type": "rnn",
        "rnn_type": "LSTM",
        "layers": 2,
        "hidden_size": 256,
        "word_vec_size": 256,
        "global_attention": "general",
        "input_feed": 1,
        "share_embeddings": True,
        "dropout": [0.3],
        "optim": "adam",
        "learning_rate": 0.002,
        "label_smoothing": 0.1,
        "batch_type": "tokens",
        "batch_size": args.batch_tokens,
        "bucket_size": 29000,  # one pass over Multi30k; the default holds ~9 copies in memory
        "train_steps": args.steps,
        "valid_steps": 10 * args.steps,  # never validates
        "report_every": max(1, min(10, args.steps // 4)),
        "save_checkpoint_steps": args.steps,
        "save_model": str(work / "model"),
        "seed": 1234,
        "world_size": 1,
        "gpu_ranks": [],
    }
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    onmt = [str(args.onmt_python), "-m"]
    build_vocab = [*onmt, "onmt.bin.build_vocab", "-config", str(work / "config.yaml"), "-n_sample", "-1"]
    subprocess.run(build_vocab, check=True, capture_output=True)
    log = subprocess.run(
        [*onmt, "onmt.bin.train", "-config", str(work / "config.yaml")], capture_output=True, text=True
    )
    (work / "train.log").write_text(log.stdout + log.stderr)
    if log.returncode:
        raise RuntimeError(f"onmt_train failed; see {work / 'train.log'}")
    reports = [(int(s), int(a) + int(b)) for s, a, b in ONMT_REPORT.findall(log.stderr + log.stdout)]
    late = [rate for step, rate in reports if step > args.steps // 2]
    params = ONMT_PARAMS.search(log.stderr + log.stdout)
    checkpoint = work / f"model_step_{args.steps}.pt"
    return {
        "parameters": int(params.group(1)) if params else None,
        "train_tokens_per_s": round(statistics.mean(late)),
        "train_reports": reports,
        "checkpoint": checkpoint,
    }


def translate_opennmt(args: argparse.Namespace, checkpoint: Path, beam: int) -> dict[str, Any]:
    work = checkpoint.parent
    out = work / f"hyp.beam{beam}.sp.de"
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # its checkpoints are pickles
    log = subprocess.run(
        [str(args.onmt_python), "-m", "onmt.bin.translate", "-model", str(checkpoint),
         "-src", str(work / "test_2016_flickr.sp.en"), "-output", str(out), "-beam_size", str(beam),
         "-batch_size", "64", "-batch_type", "sents", "-min_length", str(args.output_length),
         "-max_length", str(args.output_length), "-report_time", "-gpu", "-1"],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if log.returncode:
        raise RuntimeError(f"onmt_translate failed:\n{log.stderr[-2000:]}")
    seconds = float(ONMT_TIME.search(log.stdout + log.stderr).group(1))
    outputs = out.read_text(encoding="utf-8").splitlines()
    return rates(len(outputs), sum(len(line.split()) for line in outputs), seconds)


# --- nmt-moe -----------------------------------------------------------------------------------------------


def train_ours(args: argparse.Namespace, work: Path, feed: str, precision: str) -> dict[str, Any]:
    """`nmt-moe train fit` at the same size; tokens/s from our TokensPerSecond callback (second half)."""
    work.mkdir(parents=True, exist_ok=True)
    config = {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": precision, "max_steps": args.steps,
            "max_epochs": None, "limit_val_batches": 0, "log_every_n_steps": min(10, args.steps),
            "enable_progress_bar": False, "default_root_dir": str(work),
        },
        "model": {
            "model": {
                "class_path": "nmt_moe.models.Seq2Seq",
                "init_args": {
                    "embed_dim": 256, "hidden_size": 256, "encoder_layers": 2, "decoder_layers": 2,
                    "attention": "general", "input_feeding": feed == "input_feeding", "dropout": 0.3,
                    "tie_embeddings": True, "share_embeddings": True, "ffn": "none",
                },
            },
            "optimizer": "adam", "lr": 0.002, "warmup_steps": 0, "schedule": "constant",
            "max_steps": args.steps, "label_smoothing": 0.1,
        },
        "data": {
            "src_lang": "en", "tgt_lang": "de", "train": str(args.data / "train"),
            "valid": str(args.data / "val"), "vocab_size": 8000, "spm_model_type": "bpe", "joint_vocab": True,
            "max_tokens": args.batch_tokens, "cache_dir": str(work / "cache"), "num_workers": 0,
        },
        "throughput": {"window": max(1, args.steps // 2)},  # the second half of the run, as for OpenNMT-py
    }  # fmt: skip
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    nmt_moe = [sys.executable, "-m", "nmt_moe.cli"]
    train = [*nmt_moe, "train", "fit", "--config", str(work / "config.yaml"), "--wandb", "off"]
    log = subprocess.run(train, capture_output=True, text=True)
    (work / "train.log").write_text(log.stdout + log.stderr)
    if log.returncode:
        raise RuntimeError(f"nmt-moe train failed; see {work / 'train.log'}")
    metrics = next(work.glob("**/metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/tok_s")]
    checkpoint = next(work.glob("**/checkpoints/last.ckpt"))
    subprocess.run(
        [*nmt_moe, "export", str(checkpoint), "-o", str(work / "export")], check=True, capture_output=True
    )
    from nmt_moe.checkpoint import load_model
    from nmt_moe.models import parameter_counts

    model, _ = load_model(work / "export")
    return {
        "parameters": parameter_counts(model)["total"],
        "train_tokens_per_s": round(float(rows[-1]["train/tok_s"])),
        "export": work / "export",
    }


def translate_ours(
    args: argparse.Namespace, export: Path, lines: list[str], beam: int, bf16: bool
) -> dict[str, Any]:
    import torch

    from nmt_moe.checkpoint import load_model
    from nmt_moe.decoding.translate import DecodeOptions, translate_lines

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(export)
    length = args.output_length
    options = DecodeOptions(
        beam_size=beam, alpha=0.0, max_len_a=0.0, max_len_b=length, min_len=length, bf16=bf16
    )
    timings = []
    for _ in range(2):  # the faster of two runs: a shared machine only ever adds time
        start = time.perf_counter()
        with torch.inference_mode():
            results = translate_lines(model, tokenizer, lines, options, max_sentences=64, max_tokens=10**9)
            text = [tokenizer.decode([nbest[0].tokens])[0] for nbest in results]
        timings.append(time.perf_counter() - start)
    tokens = sum(len(nbest[0].tokens) for nbest in results)
    assert len(text) == len(lines)
    return rates(len(lines), tokens, min(timings))


def rates(sentences: int, tokens: int, seconds: float) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 2),
        "sentences_per_s": round(sentences / seconds, 1),
        "target_tokens_per_s": round(tokens / seconds),
        "mean_target_tokens": round(tokens / sentences, 2),
    }


if __name__ == "__main__":
    main()

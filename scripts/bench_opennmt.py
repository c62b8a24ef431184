"""nmt-moe against OpenNMT-py 3.5.1 like for like: same network, same data, same timing rule, in one run.

The network, on both sides: a 2-layer encoder with every layer bidirectional (OpenNMT-py's `brnn`; ours
with `encoder_bidirectional: all`), 256 units, a 1-layer LSTM decoder with input feeding and general (Luong)
attention, the output layer tied to the shared source/target embedding, float32, a joint 8k BPE
SentencePiece vocabulary on Multi30k en-de. One decoder layer because that is where both toolkits build the
same decoder: with more, OpenNMT-py attends from the top layer and feeds the context to nothing above,
ours (GNMT) attends from the bottom layer and feeds the context to every layer above (a different network,
6% more parameters at 2 layers). The JSON reports both parameter counts; they must agree within 2%.

Timing rule, both sides: each toolkit is loaded once in its own process, translates the test set once
untimed (warm-up), then --runs timed times; the median counts. Times exclude start-up and model loading
and include batching and turning ids into text (ours also SentencePiece-encodes raw text; OpenNMT-py reads
pre-encoded pieces). Batches of 64 sentences, --threads threads. Training speed: source + target tokens/s
in 10-step windows from each toolkit's own log; the median over the second half of the run counts.

Two output-length regimes: `forced` (every output exactly --output-length tokens: min = max length on
both sides, so both decoders do the same work whatever their training taught them) and `natural` (the
models stop at EOS; trained --steps >= 300 steps they translate, and the JSON gives BLEU and mean lengths;
max length 1.5 x source length + 5 on both sides, OpenNMT-py per batch, ours per sentence; no length
penalty). `like_for_like` holds the forced-length ratios (ours over OpenNMT-py), `like_for_like_natural`
the natural ones; `int8_*` is ours with `--int8` over OpenNMT-py in float32. `fastest_setting` is not like
for like and says so: ours with `--bf16` against OpenNMT-py's float32 (its fastest CPU setting).

OpenNMT-py pins torch<2.3, so it lives in its own virtual environment (see ../shared/notes/libraries.md;
`--system-site-packages` reuses this environment's torch):

    python -m venv --system-site-packages onmt-venv
    onmt-venv/bin/pip install --no-deps OpenNMT-py==3.5.1
    onmt-venv/bin/pip install configargparse pyyaml sacrebleu sentencepiece six "pyonmttok>=1.37,<2" \\
      spacy rapidfuzz pyahocorasick fasttext-wheel
    python scripts/bench_opennmt.py --onmt-python onmt-venv/bin/python --steps 300
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
REPORT_EVERY = 10
MAX_LEN_RATIO, MAX_LEN_PLUS = 1.5, 5  # natural lengths, both sides

# Runs inside the OpenNMT-py venv: load each configuration once, translate warm-up + N timed passes.
ONMT_DRIVER = r"""
import json, os, sys, time
import torch
from onmt.inference_engine import InferenceEnginePY
from onmt.opts import translate_opts
from onmt.utils.parse import ArgumentParser
spec = json.loads(open(sys.argv[1]).read())
torch.set_num_threads(spec["threads"])
lines = open(spec["src"], encoding="utf-8").read().splitlines()
results = {}
for name, extra in spec["configs"].items():
    parser = ArgumentParser(); translate_opts(parser)
    opt = parser.parse_args(["-model", spec["model"], "-src", spec["src"], "-output", spec["output"],
                             "-gpu", "-1", "-batch_size", "64", "-batch_type", "sents", *extra])
    ArgumentParser.validate_translate_opts(opt); ArgumentParser._get_all_transform_translate(opt)
    ArgumentParser._validate_transforms_opts(opt); ArgumentParser.validate_translate_opts_dynamic(opt)
    engine = InferenceEnginePY(opt)
    times = []
    for _ in range(spec["runs"] + 1):
        start = time.perf_counter()
        _, preds = engine.infer_list(lines)
        times.append(time.perf_counter() - start)
    results[name] = {"seconds": times[1:], "warmup_s": times[0], "outputs": [p[0] for p in preds],
                     "load": os.getloadavg()}
json.dump(results, open(spec["result"], "w"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onmt-python", type=Path, required=True, help="python of the OpenNMT-py venv")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--steps", type=int, default=300, help="training steps per model (>= 300 to translate)"
    )
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="timed passes per measurement (after a warm-up)")
    parser.add_argument("--output-length", type=int, default=14, help="tokens per translation, forced regime")
    parser.add_argument("--limit", type=int, default=None, help="test sentences (default all 1,000)")
    parser.add_argument("--work", type=Path, default=None, help="keep files here (default a temp dir)")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="translate only, with the models an earlier run left in --work (trained --steps steps); the "
        "JSON then has no training ratio",
    )
    args = parser.parse_args()
    if args.reuse and args.work is None:
        print("bench_opennmt: --reuse needs --work (the directory of an earlier run)", file=sys.stderr)
        sys.exit(2)
    if not (args.data / "train.en").exists():
        print(f"bench_opennmt: no Multi30k at {args.data}", file=sys.stderr)
        sys.exit(2)
    if subprocess.run([str(args.onmt_python), "-c", "import onmt"], capture_output=True).returncode:
        print(f"bench_opennmt: {args.onmt_python} cannot import onmt; see --help", file=sys.stderr)
        sys.exit(2)
    if args.steps < 2 * REPORT_EVERY or args.runs < 1:
        print(f"bench_opennmt: --steps must be >= {2 * REPORT_EVERY} and --runs >= 1", file=sys.stderr)
        sys.exit(2)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(args, work), indent=2))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    lines = (args.data / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[: args.limit]
    refs = (args.data / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[: args.limit]
    loads = {"start": os.getloadavg()}
    if args.reuse:
        onmt, ours = reused_models(args, work)
    else:
        onmt = train_opennmt(args, work / "onmt")
        loads["after_onmt_train"] = os.getloadavg()
        ours = train_ours(args, work / "ours")
        loads["after_ours_train"] = os.getloadavg()
    ours["translate"] = translate_ours(args, ours.pop("export"), lines, refs)
    loads["after_ours_translate"] = os.getloadavg()
    onmt["translate"] = translate_opennmt(args, onmt.pop("checkpoint"), work / "onmt", refs)
    loads["after_onmt_translate"] = os.getloadavg()
    return {
        "setup": {
            "threads": args.threads, "steps": args.steps, "batch_tokens": args.batch_tokens,
            "output_length": args.output_length, "test_sentences": len(lines), "runs": args.runs,
            "timing": "median of --runs warm passes each side; training: median 10-step window, 2nd half",
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "default"), "load_average": loads,
        },
        "parameters": {"ours": ours["parameters"], "opennmt_py": onmt["parameters"],
                       "ratio": round(ours["parameters"] / onmt["parameters"], 4)},
        "opennmt_py": onmt,
        "nmt_moe": ours,
        "like_for_like": ratios(ours, onmt, "forced"),
        "like_for_like_natural": ratios(ours, onmt, "natural"),
        "fastest_setting": fastest_setting(ours, onmt),
    }  # fmt: skip


def reused_models(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoints of an earlier run in `work` (--reuse): parameters, no training figures."""
    from nmt_moe.checkpoint import load_model
    from nmt_moe.models import parameter_counts

    checkpoint, export = work / "onmt" / f"model_step_{args.steps}.pt", work / "ours" / "export"
    if not checkpoint.exists() or not export.exists():
        print(f"bench_opennmt: --reuse found no {checkpoint} or {export}", file=sys.stderr)
        sys.exit(2)
    encode_test_set(args, work / "onmt")  # this run's --limit
    log = (work / "onmt" / "train.log").read_text()
    params = ONMT_PARAMS.search(log)
    onmt = {"parameters": int(params.group(1)) if params else None, "checkpoint": checkpoint}
    ours = {"parameters": parameter_counts(load_model(export)[0])["total"], "export": export}
    return onmt, ours


def ratios(ours: dict[str, Any], onmt: dict[str, Any], regime: str) -> dict[str, float | None]:
    """Ours over OpenNMT-py: training tokens/s, and sentences/s per mode (float32 and int8 against its
    float32)."""
    trained = "train_tokens_per_s" in ours and "train_tokens_per_s" in onmt
    out: dict[str, float | None] = {
        "train": round(ours["train_tokens_per_s"] / onmt["train_tokens_per_s"], 3) if trained else None
    }
    for mode, _ in MODES:
        theirs = onmt["translate"][f"{mode}_{regime}"]["sentences_per_s"]
        out[mode] = round(ours["translate"][f"{mode}_{regime}"]["sentences_per_s"] / theirs, 3)
        out[f"int8_{mode}"] = round(ours["translate"][f"{mode}_{regime}_int8"]["sentences_per_s"] / theirs, 3)
    return out


def fastest_setting(ours: dict[str, Any], onmt: dict[str, Any]) -> dict[str, Any]:
    """Not like for like, labelled as such: ours decoding under bfloat16 autocast (`--bf16`, fast on CPUs
    with avx512_bf16/AMX) against OpenNMT-py in float32, its fastest CPU setting (it has no int8 or bf16
    CPU decoding of its own), both regimes, same network and models."""
    out: dict[str, Any] = {"ours": "bf16 autocast", "opennmt_py": "float32"}
    for regime in ("forced", "natural"):
        for mode, _ in MODES:
            theirs = onmt["translate"][f"{mode}_{regime}"]["sentences_per_s"]
            mine = ours["translate"][f"{mode}_{regime}_bf16"]["sentences_per_s"]
            out[f"{mode}_{regime}"] = round(mine / theirs, 3)
    return out


# --- OpenNMT-py --------------------------------------------------------------------------------------------


def encode_corpus(args: argparse.Namespace, work: Path) -> None:
    """The joint 8k BPE SentencePiece model (as ours builds) and every split as space-separated pieces."""
    import sentencepiece as spm

    corpus = work / "spm_input.txt"
    corpus.write_text("".join((args.data / f"train.{lang}").read_text(encoding="utf-8") for lang in LANGS))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "spm"), vocab_size=8000, model_type="bpe",
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    for split in ("train", "val"):
        encode_split(args, work, split)
    encode_test_set(args, work)


def encode_split(args: argparse.Namespace, work: Path, split: str, limit: int | None = None) -> None:
    """work/{split}.sp.{en,de}: the split as space-separated pieces of work/spm.model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    for lang in LANGS:
        text = (args.data / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:limit]
        pieces = [" ".join(p) for p in sp.encode(text, out_type=str)]
        (work / f"{split}.sp.{lang}").write_text("\n".join(pieces) + "\n", encoding="utf-8")


def encode_test_set(args: argparse.Namespace, work: Path) -> None:
    encode_split(args, work, "test_2016_flickr", args.limit)


def opennmt_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return {
        "save_data": str(work / "data"), "src_vocab": str(work / "vocab.txt"), "share_vocab": True,
        "overwrite": True,
        "data": {
            "corpus_1": {"path_src": str(work / "train.sp.en"), "path_tgt": str(work / "train.sp.de")},
            "valid": {"path_src": str(work / "val.sp.en"), "path_tgt": str(work / "val.sp.de")},
        },
        "encoder_type": "brnn", "decoder_type": "rnn", "rnn_type": "LSTM", "enc_layers": 2, "dec_layers": 1,
        "hidden_size": 256, "word_vec_size": 256, "global_attention": "general", "input_feed": 1,
        "share_embeddings": True, "share_decoder_embeddings": True, "dropout": [0.3], "optim": "adam",
        "learning_rate": 0.002, "label_smoothing": 0.1, "batch_type": "tokens",
        "batch_size": args.batch_tokens,
        "bucket_size": 29000,  # one pass over Multi30k; the default holds ~9 copies in memory
        "train_steps": args.steps, "valid_steps": 10 * args.steps,  # never validates
        "report_every": REPORT_EVERY, "save_checkpoint_steps": args.steps, "save_model": str(work / "model"),
        "seed": 1234, "world_size": 1, "gpu_ranks": [],
    }  # fmt: skip


def train_opennmt(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Encode the corpus, build the vocabulary, train; tokens/s from its step reports."""
    work.mkdir(parents=True, exist_ok=True)
    encode_corpus(args, work)
    (work / "config.yaml").write_text(yaml.safe_dump(opennmt_config(args, work)))
    onmt = [str(args.onmt_python), "-m"]
    build_vocab = [*onmt, "onmt.bin.build_vocab", "-config", str(work / "config.yaml"), "-n_sample", "-1"]
    subprocess.run(build_vocab, check=True, capture_output=True)
    start = time.perf_counter()
    log = subprocess.run(
        [*onmt, "onmt.bin.train", "-config", str(work / "config.yaml")], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    (work / "train.log").write_text(log.stdout + log.stderr)
    if log.returncode:
        raise RuntimeError(f"onmt_train failed; see {work / 'train.log'}")
    reports = [(int(s), int(a) + int(b)) for s, a, b in ONMT_REPORT.findall(log.stderr + log.stdout)]
    late = [rate for step, rate in reports if step > args.steps // 2]
    params = ONMT_PARAMS.search(log.stderr + log.stdout)
    return {
        "parameters": int(params.group(1)) if params else None,
        "train_tokens_per_s": round(statistics.median(late)),
        "train_windows_second_half": late,
        "train_wall_s": round(wall, 1),
        "checkpoint": work / f"model_step_{args.steps}.pt",
    }


def translate_opennmt(
    args: argparse.Namespace, checkpoint: Path, work: Path, refs: list[str]
) -> dict[str, Any]:
    """Every mode and regime in one OpenNMT-py process (the driver above)."""
    import sentencepiece as spm

    forced = ["-min_length", str(args.output_length), "-max_length", str(args.output_length),
              "-max_length_ratio", "0"]  # fmt: skip
    natural = ["-max_length", "250", "-max_length_ratio", str(MAX_LEN_RATIO)]
    configs = {
        f"{mode}_{regime}": ["-beam_size", str(beam), "-length_penalty", "none", *lengths]
        for mode, beam in MODES
        for regime, lengths in (("forced", forced), ("natural", natural))
    }
    spec = {"model": str(checkpoint), "src": str(work / "test_2016_flickr.sp.en"), "threads": args.threads,
            "runs": args.runs, "configs": configs, "output": str(work / "hyp.txt"),
            "result": str(work / "timings.json")}  # fmt: skip
    (work / "driver.py").write_text(ONMT_DRIVER)
    (work / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # its checkpoints are pickles
    log = subprocess.run([str(args.onmt_python), str(work / "driver.py"), str(work / "spec.json")],
                         capture_output=True, text=True, env=env)  # fmt: skip
    if log.returncode:
        raise RuntimeError(f"OpenNMT-py translation failed:\n{log.stderr[-3000:]}")
    sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    out = {}
    for name, result in json.loads((work / "timings.json").read_text()).items():
        texts = [sp.decode_pieces(line.split()) for line in result["outputs"]]
        tokens = sum(len(line.split()) for line in result["outputs"])
        out[name] = rates(len(texts), tokens, result["seconds"]) | {"load": result["load"]}
        if name.endswith("natural"):
            out[name]["bleu"] = bleu(texts, refs)
    return out


# --- nmt-moe -----------------------------------------------------------------------------------------------


def ours_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": args.steps,
            "max_epochs": None, "limit_val_batches": 0, "log_every_n_steps": REPORT_EVERY,
            "enable_progress_bar": False, "default_root_dir": str(work),
        },
        "model": {
            "model": {
                "embed_dim": 256, "hidden_size": 256, "encoder_layers": 2, "decoder_layers": 1,
                "encoder_bidirectional": "all", "attention": "general", "input_feeding": True,
                "dropout": 0.3, "tie_embeddings": True, "share_embeddings": True, "ffn": "none",
            },
            "optimizer": "adam", "lr": 0.002, "warmup_steps": 0, "schedule": "constant",
            "max_steps": args.steps, "label_smoothing": 0.1,
        },
        "data": {
            "pipeline": {
                "src_lang": "en", "tgt_lang": "de", "train": str(args.data / "train"),
                "valid": str(args.data / "val"), "vocab_size": 8000, "spm_model_type": "bpe",
                "joint_vocab": True,
            },
            "max_tokens": args.batch_tokens, "cache_dir": str(work / "cache"), "num_workers": 0,
        },
        "throughput": {"window": REPORT_EVERY},  # the same 10-step windows as OpenNMT-py's reports
    }  # fmt: skip


def train_ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """`nmt-moe train fit` of the same network; tokens/s from our TokensPerSecond callback."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(yaml.safe_dump(ours_config(args, work)))
    nmt_moe = [sys.executable, "-m", "nmt_moe.cli"]
    start = time.perf_counter()
    log = subprocess.run(
        [*nmt_moe, "train", "fit", "--config", str(work / "config.yaml"), "--wandb", "off"],
        capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - start
    (work / "train.log").write_text(log.stdout + log.stderr)
    if log.returncode:
        raise RuntimeError(f"nmt-moe train failed; see {work / 'train.log'}")
    metrics = next(work.glob("**/metrics.csv"))
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/tok_s")]
    late = [float(r["train/tok_s"]) for r in rows if int(r["step"]) + 1 > args.steps // 2]
    checkpoint = next(work.glob("**/checkpoints/last.ckpt"))
    subprocess.run(
        [*nmt_moe, "export", str(checkpoint), "-o", str(work / "export")], check=True, capture_output=True
    )
    from nmt_moe.checkpoint import load_model
    from nmt_moe.models import parameter_counts

    model, _ = load_model(work / "export")
    return {
        "parameters": parameter_counts(model)["total"],
        "train_tokens_per_s": round(statistics.median(late)),
        "train_windows_second_half": [round(rate) for rate in late],
        "train_wall_s": round(wall, 1),
        "export": work / "export",
    }


def translate_ours(
    args: argparse.Namespace, export: Path, lines: list[str], refs: list[str]
) -> dict[str, Any]:
    """float32, int8 and bf16-autocast passes in this process, alternating (a load change hits all three)."""
    import torch

    from nmt_moe.checkpoint import load_model
    from nmt_moe.decoding.int8 import quantize_int8
    from nmt_moe.decoding.options import DecodeOptions
    from nmt_moe.decoding.translate import translate_lines

    torch.set_num_threads(args.threads)
    fp32, tokenizer = load_model(export)
    int8 = quantize_int8(load_model(export)[0])
    n = args.output_length
    regimes = {
        "forced": dict(max_len_a=0.0, max_len_b=n, min_len=n),
        "natural": dict(max_len_a=MAX_LEN_RATIO, max_len_b=MAX_LEN_PLUS),
    }
    out = {}
    for mode, beam in MODES:
        for regime, lengths in regimes.items():
            options = DecodeOptions(beam_size=beam, alpha=0.0, **lengths)
            bf16 = DecodeOptions(beam_size=beam, alpha=0.0, bf16=True, **lengths)
            variants = (("", fp32, options), ("_int8", int8, options), ("_bf16", fp32, bf16))
            times: dict[str, list[float]] = {suffix: [] for suffix, _, _ in variants}
            for run in range(args.runs + 1):  # run 0 warms up
                for suffix, model, variant in variants:
                    start = time.perf_counter()
                    with torch.inference_mode():
                        results = translate_lines(model, tokenizer, lines, variant, max_sentences=64,
                                                  max_tokens=10**9)  # fmt: skip
                        texts = tokenizer.decode([nbest[0].tokens for nbest in results])
                    if run:
                        times[suffix].append(time.perf_counter() - start)
                    tokens = sum(len(nbest[0].tokens) for nbest in results)
                    name = f"{mode}_{regime}{suffix}"
                    out[name] = rates(len(lines), tokens, times[suffix] or [1.0]) | {"load": os.getloadavg()}
                    if regime == "natural":
                        out[name]["bleu"] = bleu(texts, refs)
    return out


def bleu(hypotheses: list[str], refs: list[str]) -> float:
    import sacrebleu

    return round(sacrebleu.corpus_bleu(hypotheses, [refs]).score, 2)


def rates(sentences: int, tokens: int, seconds: list[float]) -> dict[str, Any]:
    median = statistics.median(seconds)
    return {
        "seconds_median": round(median, 3),
        "seconds_all": [round(s, 3) for s in seconds],
        "sentences_per_s": round(sentences / median, 1),
        "target_tokens_per_s": round(tokens / median),
        "mean_target_tokens": round(tokens / sentences, 2),
    }


if __name__ == "__main__":
    main()

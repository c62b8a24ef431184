"""Data pipeline benchmarks (JSON on stdout). Two modes:

`--pairs N` (WMT scale): builds an N-pair corpus deterministically from a small parallel corpus
(Multi30k train; each line joins 1-3 random pairs, the same ones on both sides), then measures
`nmt-moe prepare` from scratch in a subprocess (wall time, peak memory of its process tree, phases
from its log), the cache size, a second `prepare` (cache hit), and in this process the training
DataModule's setup (cache hit, splits opened, length columns read) and the time to plan one epoch.

    python scripts/bench_data.py --pairs 500000 [--vocab_size 16000] [--num_proc 2] [--work DIR]

Without `--pairs` (components, on Multi30k itself): SentencePiece training per model type, encoding
through `datasets.map` against plain SentencePiece, padding of bucketed against random batches, and
a full prepare built then found in the cache.

    python scripts/bench_data.py [--data ../shared/data/multi30k] [--vocab_size 8000] [--num_proc 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def _timed(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


# -- WMT-sized corpus --------------------------------------------------------------------------------


def make_corpus(src: Path, tgt: Path, pairs: int, out: Path, seed: int = 0) -> Path:
    """`pairs` lines at out.{en,de} (suffixes from src/tgt), each 1-3 random source pairs joined by a
    space, the same draws on both sides; deterministic in (inputs, pairs, seed). Returns the prefix."""
    src_lines = src.read_text(encoding="utf-8").splitlines()
    tgt_lines = tgt.read_text(encoding="utf-8").splitlines()
    assert len(src_lines) == len(tgt_lines), (src, tgt)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_name(f"{out.name}{path.suffix}") for path in (src, tgt)]
    if all(p.exists() for p in paths) and Path(f"{out}.done").exists():
        return out
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, size=pairs)  # [pairs] sentences joined per line
    draws = rng.integers(0, len(src_lines), size=int(counts.sum()))  # [sum(counts)]
    bounds = np.concatenate([[0], np.cumsum(counts)])  # [pairs + 1]
    for lines, path in zip((src_lines, tgt_lines), paths, strict=True):
        table = np.asarray(lines, dtype=object)
        with path.open("w", encoding="utf-8") as handle:
            for chunk in range(0, pairs, 100_000):
                stop = min(pairs, chunk + 100_000)
                picked = table[draws[bounds[chunk] : bounds[stop]]].tolist()
                offsets = (bounds[chunk : stop + 1] - bounds[chunk]).tolist()
                handle.write(
                    "".join(
                        " ".join(picked[a:b]) + "\n" for a, b in zip(offsets[:-1], offsets[1:], strict=True)
                    )
                )
    Path(f"{out}.done").write_text(str(pairs))
    return out


# -- memory of a process tree ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    tree, frontier = [pid], [pid]
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    while frontier:
        frontier = [child for p in frontier for child in parents.get(p, [])]
        tree += frontier
    return tree


def _memory(pids: list[int]) -> dict[str, int]:
    """Bytes over `pids`: RSS, its anonymous part (heap: what memory limits bite on) and its file-backed
    part (memory-mapped Arrow files, reclaimable page cache), and PSS (shared pages shared out)."""
    total = {"rss": 0, "anon": 0, "file": 0, "pss": 0}
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in fields:
                    total[fields[name]] += int(value.split()[0]) * 1024
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total["pss"] += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


PHASES = (  # prepare's log line that starts each phase (the first phase starts at launch)
    ("start-up", ""),
    ("read + clean", "building "),
    ("SentencePiece sample", "sampling SentencePiece"),
    ("SentencePiece training", "training SentencePiece"),
    ("encode + save + report", "vocab of "),
)


def _sample(pids: list[int], at: float) -> dict[str, Any]:
    """One memory sample: the tree's sums, and each process's own RSS split into anon and file."""
    each = {pid: _memory([pid]) for pid in pids}
    largest = max(each, key=lambda pid: each[pid]["rss"]) if each else 0
    tree = {name: sum(m[name] for m in each.values()) for name in ("rss", "anon", "file", "pss")}
    max_anon = max((m["anon"] for m in each.values()), default=0)
    largest_process = {"pid": largest, **each.get(largest, {})}
    return {"t": at, "tree": tree, "largest": largest_process, "max_anon": max_anon, "procs": len(each)}


def phase_memory(timeline: list[dict[str, Any]], log: list[tuple[float, str]], wall: float) -> dict[str, Any]:
    """Per phase of prepare (PHASES, from its log's timestamps): seconds, and the peaks over the samples
    taken in it of the largest process's RSS/anon/file and of the tree's PSS and anon."""
    starts = [0.0]
    for _, marker in PHASES[1:]:
        hits = [t for t, line in log if line.startswith(marker)]
        starts.append(hits[0] if hits else starts[-1])
    bounds = [*starts, wall]
    out: dict[str, Any] = {}
    for index, (name, _) in enumerate(PHASES):
        inside = [s for s in timeline if bounds[index] <= s["t"] < bounds[index + 1]]
        out[name] = {
            "seconds": round(bounds[index + 1] - bounds[index], 1),
            "samples": len(inside),
            **{
                f"largest_process_{kind}_bytes": max((s["largest"].get(kind, 0) for s in inside), default=0)
                for kind in ("rss", "anon", "file")
            },
            "tree_pss_bytes": max((s["tree"]["pss"] for s in inside), default=0),
            "tree_anon_bytes": max((s["tree"]["anon"] for s in inside), default=0),
            "max_processes": max((s["procs"] for s in inside), default=0),
        }
    return out


def run_measured(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run `command`, sampling its tree's memory every 0.5 s, timestamping its output lines (prepare logs
    progress on stdout) and taking its tree's CPU time. `max_process_rss_bytes` is the kernel's high-water
    RSS of the largest process in the tree (getrusage); the tree's PSS shares out pages that forked
    workers share."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    log: list[tuple[float, str]] = []
    errors: list[str] = []

    def read(stream: Any, into: list) -> None:  # noqa: ANN401
        for line in stream:
            into.append((round(time.perf_counter() - start, 2), line.rstrip()))

    readers = [
        threading.Thread(target=read, args=(proc.stdout, log), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, errors), daemon=True),
    ]
    for reader in readers:
        reader.start()
    timeline = []
    while proc.poll() is None:
        timeline.append(_sample(_children(proc.pid), round(time.perf_counter() - start, 2)))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    for reader in readers:
        reader.join(5)
    peak = {
        name: max((s["tree"][name] for s in timeline), default=0) for name in ("rss", "anon", "file", "pss")
    }
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 1),  # user + system over the tree: what the load average cannot inflate
        "max_process_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        **{f"peak_tree_{name}_bytes": value for name, value in peak.items()},
        "max_process_anon_bytes": max((s["max_anon"] for s in timeline), default=0),
        "phases": phase_memory(timeline, log, wall),
        "log": log,
        "stderr": errors,
    }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _settings(args: argparse.Namespace, prefix: Path, cache: Path) -> dict[str, Any]:
    """The data module's arguments, the pipeline's as a nested section (as in a recipe's `data:`)."""
    pipeline = {
        "src_lang": args.src_lang,
        "tgt_lang": args.tgt_lang,
        "train": str(prefix),
        "valid": str(Path(args.data) / "val"),
        "vocab_size": args.vocab_size,
        "spm_model_type": args.spm_model_type,
    }
    return {
        "pipeline": pipeline,
        "num_proc": args.num_proc,
        "cache_dir": str(cache),
        "max_tokens": args.max_tokens[0],
    }


def _flags(settings: dict[str, Any], prefix: str = "") -> list[str]:
    """`nmt-moe prepare` flags of the settings: --cache_dir ..., --pipeline.src_lang ..."""
    flags = []
    for key, value in settings.items():
        if isinstance(value, dict):
            flags += _flags(value, f"{prefix}{key}.")
        else:
            flags += [f"--{prefix}{key}", str(value)]
    return flags


def _datamodule_timings(settings: dict[str, Any]) -> dict[str, float]:
    """Training's view of the cache: setup (a cache hit) and the batch plan of two fresh epochs."""
    from nmt_moe.data.datamodule import TranslationDataModule
    from nmt_moe.data.pipeline import PipelineConfig

    dm = TranslationDataModule(**{**settings, "pipeline": PipelineConfig(**settings["pipeline"])})
    _, setup = _timed(lambda: (dm.prepare_data(), dm.setup("fit")))
    _, lengths = _timed(dm.lengths, "train")
    sampler = dm.batch_sampler("train", shuffle=True)
    plans = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches, seconds = _timed(sampler.batches)
        plans.append(seconds)
    return {
        "setup_seconds": round(setup + lengths, 3),
        "setup_open_seconds": round(setup, 3),
        "length_columns_seconds": round(lengths, 3),
        "epoch_plan_seconds": round(max(plans), 3),
        "epoch_plan_seconds_each": [round(p, 3) for p in plans],
        "train_batches_per_epoch": len(batches),
    }


def bench_scale(args: argparse.Namespace) -> dict[str, Any]:
    data = Path(args.data)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_data_"))
    prefix = make_corpus(
        data / f"train.{args.src_lang}",
        data / f"train.{args.tgt_lang}",
        args.pairs,
        work / f"m30k_x{args.pairs}",
    )
    cache = work / f"cache_{args.pairs}"
    if cache.exists() and not args.keep_cache:
        import shutil

        shutil.rmtree(cache)
    settings = _settings(args, prefix, cache)
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_OFFLINE": "1"}
    summary_json = work / f"summary_{args.pairs}.json"
    command = [
        sys.executable,
        "-m",
        "nmt_moe.cli",
        "prepare",
        *_flags(settings),
        "--summary_json",
        str(summary_json),
    ]
    out: dict[str, Any] = {
        "pairs": args.pairs,
        "corpus_bytes": sum(
            Path(f"{prefix}.{lang}").stat().st_size for lang in (args.src_lang, args.tgt_lang)
        ),
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(command),
    }
    built = run_measured(command, env)
    if built["returncode"] != 0:
        raise SystemExit(f"prepare failed: {built['stderr'][-3:]}")
    out["loadavg_after_prepare"] = [round(x, 2) for x in os.getloadavg()]
    summary = json.loads(summary_json.read_text())
    key_dir = Path(summary["cache_dir"])
    out["prepare"] = {k: v for k, v in built.items() if k not in ("stdout",)}
    out["cache_bytes"] = _dir_bytes(key_dir)
    out["train_pairs_kept"] = summary["splits"]["train"]["pairs"]
    out["train_tokens"] = {k: summary["splits"]["train"][k] for k in ("src_tokens", "tgt_tokens")}
    hit = run_measured(command, env)
    out["prepare_cache_hit_wall_seconds"] = hit["wall_seconds"]
    out.update(_datamodule_timings(settings))
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return out


# -- components on Multi30k ----------------------------------------------------------------------------


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


def bench_components(args: argparse.Namespace) -> dict[str, Any]:
    import datasets

    from nmt_moe.data.batching import bucket_batches, padding_fraction
    from nmt_moe.data.cleaning import CleaningConfig, clean_text
    from nmt_moe.data.columns import read_lengths
    from nmt_moe.data.pipeline import PipelineConfig, _encode_batch, prepare
    from nmt_moe.data.sources import load_local
    from nmt_moe.data.tokenizer import train_tokenizer

    prefix = Path(args.data) / "train"
    datasets.disable_progress_bars()
    out: dict[str, Any] = {"corpus": str(prefix), "vocab_size": args.vocab_size, "num_proc": args.num_proc}
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
            fn_kwargs={"src_tok": tok, "tgt_tok": tok, "src_prefix": {"": []}},
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
        src, tgt = read_lengths(encoded)
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
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--src_lang", default="en")
    parser.add_argument("--tgt_lang", default="de")
    parser.add_argument("--vocab_size", type=int, default=None, help="default 8000, or 16000 with --pairs")
    parser.add_argument("--spm_model_type", default="unigram")
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--max_tokens", type=int, nargs="+", default=[4096, 2048, 8192])
    parser.add_argument("--pairs", type=int, default=None, help="WMT-scale mode: corpus size in pairs")
    parser.add_argument("--work", default=None, help="corpus and cache directory (default: a new temp dir)")
    parser.add_argument("--keep_cache", action="store_true", help="reuse an earlier cache (no fresh build)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not Path(args.data, f"train.{args.src_lang}").exists():
        print(f"no corpus at {args.data}/train.{args.src_lang}; pass --data", file=sys.stderr)
        return 2
    args.vocab_size = args.vocab_size or (16000 if args.pairs else 8000)
    result = bench_scale(args) if args.pairs else bench_components(args)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

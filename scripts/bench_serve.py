"""`nmt-moe serve` under load against `nmt-moe translate` on the same sentences, in one run (JSON out).

1. `translate` baseline: the library path of `nmt-moe translate` (encode, batched search, decode to text)
   on all sentences at once, in this process, after model loading; the median of `--repeats` passes.
   This is the stricter baseline: the CLI would add process start-up and model loading.
2. The real `nmt-moe serve` process on a free loopback port, with the same model and search settings and
   the same torch threads; after a warm-up, `--clients` concurrent clients send the same sentences,
   `--lines-per-request` per request, until every sentence was sent once. Throughput is sentences over the
   wall time from the first request to the last answer; latency is per request (p50, p99).
3. The answers are checked against the baseline's translations (the JSON says how many differ).

`serve_over_translate` = server sentences/s / translate sentences/s (target >= 0.8). The server can never
batch more sentences than its clients have in flight (clients x lines per request); `translate` with
batches of that many sentences (`--max-sentences`) is reported too, to separate the cost of smaller
batches from the cost of serving. Both sides compete
with the machine's other load: the load average is reported beside the figures.

Without `--model`, a random-weight model of the reference size is built as in bench_translate.py (outputs
capped at the source length: random weights rarely emit EOS).

    python scripts/bench_serve.py [--model CKPT_OR_DIR] [--sentences 400] [--clients 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nmt_moe.checkpoint import load_model, save_checkpoint
from nmt_moe.decoding.options import DecodeOptions
from nmt_moe.decoding.translate import translate_lines

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "multi30k"


def random_checkpoint(data: Path, path: Path) -> Path:
    """bench_translate.py's random reference-size model (ffn none), saved as a checkpoint."""
    spec = importlib.util.spec_from_file_location("bench_translate", ROOT / "scripts" / "bench_translate.py")
    bench_translate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_translate)
    model, tokenizer = bench_translate.random_model(data, "en", "de", "none")
    save_checkpoint(path, model, tokenizer)
    return path


def baseline(
    model_path: Path, lines: list[str], options: DecodeOptions, repeats: int, max_sentences: int = 256
) -> dict:
    model, tokenizer = load_model(model_path)
    times, texts = [], []
    for run in range(repeats + 1):
        start = time.perf_counter()
        results = translate_lines(model, tokenizer, lines, options, max_sentences=max_sentences)
        texts = tokenizer.decode([nbest[0].tokens if nbest else [] for nbest in results])
        if run:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": round(seconds, 3), "seconds_all_runs": [round(t, 3) for t in times],
            "sentences_per_s": round(len(lines) / seconds, 1), "texts": texts}  # fmt: skip


def post(port: int, lines: list[str], beam: int) -> tuple[float, list[str]]:
    body = json.dumps({"text": lines, "beam": beam}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/translate", data=body, method="POST")
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        answer = json.loads(response.read())
    return time.perf_counter() - start, answer["translations"]


def start_server(
    model_path: Path, args: argparse.Namespace, search: list[str]
) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "nmt_moe.cli", "serve", "-m", str(model_path), "--port", str(port),
               "--threads", str(args.threads), "--batch-wait-ms", str(args.batch_wait_ms),
               *search]  # fmt: skip
    server = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return server, port
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("the server did not come up in 300 s")


def load_test(port: int, lines: list[str], args: argparse.Namespace) -> dict:
    requests = [list(range(i, min(i + args.lines_per_request, len(lines))))
                for i in range(0, len(lines), args.lines_per_request)]  # fmt: skip
    answers: list[str] = [""] * len(lines)

    def send(request: list[int]) -> tuple[float, list[str]]:
        return post(port, [lines[i] for i in request], args.beam)

    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(send, requests[: args.clients]))  # warm-up
        start = time.perf_counter()
        timed = list(pool.map(send, requests))
        seconds = time.perf_counter() - start
    for request, (_, texts) in zip(requests, timed, strict=True):
        for i, text in zip(request, texts, strict=True):
            answers[i] = text
    latency = sorted(t for t, _ in timed)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
        health = json.loads(response.read())
    return {"seconds": round(seconds, 3), "sentences_per_s": round(len(lines) / seconds, 1),
            "requests": len(requests), "latency_p50_s": round(latency[len(latency) // 2], 4),
            "latency_p99_s": round(latency[min(len(latency) - 1, int(0.99 * len(latency)))], 4),
            "worker": health, "answers": answers}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, help="checkpoint or export dir (default: random reference model)"
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sentences", type=int, default=400, help="first N of test_2016_flickr.en")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--lines-per-request", type=int, default=1)
    parser.add_argument("--beam", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="translate baseline passes (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = (args.data / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[: args.sentences]
    # random weights rarely emit EOS: cap outputs at the source length, as bench_translate.py does
    cap = ["--max-len-a", "1", "--max-len-b", "0"] if args.model is None else []
    options = DecodeOptions(beam_size=args.beam, **({"max_len_a": 1.0, "max_len_b": 0} if cap else {}))
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or random_checkpoint(args.data, Path(tmp) / "random.ckpt")
        before = baseline(model_path, lines, options, args.repeats)
        in_flight = args.clients * args.lines_per_request  # the most sentences the server can ever batch
        small = baseline(model_path, lines, options, args.repeats, max_sentences=min(256, in_flight))
        small.pop("texts")
        server, port = start_server(model_path, args, ["--beam", str(args.beam), *cap])
        try:
            served = load_test(port, lines, args)
        finally:
            server.terminate()
            server.wait(timeout=60)
    differing = sum(a != b for a, b in zip(served.pop("answers"), before.pop("texts"), strict=True))
    report = {
        "benchmark": "nmt-moe serve under load vs translate on the same sentences",
        "model": str(args.model or "random reference-size model (2x256 LSTMs, ffn none, 8k vocab)"),
        "sentences": len(lines), "beam": args.beam, "threads": args.threads, "clients": args.clients,
        "lines_per_request": args.lines_per_request, "batch_wait_ms": args.batch_wait_ms,
        "translate": before, "serve": served,
        "serve_over_translate": round(served["sentences_per_s"] / before["sentences_per_s"], 3),
        "translate_in_batches_of_in_flight_sentences": small,
        "serve_over_translate_in_such_batches": round(
            served["sentences_per_s"] / small["sentences_per_s"], 3
        ),
        "answers_differing_from_translate": differing,
        "load_average_end": os.getloadavg(), "torch": torch.__version__,
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

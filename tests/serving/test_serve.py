"""`nmt-moe serve` through real HTTP on loopback: concurrent clients get exactly `translate`'s answers.

The real entry point runs as a subprocess on a free port. Clients send requests of 1-4 lines with mixed
settings (beam 5, beam 1, n-best 2); every answer must equal `nmt-moe translate` on the same lines with
the same settings, whatever requests shared a batch. The default variant is small (8 clients x 10
requests); the issue's 32 clients x 50 requests runs under `-m slow`.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.distributed import free_port
from helpers.tiny_models import tiny_corpus
from helpers.tiny_trained import trained_tiny_checkpoint

from nmt_moe.cli import main

ROOT = Path(__file__).resolve().parents[2]
POOL = [*tiny_corpus(40, seed=11), "", "  ", "the dog " * 40]  # empty, blank and over-long lines too
SETTINGS = [{}, {"beam": 1}, {"beam": 5, "nbest": 2}]  # {} = the server's default beam (5)
MODEL_ARGS = ["--max-input-tokens", "40"]


def call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_tiny_checkpoint(tmp_path_factory.mktemp("model") / "trained.ckpt")


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nmt_moe.cli", "serve", "-m", str(checkpoint), "--port", str(port),
               "--max-request-lines", "8", "--max-request-bytes", "65536", *MODEL_ARGS]  # fmt: skip
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                if call(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not answer /health in 120 s"
                time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def expected(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list]:
    """`nmt-moe translate` on the whole pool, per settings: n-best texts per line."""
    root = tmp_path_factory.mktemp("translate")
    source = root / "pool.txt"
    source.write_text("".join(line + "\n" for line in POOL))
    answers = {}
    for settings in SETTINGS:
        beam, nbest = str(settings.get("beam", 5)), str(settings.get("nbest", 1))
        out = root / f"{beam}-{nbest}.jsonl"
        search = ["--beam", beam, "--nbest", nbest, "--output-format", "jsonl", *MODEL_ARGS]
        assert main(["translate", "-m", str(checkpoint), "-i", str(source), "-o", str(out), "--quiet",
                     *search]) == 0  # fmt: skip
        records = [json.loads(line) for line in out.read_text().splitlines()]
        answers[json.dumps(settings)] = [
            [h["translation"] for h in r["nbest"]] if "nbest" in r else [r["translation"]] for r in records
        ]
    return answers


def run_clients(port: int, expected: dict[str, list], clients: int, requests: int) -> int:
    """Each client sends `requests` requests in turn; returns the number of lines checked."""

    def client(seed: int) -> int:
        rng, checked = random.Random(seed), 0
        for _ in range(requests):
            settings = rng.choice(SETTINGS)
            picks = [rng.randrange(len(POOL)) for _ in range(rng.randint(1, 4))]
            body = json.dumps({"text": [POOL[i] for i in picks], **settings}).encode()
            status, answer = call(port, "POST", "/translate", body)
            assert status == 200, answer
            want = expected[json.dumps(settings)]
            nbest = settings.get("nbest", 1)
            got = answer["translations"]
            assert got == [want[i] if nbest > 1 else want[i][0] for i in picks]
            checked += len(picks)
        return checked

    with ThreadPoolExecutor(clients) as pool:
        return sum(pool.map(client, range(clients)))


def test_concurrent_clients_get_translates_answers(server: int, expected: dict[str, list]) -> None:
    assert run_clients(server, expected, clients=8, requests=10) >= 80
    status, health = call(server, "GET", "/health")
    assert status == 200 and health["jobs"] >= 80
    assert health["gathers"] < health["jobs"], "no two requests were ever batched together"


@pytest.mark.slow
def test_32_clients_x_50_requests(server: int, expected: dict[str, list]) -> None:
    assert run_clients(server, expected, clients=32, requests=50) >= 1600


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b'{"text": ["a dog"', 400, "not valid JSON"),
        (b"", 400, "not valid JSON"),
        (b'{"text": []}', 422, "text"),
        (b'{"text": "a dog"}', 422, "text"),
        (b'{"text": ["a"], "beam": 0}', 422, "beam"),
        (b'{"text": ["a"], "beam": 2, "nbest": 3}', 422, "nbest"),
        (b'{"text": ["a"], "beam": 99}', 422, "beam"),
        (b'{"text": ["a"], "colour": "red"}', 422, "colour"),
        (b'{"text": ["a\\nb"]}', 422, "newline"),
        (b'{"text": ["a"], "target_lang": "xx"}', 400, "target_lang"),
        (json.dumps({"text": ["a"] * 9}).encode(), 413, "at most 8"),
        (json.dumps({"text": ["a" * 70_000]}).encode(), 413, "bytes"),  # small: no reset while sending
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_bad_requests_get_a_json_4xx_and_the_server_goes_on(
    server: int, body: bytes, status: int, words: str
):
    got, answer = call(server, "POST", "/translate", body)
    assert got == status and words in answer["error"], answer
    got, answer = call(server, "POST", "/translate", b'{"text": ["a red ball", ""]}')
    assert got == 200 and len(answer["translations"]) == 2 and answer["translations"][1] == ""


def test_serve_refuses_a_missing_model_in_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "nmt_moe.cli", "serve", "-m", str(tmp_path / "none.ckpt")],
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_serve_refuses_a_port_in_use_before_loading_the_model(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = ["serve", "-m", str(tmp_path / "absent"), "--port", str(port)]
        result = subprocess.run([sys.executable, "-m", "nmt_moe.cli", *argv], capture_output=True, text=True,
                                timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot listen" in result.stderr, result.stderr

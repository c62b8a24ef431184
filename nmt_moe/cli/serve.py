"""`nmt-moe serve`: an HTTP translation server (FastAPI + uvicorn) with dynamic batching
(the app is `nmt_moe.serving.app`, the batching `nmt_moe.serving.batcher`)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from nmt_moe.cli.common import MODEL_ALIASES, set_threads
from nmt_moe.cli.errors import UsageError, run_command
from nmt_moe.cli.parsing import Command, parse
from nmt_moe.decoding.options import BatchOptions, DecodeOptions
from nmt_moe.serving.app import Limits, create_app
from nmt_moe.serving.batcher import BATCH_TOKENS, MAX_WAIT_S, DynamicBatcher


def serve(
    model: list[Path],
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "cpu",
    threads: int | None = None,
    batch_tokens: int = BATCH_TOKENS,
    batch_wait_ms: float = MAX_WAIT_S * 1000,
    max_request_lines: int = Limits.max_request_lines,
    max_request_bytes: int = Limits.max_request_bytes,
    max_beam: int = Limits.max_beam,
    options: DecodeOptions = DecodeOptions(),  # noqa: B008 (frozen)
    batching: BatchOptions = BatchOptions(),  # noqa: B008 (frozen)
) -> int:
    """Serve translations over HTTP: POST /translate {"text": [...]} -> {"translations": [...]}, GET /health.

    Args:
        model: training checkpoint (.ckpt) or export dir; repeat to ensemble models of one vocabulary
        host: address to listen on
        port: port (0: one the system picks, printed at start)
        device: torch device
        threads: torch CPU threads (default: torch's choice)
        batch_tokens: source tokens the worker gathers from queued requests per round
        batch_wait_ms: how long the worker waits for more requests after the first
        max_request_lines: lines per request
        max_request_bytes: request body bytes
        max_beam: largest beam a request may ask for
        options: search settings (a request may ask for another beam and n-best)
        batching: batching settings
    """
    if min(batch_tokens, max_request_lines, max_request_bytes, max_beam) < 1:
        raise UsageError(
            "--batch-tokens, --max-request-lines, --max-request-bytes and --max-beam must be >= 1"
        )
    if not 0 <= port < 65536 or batch_wait_ms < 0:
        raise UsageError("--port must be in 0..65535 and --batch-wait-ms >= 0")
    import uvicorn

    from nmt_moe.decoding.ensemble import load_models

    set_threads(threads)
    try:  # the address first: a port in use is one line and exit 2, before minutes of model loading
        listener = socket.create_server((host, port))
    except OSError as error:
        raise OSError(f"cannot listen: {error.strerror}") from error
    try:
        loaded, tokenizer = load_models(model, device)
    except BaseException:
        listener.close()
        raise
    batcher = DynamicBatcher(
        loaded, tokenizer, options, batch_tokens=batch_tokens, max_wait_s=batch_wait_ms / 1000,
        max_tokens=batching.max_tokens, max_sentences=batching.max_sentences,
    )  # fmt: skip
    limits = Limits(max_request_lines, max_request_bytes, max_beam, batching.max_input_tokens)
    app = create_app(batcher, limits, default_beam=options.beam_size)
    bound = listener.getsockname()[1]  # the one the system chose for --port 0
    print(f"{COMMAND.prog}: model loaded; listening on http://{host}:{bound}", file=sys.stderr)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])
    return 0


COMMAND = Command(
    prog="nmt-moe serve",
    function=serve,
    flat={"options": DecodeOptions, "batching": BatchOptions},
    skip=frozenset({"nbest", "experts", "sampling"}),
    aliases=MODEL_ALIASES,
)


def main(argv: list[str]) -> int:
    return run_command(COMMAND.prog, lambda: serve(**parse(COMMAND, argv)))

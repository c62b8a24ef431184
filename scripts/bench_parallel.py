"""Benchmark expert parallelism on CPU: one MoELayer training step (forward with aux losses, backward) in 1
process holding all experts, and in 2 processes (gloo) each holding half of them.

Prints one JSON object. Both layouts run in this one invocation, each process with --threads threads (1 by
default: 2 processes on the 2-core test box then use the cores the 1-process run uses one of). Every rank
routes --tokens tokens per step, so the 2-process run handles twice the global batch; tokens/s counts the
global batch. `all_to_all_share` is the share of the step spent inside `all_to_all_single` (counts, rows
there and back, forward and backward), waiting for the slower rank included; `exchanged_mb_per_step` is
what one rank sends to the other per step (rows and their gradients).

    python scripts/bench_parallel.py                       # d_model 512, d_hidden 1024, 16 experts, k 2
    python scripts/bench_parallel.py --experts 64 --tokens 8192
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace, rank: int, world: int) -> dict[str, float]:
    """Median step time, all-to-all time and bytes sent to other ranks, for this rank."""
    import torch
    import torch.distributed as dist

    from nmt_moe.moe import MoELayer, collectives, parallel

    torch.manual_seed(0)
    layer = MoELayer(args.d_model, args.d_hidden, args.experts, k=args.k)
    layer.gate.w_gate.data.normal_(std=args.d_model**-0.5)  # spread routing from the first step
    if world > 1:
        parallel.shard_experts(layer, collectives.init_expert_parallel(world))
    timer = {"seconds": 0.0, "bytes": 0}
    if world > 1:  # time every all_to_all_single the exchange makes, forward and backward
        original = dist.all_to_all_single

        def timed(output: Any, input: Any, output_split_sizes: Any = None, input_split_sizes: Any = None,
                  group: Any = None) -> Any:  # fmt: skip
            start = time.perf_counter()
            result = original(output, input, output_split_sizes, input_split_sizes, group=group)
            timer["seconds"] += time.perf_counter() - start
            if input_split_sizes is not None:  # rows (not counts): bytes leaving for the other rank
                sent = sum(s for r, s in enumerate(input_split_sizes) if r != rank)
                timer["bytes"] += sent * input[0].numel() * input.element_size()
            return result

        dist.all_to_all_single = timed
    generator = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.d_model, generator=generator)
    grad = torch.randn(args.tokens, args.d_model, generator=generator)
    steps, comm, sent = [], [], []
    for step in range(args.warmup + args.steps):
        timer["seconds"], timer["bytes"] = 0.0, 0
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        out = layer(x.requires_grad_())
        torch.autograd.backward([out.y, out.aux_loss], [grad, torch.ones(())])
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if step >= args.warmup:
            steps.append(time.perf_counter() - start)
            comm.append(timer["seconds"])
            sent.append(timer["bytes"])
    return {
        "step_s": statistics.median(steps),
        "a2a_s": statistics.median(comm),
        "sent_b": statistics.median(sent),
    }


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, queue: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        queue.put((rank, measure(args, rank, world)))
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """One layout, every rank in its own fresh process (so both layouts pay the same start-up)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    queue = context.Queue()
    mp.spawn(_rank_main, args=(world, free_port(), args, queue), nprocs=world, join=True)
    ranks = dict(queue.get() for _ in range(world))
    step = max(r["step_s"] for r in ranks.values())  # the step ends when the slowest rank ends
    return {
        "processes": world,
        "experts_per_process": args.experts // world,
        "global_tokens_per_step": args.tokens * world,
        "step_ms": round(1000 * step, 2),
        "tokens_per_s": round(args.tokens * world / step, 1),
        "all_to_all_ms": round(1000 * max(r["a2a_s"] for r in ranks.values()), 2),
        "all_to_all_share": round(max(r["a2a_s"] / r["step_s"] for r in ranks.values()), 3),
        "exchanged_mb_per_step": round(max(r["sent_b"] for r in ranks.values()) / 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.experts % 2:
        raise SystemExit(f"--experts must be even (split over 2 processes), got {args.experts}")
    results = [run(args, 1), run(args, 2)]
    report = {
        "benchmark": "bench_parallel",
        "setup": {
            "d_model": args.d_model,
            "d_hidden": args.d_hidden,
            "num_experts": args.experts,
            "k": args.k,
            "tokens_per_rank": args.tokens,
            "threads_per_process": args.threads,
            "steps": args.steps,
            "gate": "noisy_topk",
            "backend": "gloo",
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },  # fmt: skip
        "results": results,
        "speedup_2_vs_1_process": round(results[1]["tokens_per_s"] / results[0]["tokens_per_s"], 3),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark MoELayer against a dense FFN of equal active FLOPs and the PyPI `mixture-of-experts` layer.

Prints one JSON object. Every implementation is timed interleaved with the others in the same run (round
robin, one step each per round), repeated, and reported as medians; ratios compare medians from the same
run. Defaults: 2 threads, fp32, d_model 512, d_hidden 1024, 4096 tokens, noisy_topk gate in training mode,
OpenMP and allocator settings as `nmt-moe` runs (see --omp-wait-policy and --malloc).

    python scripts/bench_moe.py                 # the issue's target points (a few minutes)
    python scripts/bench_moe.py --grid full     # num_experts {8,32,128,512} x k {2,4}, both modes
    python scripts/bench_moe.py --grid workers  # CPU expert workers against the serial expert loop

"fwd+bwd": training-mode forward (aux losses included) and backward with a random output gradient.
"fwd": eval-mode forward under torch.inference_mode (what decoding runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--grid",
        choices=("targets", "full", "workers"),
        default="targets",
        help="workers: fwd+bwd at 8-128 experts and forward at 128, each also timed with the experts run "
        "one after another on all threads (no CPU workers, see nmt_moe/moe/cpu_threads.py)",
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-hidden", type=int, default=1024)
    parser.add_argument("--gate", default="noisy_topk")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--omp-wait-policy",
        choices=("passive", "active", "unset"),
        default="unset",
        help="OpenMP idle threads sleep (passive) or spin (active); unset: the OpenMP runtime's default "
        "(spin briefly, then sleep), what torch does unless told otherwise. The MoE layer runs many short "
        "parallel regions (a few per expert), so passive costs it more than the dense FFN",
    )
    parser.add_argument(
        "--thp",
        choices=("on", "off"),
        default="off",
        help="THP_MEM_ALLOC_ENABLE: back large tensors with transparent huge pages. Off is torch's default, "
        "what `nmt-moe train` runs with; on, 8 experts ran at 0.74-0.87x dense here (0.87-0.94x off; commit "
        "08f5b46 with --omp-wait-policy passive)",
    )
    parser.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc keeps freed memory for reuse (nmt_moe.allocator.keep_freed_memory, what every "
        "`nmt-moe` command runs with); default: glibc's own settings, a page fault per 4 KB of each fresh "
        "large buffer",
    )
    parser.add_argument(
        "--always-workers",
        action="store_true",
        help="share the experts out over CPU workers whenever the loads balance, ignoring the layer's "
        "thresholds (nmt_moe/moe/cpu_threads.py); with --grid workers, shows where workers pay on a machine",
    )
    parser.add_argument("--no-pypi", action="store_true", help="skip the PyPI mixture-of-experts baseline")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.pop("OMP_WAIT_POLICY", None)  # read by OpenMP when torch first starts its thread pool
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1" if args.thp == "on" else "0"  # read once, by torch's allocator
    import torch

    from nmt_moe.allocator import keep_freed_memory
    from nmt_moe.moe import cpu_threads

    malloc = "keep" if args.malloc == "keep" and keep_freed_memory() else "default"
    if args.always_workers:
        cpu_threads.MIN_EXPERTS_PER_WORKER = cpu_threads.MIN_ROWS_PER_WORKER = 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for case in cases(args):
        rows.append(run_case(args, **case))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress; the result is on stdout
    result = {
        "settings": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "thp_mem_alloc_enable": os.environ["THP_MEM_ALLOC_ENABLE"],
            "malloc": malloc,
            "min_experts_per_worker": cpu_threads.MIN_EXPERTS_PER_WORKER,
            "min_rows_per_worker": cpu_threads.MIN_ROWS_PER_WORKER,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "dtype": "float32",
            "gate": args.gate,
            "d_model": args.d_model,
            "d_hidden": args.d_hidden,
            "repeats": args.repeats,
            "timing": "median seconds per step over interleaved rounds; ratio = median dense / median moe",
        },
        "results": rows,
        "targets": targets(rows, args.tokens),
    }
    print(json.dumps(result, indent=1))
    return 0


def cases(args: argparse.Namespace) -> list[dict]:
    """(mode, num_experts, k, tokens, pypi) tuples to measure."""
    if args.grid == "full":
        grid = [
            dict(mode=mode, num_experts=e, k=k, tokens=args.tokens, pypi=k == 2)
            for mode in ("fwd+bwd", "fwd")
            for k in (2, 4)
            for e in (8, 32, 128, 512)
        ]
    elif args.grid == "workers":
        grid = [
            dict(mode="fwd+bwd", num_experts=e, k=2, tokens=args.tokens, pypi=False)
            for e in (8, 16, 32, 64, 128)
        ]
        return grid + [dict(mode="fwd", num_experts=128, k=2, tokens=args.tokens, pypi=False)]
    else:
        grid = [
            dict(mode="fwd+bwd", num_experts=8, k=2, tokens=args.tokens, pypi=False),
            dict(mode="fwd+bwd", num_experts=32, k=2, tokens=args.tokens, pypi=True),
            dict(mode="fwd", num_experts=128, k=2, tokens=args.tokens, pypi=False),
        ]
    # fixed 256 assignments per expert (tokens = 128 · E at k = 2): time per token should not grow with E
    grid += [dict(mode="fwd+bwd", num_experts=e, k=2, tokens=128 * e, pypi=False) for e in (8, 128)]
    if args.no_pypi:
        grid = [{**case, "pypi": False} for case in grid]
    return grid


def run_case(args: argparse.Namespace, mode: str, num_experts: int, k: int, tokens: int, pypi: bool) -> dict:
    import torch

    from nmt_moe.moe import FeedForward, MoELayer

    d_model, d_hidden = args.d_model, args.d_hidden
    x = torch.randn(tokens, d_model)
    grad = torch.randn(tokens, d_model)
    moe = MoELayer(d_model, d_hidden, num_experts, k=k, gate=args.gate)
    with torch.no_grad():  # a trained-looking router, so routing is spread rather than tied at zero init
        for name, param in moe.gate.named_parameters():
            if name.endswith("w_gate"):
                param.normal_(std=d_model**-0.5)
    impls: dict[str, Callable[[], None]] = {
        "moe": make_step(moe, x, grad, mode, lambda out: (out.y, out.aux_loss)),
        # the dense FFN has the structure of one expert (no biases) with k times its hidden width
        "dense": make_step(
            FeedForward(d_model, k * d_hidden, bias=False), x, grad, mode, lambda out: (out, None)
        ),
    }
    if args.grid == "workers":
        impls["moe_serial"] = serial_experts(impls["moe"])
    if pypi:
        from mixture_of_experts import MoE

        # "pypi": its README's input shape, [batch, 1024, d] (each sequence is a routing group), and its
        # defaults (capacity factor 1.25; second expert kept at random in proportion to its gate weight).
        # "pypi_all": the same with second_policy "all", so it runs both experts of a token as MoELayer does.
        # "pypi_1group": defaults, all tokens as one [1, tokens, d] group (dispatch cost grows with its size).
        variants = [("pypi", 1024, "random"), ("pypi_all", 1024, "all"), ("pypi_1group", tokens, "random")]
        for name, group, policy in variants[:1] if num_experts > 128 else variants:  # 512 experts: 4 GB each
            reference = MoE(
                dim=d_model,
                num_experts=num_experts,
                hidden_dim=d_hidden,
                second_policy_train=policy,
                second_policy_eval=policy,
            )
            shaped_x, shaped_grad = x.view(-1, group, d_model), grad.view(-1, group, d_model)
            impls[name] = make_step(reference, shaped_x, shaped_grad, mode, lambda out: out)
    times = time_interleaved(impls, args.repeats)
    row = {"mode": mode, "num_experts": num_experts, "k": k, "tokens": tokens}
    for name, seconds in times.items():
        row[f"{name}_tokens_per_s"] = round(tokens / seconds, 1)
    row["moe_vs_dense"] = round(times["dense"] / times["moe"], 3)
    for name in ("pypi", "pypi_all", "pypi_1group"):
        if name in times:
            row[f"moe_vs_{name}"] = round(times[name] / times["moe"], 3)
    if "moe_serial" in times:
        row["workers_vs_serial"] = round(times["moe_serial"] / times["moe"], 3)  # >1: the workers help
    row["moe_us_per_token"] = round(1e6 * times["moe"] / tokens, 2)
    return row


def make_step(module, x, grad, mode: str, unpack) -> Callable[[], None]:
    """One timed step of `module`: fwd+bwd in training mode, or forward alone in eval / inference mode."""
    import torch

    if mode == "fwd":
        module.eval()

        def forward() -> None:
            with torch.inference_mode():
                module(x)

        return forward
    module.train()
    inp = x.clone().requires_grad_(True)  # the layer sits inside a network: its input needs a gradient

    def train_step() -> None:
        for param in module.parameters():
            param.grad = None  # as optimizer.zero_grad() does by default
        inp.grad = None
        y, aux = unpack(module(inp))
        tensors, grads = [y], [grad]
        if aux is not None:
            tensors.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(tensors, grads)

    return train_step


def serial_experts(step: Callable[[], None]) -> Callable[[], None]:
    """`step` with the experts run one after another on all threads, as below the workers' threshold."""
    from nmt_moe.moe import cpu_threads

    def serial_step() -> None:
        threshold = cpu_threads.MIN_EXPERTS_PER_WORKER
        cpu_threads.MIN_EXPERTS_PER_WORKER = sys.maxsize
        try:
            step()
        finally:
            cpu_threads.MIN_EXPERTS_PER_WORKER = threshold

    return serial_step


def time_interleaved(impls: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per step: one step of each implementation per round, rotating order, after a warm-up."""
    for step in impls.values():
        step()
    samples: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    for round_ in range(repeats):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            start = time.perf_counter()
            impls[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def targets(rows: list[dict], tokens: int) -> dict:
    """The issue's targets, measured ratio beside the goal."""

    def find(mode: str, experts: int, n: int) -> dict | None:
        match = [r for r in rows if r["mode"] == mode and r["num_experts"] == experts and r["k"] == 2]
        match = [r for r in match if r["tokens"] == n]
        return match[0] if match else None

    out = {}
    for label, mode, experts, goal in (
        ("fwd+bwd_8_experts_vs_dense", "fwd+bwd", 8, 0.95),
        ("fwd+bwd_32_experts_vs_dense", "fwd+bwd", 32, 0.85),
        ("fwd_128_experts_vs_dense", "fwd", 128, 0.6),
    ):
        row = find(mode, experts, tokens)
        if row:
            out[label] = {
                "measured": row["moe_vs_dense"],
                "goal": f">= {goal}",
                "met": row["moe_vs_dense"] >= goal,
            }
    row = find("fwd+bwd", 32, tokens)
    for name in ("pypi", "pypi_all", "pypi_1group"):
        if row and f"moe_vs_{name}" in row:
            out[f"fwd+bwd_32_experts_vs_{name}"] = {
                "measured": row[f"moe_vs_{name}"],
                "goal": ">= 3",
                "met": row[f"moe_vs_{name}"] >= 3,
            }
    small, large = find("fwd+bwd", 8, 128 * 8), find("fwd+bwd", 128, 128 * 128)
    if small and large:
        growth = round(large["moe_us_per_token"] / small["moe_us_per_token"], 3)
        out["time_per_token_128_vs_8_experts_at_256_per_expert"] = {
            "measured": growth,
            "goal": "<= 1.3",
            "met": growth <= 1.3,
        }
    return out


if __name__ == "__main__":
    sys.exit(main())

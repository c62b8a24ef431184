"""MoE speed on a GPU: the layer against a dense FFN of equal active FLOPs, and WMT'14 training steps.

Prints one JSON object (also written to --out):

- `layer`: MoELayer (noisy top-k, k = 2, training mode, forward + backward) against a dense FFN of hidden
  k·d_hidden (the same FLOPs per token), both at d_model 1024, d_hidden 1024 and 4096, for 8 / 32 / 128 /
  512 / 2048 experts, at 16,384 tokens and at a fixed 256 assignments per expert (tokens = 256·E/k). Each
  case: median times, tokens/s, achieved TFLOP/s (active FLOPs: 3 x 2 x 2 x tokens x k x d x h for the two
  GEMMs forward and backward; the router's are not counted) and `moe_over_dense` = dense time / MoE time.
- `train_step`: one optimizer step (forward, backward, Adam) of the flat-32 WMT'14 model and of the
  hierarchical one with as many experts as one GPU holds, each against its dense twin (`ffn: dense`, the
  same active size), on random batches of --train-tokens target tokens.

The MoE and the dense side run interleaved, repeat by repeat, timed with torch.cuda.synchronize around each
repeat (on CPU: wall time). Targets on a GPU (issue 14): MoE/dense >= 0.9 at 32 experts and 16,384 tokens;
time per token within 1.3x from 8 to 2048 experts at 256 assignments per expert; the flat-32 step >= 0.85x
its dense twin.

    python scripts/bench_gpu.py --device cuda                  # everything (an H100/H200 class GPU)
    python scripts/bench_gpu.py --device cpu --tiny            # the same code at toy sizes (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from nmt_moe.models import Seq2Seq, Seq2SeqConfig
from nmt_moe.moe import FeedForward, MoELayer

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "wmt14_en_de"
K = 2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: checks the script, measures nothing")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", choices=["auto", "grouped", "loop"], default="auto")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128, 512, 2048])
    parser.add_argument("--d-hidden", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--max-weight-gib", type=float, default=100.0, help="skip layers with larger experts")
    parser.add_argument("--hier-experts", type=int, default=512, help="experts of the one-GPU hierarchical")
    parser.add_argument("--train-tokens", type=int, default=8192, help="target tokens per training batch")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_gpu.py: --device cuda but torch sees no CUDA GPU\n")
    if args.tiny:
        args.experts, args.d_hidden, args.repeats = [4, 8], [32], min(args.repeats, 2)
    device = torch.device(args.device)
    result: dict[str, Any] = {
        "device": _describe(device),
        "torch": torch.__version__,
        "args": _jsonable(args),
    }
    result["layer"] = list(layer_cases(args, device))
    if not args.skip_train:
        result["train_step"] = train_steps(args, device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def layer_cases(args: argparse.Namespace, device: torch.device):
    d_model = 32 if args.tiny else 1024
    for d_hidden in args.d_hidden:
        for num_experts in args.experts:
            for regime, tokens in (("tokens", 256 if args.tiny else 16_384), ("per_expert", None)):
                tokens = tokens or 256 * num_experts // K // (8 if args.tiny else 1)
                params = 2 * num_experts * d_model * d_hidden  # the experts' two weight banks
                gib = params * (4 + 4 + 2) / 2**30  # fp32 weights and gradients, autocast's bf16 copy
                case = {"d_hidden": d_hidden, "experts": num_experts, "regime": regime, "tokens": tokens}
                if gib > args.max_weight_gib:
                    yield {**case, "skipped": f"experts need ~{gib:.0f} GiB > --max-weight-gib"}
                    continue
                yield {**case, **time_layer(d_model, d_hidden, num_experts, tokens, args, device)}


def time_layer(
    d_model: int, d_hidden: int, num_experts: int, tokens: int, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    moe = MoELayer(d_model, d_hidden, num_experts, k=K, expert_backend=args.backend).to(device)
    with torch.no_grad():  # a trained-looking router: the paper's zero init would route every token alike
        moe.gate.w_gate.normal_(std=d_model**-0.5)
    dense = FeedForward(d_model, K * d_hidden, bias=False).to(device)
    x = torch.randn(tokens, d_model, device=device, requires_grad=True)
    grad = torch.randn(tokens, d_model, device=device)

    def moe_step() -> None:
        with _autocast(device):
            out = moe(x)
        (out.y.float() * grad).sum().add(out.aux_loss).backward()

    def dense_step() -> None:
        with _autocast(device):
            y = dense(x)
        (y.float() * grad).sum().backward()

    times = interleaved({"moe": moe_step, "dense": dense_step}, args.repeats, device)
    flops = 3 * 2 * 2 * tokens * K * d_model * d_hidden
    return {
        "moe_s": times["moe"],
        "dense_s": times["dense"],
        "moe_over_dense": times["dense"] / times["moe"],
        "moe_tokens_per_s": tokens / times["moe"],
        "moe_s_per_token": times["moe"] / tokens,
        "moe_tflops": flops / times["moe"] / 1e12,
        "dense_tflops": flops / times["dense"] / 1e12,
        "grouped_gemm": moe.experts.uses_grouped_gemm(x.to(torch.bfloat16) if device.type == "cuda" else x),
    }


def train_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The flat-32 and the one-GPU hierarchical WMT'14 models, each against its dense twin."""
    models = {
        "flat32": _recipe_model("config_flat32.yaml", args),
        "hierarchical": _recipe_model("config.yaml", args, num_experts=args.hier_experts),
    }
    out = {}
    for name, config in models.items():
        steps = {
            "moe": _train_step(config, args, device),
            "dense": _train_step(dataclasses.replace(config, ffn="dense"), args, device),
        }
        times = interleaved(steps, args.repeats, device)
        tokens = 2 * args.train_tokens  # source + target
        out[name] = {
            "model": {
                **{key: getattr(config.moe, key) for key in ("num_experts", "k", "gate", "d_hidden")},
                "hidden_size": config.hidden_size,
            },
            "moe_s": times["moe"],
            "dense_s": times["dense"],
            "moe_over_dense": times["dense"] / times["moe"],
            "moe_tokens_per_s": tokens / times["moe"],
            "dense_tokens_per_s": tokens / times["dense"],
        }
    return out


def _recipe_model(config: str, args: argparse.Namespace, **moe_overrides: Any) -> Seq2SeqConfig:
    """The recipe's model (vocabulary 32k, no dropout), MoE settings overridden; --tiny shrinks it."""
    kwargs = yaml.safe_load((RECIPES / config).read_text())["model"]["model"]
    kwargs = {**kwargs, "vocab_size": 32_000, "dropout": 0.0}
    moe = {**kwargs["moe"], **moe_overrides}
    if args.tiny:
        kwargs.update(vocab_size=200, embed_dim=16, hidden_size=32)
        moe.update(d_hidden=32, num_experts=8, num_groups=2 if "num_groups" in moe else 1)
    return Seq2SeqConfig.from_dict({**kwargs, "moe": moe})


def _train_step(config: Seq2SeqConfig, args: argparse.Namespace, device: torch.device) -> Callable[[], None]:
    torch.manual_seed(0)
    model = Seq2Seq(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    length = 32 if args.tiny else 64
    batch = max(1, (64 if args.tiny else args.train_tokens) // length)
    vocab = config.vocab_size
    src = torch.randint(4, vocab, (batch, length), device=device)
    tgt = torch.randint(4, vocab, (batch, length + 1), device=device)
    lengths = torch.full((batch,), length, device="cpu")

    def step() -> None:
        with _autocast(device):
            out = model(src, lengths.to(device), tgt[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), tgt[:, 1:].flatten()) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def interleaved(steps: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each step, run round-robin after one warm-up call each."""
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 on a GPU; float32 on CPU (bf16 there is a correctness path, not a fast one)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm{major}{minor})"
    return f"cpu, {torch.get_num_threads()} threads"


def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}


if __name__ == "__main__":
    main()

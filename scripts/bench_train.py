"""Training throughput of the dense baseline and MoE models of equal active size, on Multi30k batches.

Prints one JSON object: per model its parameter counts (total / active per token), training tokens/s
(source + target tokens, padding excluded, forward + backward + Adam step) and the ratio to the dense model.
All models run interleaved, round by round, in one process, so a busy machine slows them alike; the median
round is reported.

Batches are built like a training run's: a joint 8k BPE SentencePiece model trained on the Multi30k training
text (about 1 s), sentences bucketed by length, up to --batch-tokens tokens per batch counted as
batch size x longest side (OpenNMT-py's "tokens" batches). Without the corpus, synthetic ids with Multi30k's
length distribution (mean ~13 words) stand in.

    python scripts/bench_train.py                       # lstm, dense, moe8, moe32, moe128
    python scripts/bench_train.py --models dense moe32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from nmt_moe.allocator import keep_freed_memory
from nmt_moe.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from nmt_moe.models import Seq2Seq, Seq2SeqConfig, parameter_counts
from nmt_moe.moe import MoEConfig, MoELayer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
Batch = dict[str, torch.Tensor]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="Multi30k folder (train.en, train.de)"
    )
    parser.add_argument("--src", default="en")
    parser.add_argument("--tgt", default="de")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--batches", type=int, default=3, help="training steps per model per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds after one warm-up round")
    parser.add_argument("--models", nargs="+", default=["lstm", "dense", "moe8", "moe32", "moe128"])
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2, help="LSTM layers in encoder and in decoder")
    parser.add_argument("--d-hidden", type=int, default=512, help="expert hidden size (dense: k x this)")
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--no-input-feeding", dest="input_feeding", action="store_false")
    parser.add_argument("--attention", default="general")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--malloc",
        choices=("keep", "default"),
        default="keep",
        help="keep: glibc keeps freed memory for reuse, as `nmt-moe train` runs (nmt_moe.allocator); "
        "default: glibc's own settings",
    )
    args = parser.parse_args()
    args.malloc = "keep" if args.malloc == "keep" and keep_freed_memory() else "default"

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    pairs, source = load_pairs(args)
    batches = make_batches(pairs, args.batch_tokens, count=args.batches, seed=args.seed)

    results: dict[str, dict[str, Any]] = {}
    runners = {name: Runner(model_config(name, args)) for name in args.models}
    for name, runner in runners.items():
        results[name] = {**parameter_counts(runner.model), "step_s": [], "tokens_per_s": []}
    for round_index in range(args.rounds + 1):  # round 0 warms up allocators and oneDNN kernels
        for name, runner in runners.items():
            seconds, tokens = runner.train(batches)
            if round_index > 0:
                results[name]["tokens_per_s"].append(tokens / seconds)
                results[name]["step_s"].append(seconds / len(batches))

    dense_speed = statistics.median(results["dense"]["tokens_per_s"]) if "dense" in results else None
    lstm_params = results["lstm"]["total"] if "lstm" in results else None
    dense_params = results["dense"]["total"] if "dense" in results else None
    for row in results.values():
        row["tokens_per_s_rounds"] = [round(x) for x in row.pop("tokens_per_s")]
        row["tokens_per_s"] = round(statistics.median(row["tokens_per_s_rounds"]))
        row["step_s"] = round(statistics.median(row["step_s"]), 3)
        if dense_speed:
            row["speed_vs_dense"] = round(row["tokens_per_s"] / dense_speed, 3)
            row["params_vs_dense"] = round(row["total"] / dense_params, 2)
        if lstm_params:
            row["params_vs_lstm"] = round(row["total"] / lstm_params, 2)
    print(
        json.dumps(
            {
                "benchmark": "train_tokens_per_s",
                "data": source,
                "batch_tokens": args.batch_tokens,
                "batches": [describe(b) for b in batches],
                "model": {k: v for k, v in vars(args).items() if k not in ("data", "models")},
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                "torch_threads": torch.get_num_threads(),
                "results": results,
            },
            indent=1,
        )
    )


def model_config(name: str, args: argparse.Namespace) -> Seq2SeqConfig:
    """lstm: no FFN layers; dense: FFN of hidden k x d_hidden; moeE: E experts of hidden d_hidden, top-k."""
    shared = dict(
        vocab_size=args.vocab_size, embed_dim=args.embed_dim, hidden_size=args.hidden_size,
        encoder_layers=args.layers, decoder_layers=args.layers, attention=args.attention,
        input_feeding=args.input_feeding, dropout=0.1, encoder_moe_after=[1], decoder_moe_after=[1],
    )  # fmt: skip
    moe = dict(k=args.k, d_hidden=args.d_hidden)
    if name == "lstm":
        return Seq2SeqConfig(**shared, ffn="none", moe=MoEConfig(**moe))
    if name == "dense":
        return Seq2SeqConfig(**shared, ffn="dense", moe=MoEConfig(**moe, num_experts=args.k))
    if name.startswith("moe") and name[3:].isdigit():
        return Seq2SeqConfig(**shared, ffn="moe", moe=MoEConfig(**moe, num_experts=int(name[3:])))
    raise ValueError(f"--models: unknown model {name!r} (lstm, dense, moe<experts>)")


class Runner:
    """A model with its optimizer; `train(batches)` runs one optimizer step per batch."""

    def __init__(self, config: Seq2SeqConfig) -> None:
        self.model = Seq2Seq(config).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.moe_layers = [m for m in self.model.modules() if isinstance(m, MoELayer)]

    def train(self, batches: list[Batch]) -> tuple[float, int]:
        """Returns (seconds, source + target tokens)."""
        tokens = 0
        start = time.perf_counter()
        for batch in batches:
            tgt_out = batch["tgt"][:, 1:]
            out = self.model(batch["src"], batch["src_lengths"], batch["tgt"][:, :-1])
            loss = F.cross_entropy(
                out.logits.reshape(-1, out.logits.shape[-1]), tgt_out.reshape(-1),
                ignore_index=PAD_ID, label_smoothing=0.1,
            )  # fmt: skip
            self.optimizer.zero_grad(set_to_none=False)  # keeps gradient buffers alive between steps
            (loss + out.aux_loss).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            for layer in self.moe_layers:
                layer.update_bias()
            tokens += int(batch["src_lengths"].sum()) + int((tgt_out != PAD_ID).sum())
        return time.perf_counter() - start, tokens


def load_pairs(args: argparse.Namespace) -> tuple[list[tuple[list[int], list[int]]], str]:
    """Token id pairs (no BOS/EOS yet) from Multi30k through a fresh BPE model, or synthetic ones."""
    src_file, tgt_file = args.data / f"train.{args.src}", args.data / f"train.{args.tgt}"
    if not (src_file.exists() and tgt_file.exists()):
        rng = random.Random(args.seed)
        lengths = [max(2, min(40, round(rng.gauss(16, 5)))) for _ in range(29000)]
        pairs = [
            ([rng.randrange(4, args.vocab_size) for _ in range(n)],
             [rng.randrange(4, args.vocab_size) for _ in range(max(2, n + rng.randint(-3, 3)))])
            for n in lengths
        ]  # fmt: skip
        return pairs, "synthetic (Multi30k-like lengths)"
    import sentencepiece as spm

    src_lines = src_file.read_text(encoding="utf-8").splitlines()
    tgt_lines = tgt_file.read_text(encoding="utf-8").splitlines()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(src_lines + tgt_lines), model_prefix=prefix, vocab_size=args.vocab_size,
            model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            character_coverage=1.0, minloglevel=2,
        )  # fmt: skip
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    pairs = list(zip(sp.encode(src_lines), sp.encode(tgt_lines), strict=True))
    return [
        (s, t) for s, t in pairs if s and t
    ], f"{src_file.parent} ({args.src}-{args.tgt}, {len(pairs)} pairs)"


def make_batches(
    pairs: list[tuple[list[int], list[int]]], batch_tokens: int, count: int, seed: int
) -> list[Batch]:
    """`count` random length-bucketed batches of at most batch_tokens (batch size x longest side)."""
    rng = random.Random(seed)
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1]), rng.random()))
    groups, current, longest = [], [], 0
    for i in order:
        side = max(len(pairs[i][0]) + 1, len(pairs[i][1]) + 2)  # + EOS / + BOS, EOS
        if current and (len(current) + 1) * max(longest, side) > batch_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, side)
    groups.append(current)
    return [collate([pairs[i] for i in group]) for group in rng.sample(groups, min(count, len(groups)))]


def collate(pairs: list[tuple[list[int], list[int]]]) -> Batch:
    """The batch contract: src = ids + EOS, tgt = BOS + ids + EOS, both right-padded with PAD."""
    src = [torch.tensor(s + [EOS_ID]) for s, _ in pairs]
    tgt = [torch.tensor([BOS_ID] + t + [EOS_ID]) for _, t in pairs]
    pad = torch.nn.utils.rnn.pad_sequence
    return {
        "src": pad(src, batch_first=True, padding_value=PAD_ID),
        "src_lengths": torch.tensor([len(s) for s in src]),
        "tgt": pad(tgt, batch_first=True, padding_value=PAD_ID),
    }


def describe(batch: Batch) -> dict[str, int]:
    return {
        "sentences": batch["src"].shape[0],
        "src_len": batch["src"].shape[1],
        "tgt_len": batch["tgt"].shape[1],
    }


if __name__ == "__main__":
    main()

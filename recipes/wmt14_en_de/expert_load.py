"""Expert load per MoE layer over a training run, from the CSV log `ExpertLoadMonitor` writes.

Each logged interval has, per layer, `moe/<layer>/max_load_share`: the busiest expert's share of the
layer's token-expert assignments. Uniform is 1/E; this prints, per layer, that share as a multiple of
uniform (E x share) for the first and last interval and the worst over the run, and says whether every
layer stayed within `--limit` (default 2x) of uniform after the first `--skip` intervals.

    python recipes/wmt14_en_de/expert_load.py OUT/train/csv/version_0/metrics.csv --num-experts 64
    python recipes/wmt14_en_de/expert_load.py OUT/train/csv/version_0/metrics.csv --export OUT/export

Exit code 0 when balanced, 1 when a layer went over the limit, 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from nmt_moe.models import Seq2SeqConfig

SUFFIX = "/max_load_share"


def load_ratios(metrics_csv: Path, num_experts: int) -> dict[str, list[tuple[int, float]]]:
    """layer -> [(step, E x max_load_share)] in step order."""
    ratios: dict[str, list[tuple[int, float]]] = {}
    with metrics_csv.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key and key.startswith("moe/") and key.endswith(SUFFIX) and value not in ("", None):
                    layer = key[len("moe/") : -len(SUFFIX)]
                    ratios.setdefault(layer, []).append((int(row["step"]), num_experts * float(value)))
    return {layer: sorted(points) for layer, points in sorted(ratios.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics_csv", type=Path)
    experts = parser.add_mutually_exclusive_group(required=True)
    experts.add_argument("--num-experts", type=int, help="experts per MoE layer")
    experts.add_argument("--export", type=Path, help="an export directory: num_experts from its config.json")
    parser.add_argument("--limit", type=float, default=2.0, help="allowed max share / uniform (default 2)")
    parser.add_argument("--skip", type=int, default=0, help="intervals to leave out at the start")
    args = parser.parse_args(argv)
    if args.export is not None:
        try:
            config = json.loads((args.export / "config.json").read_text(encoding="utf-8"))
            args.num_experts = Seq2SeqConfig.from_dict(config["model_config"]).moe.num_experts
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(
                f"expert_load: error: no num_experts in {args.export}/config.json: {error}", file=sys.stderr
            )
            return 2
    if not args.metrics_csv.is_file() or args.num_experts < 1:
        print(f"expert_load: error: no metrics file {args.metrics_csv} or bad --num-experts", file=sys.stderr)
        return 2
    ratios = load_ratios(args.metrics_csv, args.num_experts)
    if not ratios:
        print(f"expert_load: error: no moe/*/max_load_share column in {args.metrics_csv}", file=sys.stderr)
        return 2
    balanced = True
    print(f"expert load: busiest expert's share x {args.num_experts} experts (1.0 = uniform)")
    for layer, points in ratios.items():
        judged = points[args.skip :] or points
        worst_step, worst = max(judged, key=lambda point: point[1])
        ok = worst <= args.limit
        balanced &= ok
        first, last = points[0][1], points[-1][1]
        verdict = f"{'within' if ok else 'OVER'} {args.limit:g}x"
        print(f"  {layer:<14} intervals {len(points):3d}  first {first:.2f}  last {last:.2f}  "
              f"worst {worst:.2f} (step {worst_step})  {verdict}")  # fmt: skip
    print(f"expert load balanced: {'yes' if balanced else 'no'}")
    return 0 if balanced else 1


if __name__ == "__main__":
    sys.exit(main())

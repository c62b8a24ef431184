"""Validation BLEU over training time for several runs of `nmt-moe train` (e.g. MoE vs dense), one PNG.

Reads each run's CSV log (`<run>/train/csv/version_*/metrics.csv`, written with `--wandb off`, as the
Multi30k recipes do) for `val/bleu` by step; a resumed run's later logs (version_1, ...) continue its curve.
The CSV has no clock, so steps become minutes at the run's mean pace: from the start of training (the first
log's hparams.yaml) to its newest `step=N` checkpoint. `--x step` plots against the step instead, the
like-for-like axis for runs that were interrupted or shared the machine.

    python scripts/plot_val_bleu.py moe=runs/multi30k_en_de dense=runs/multi30k_dense -o docs/val_bleu.png
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def metrics_files(run: Path) -> list[Path]:
    """The CSV logs of a recipe run directory (or of a training root directory), oldest first."""
    for logs in (run / "train" / "csv", run / "csv"):
        found = sorted(logs.glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
        if found:
            return found
    raise FileNotFoundError(f"{run}: no csv/version_*/metrics.csv (train with --wandb off)")


def val_bleu(logs: list[Path]) -> list[tuple[int, float]]:
    """(step, validation BLEU) of Lightning CSV logs in step order; a later log wins a repeated step."""
    by_step = {}
    for metrics in logs:
        with metrics.open() as handle:
            by_step.update(
                {int(r["step"]): float(r["val/bleu"]) for r in csv.DictReader(handle) if r.get("val/bleu")}
            )
    return sorted(by_step.items())


def minutes_per_step(metrics: Path) -> float:
    """Mean wall-clock minutes per training step (validation included): hparams.yaml to newest checkpoint."""
    start = (metrics.parent / "hparams.yaml").stat().st_mtime
    checkpoints = [
        p for d in ("average", "checkpoints") for p in metrics.parents[2].glob(f"{d}/*step=*.ckpt")
    ]
    if not checkpoints:
        raise FileNotFoundError(f"{metrics.parents[2]}/checkpoints: no step=N checkpoints to time the run")
    newest = max(checkpoints, key=lambda p: p.stat().st_mtime)
    step = int(newest.stem.split("step=")[1])
    return (newest.stat().st_mtime - start) / 60 / max(step, 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="LABEL=RUN_DIR (a recipe's output directory)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    parser.add_argument("--x", choices=("minutes", "step"), default="minutes", help="horizontal axis")
    args = parser.parse_args()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    summary = {}
    for spec in args.runs:
        label, _, directory = spec.partition("=")
        if not directory:
            parser.error(f"expected LABEL=RUN_DIR, got {spec!r}")
        logs = metrics_files(Path(directory))
        points = val_bleu(logs)
        summary[label] = {"val_bleu": points}
        pace = 1.0
        if args.x == "minutes":
            pace = summary[label]["minutes_per_step"] = minutes_per_step(logs[0])
        ax.plot([s * pace for s, _ in points], [b for _, b in points], marker="o", label=label)
    ax.set_xlabel("training wall clock (minutes)" if args.x == "minutes" else "training step")
    ax.set_ylabel("validation BLEU (greedy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

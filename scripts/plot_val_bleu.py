"""Validation BLEU over training time for several runs of `nmt-moe train` (e.g. MoE vs dense), one PNG.

Reads each run's CSV log (`<run>/train/csv/version_*/metrics.csv`, written with `--wandb off`, as the
Multi30k recipes do) for `val/bleu` by step. The CSV has no clock, so steps become minutes at the run's mean
pace: from the start of training (the log's hparams.yaml) to its newest `step=N` checkpoint.

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


def metrics_file(run: Path) -> Path:
    """The newest CSV log of a recipe run directory (or of a training root directory)."""
    found = sorted((run / "train" / "csv").glob("version_*/metrics.csv")) or sorted(
        (run / "csv").glob("version_*/metrics.csv")
    )
    if not found:
        raise FileNotFoundError(f"{run}: no csv/version_*/metrics.csv (train with --wandb off)")
    return found[-1]


def val_bleu(metrics: Path) -> list[tuple[int, float]]:
    """(step, validation BLEU) rows of a Lightning CSV log, in step order."""
    with metrics.open() as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val/bleu")]
    return sorted((int(r["step"]), float(r["val/bleu"])) for r in rows)


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
    args = parser.parse_args()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    summary = {}
    for spec in args.runs:
        label, _, directory = spec.partition("=")
        if not directory:
            parser.error(f"expected LABEL=RUN_DIR, got {spec!r}")
        metrics = metrics_file(Path(directory))
        points = val_bleu(metrics)
        pace = minutes_per_step(metrics)
        ax.plot([s * pace for s, _ in points], [b for _, b in points], marker="o", label=label)
        summary[label] = {"minutes_per_step": round(pace, 4), "val_bleu": points}
    ax.set_xlabel("training wall clock (minutes)")
    ax.set_ylabel("validation BLEU (greedy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

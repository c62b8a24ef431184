"""Expert load per MoE layer over training, from a run's CSV log: one heat-map row per layer (expert x
logging interval, share of the layer's token assignments), plus each layer's load CV over time.

Reads the `moe/<layer>/load/<expert>` columns the ExpertLoadMonitor callback logs (`--wandb off` writes them
to `<run>/train/csv/version_*/metrics.csv`, as the Multi30k recipes do).

    python scripts/plot_expert_load.py runs/multi30k_en_de -o docs/expert_load.png
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOAD = re.compile(r"^moe/(?P<layer>[^/]+)/load/(?P<expert>\d+)$")


def load_history(metrics: Path) -> tuple[list[int], dict[str, list[list[float]]]]:
    """Steps of the logged intervals and, per layer, one load-share row [experts] per interval."""
    with metrics.open() as handle:
        reader = csv.DictReader(handle)
        columns = [(m["layer"], int(m["expert"]), c) for c in reader.fieldnames or [] if (m := LOAD.match(c))]
        rows = [r for r in reader if any(r.get(c) for _, _, c in columns)]
    if not columns:
        raise ValueError(
            f"{metrics}: no moe/<layer>/load/<expert> columns (a dense model, or no MoE logging)"
        )
    layers = sorted({layer for layer, _, _ in columns})
    history: dict[str, list[list[float]]] = {}
    for layer in layers:
        cols = sorted((e, c) for name, e, c in columns if name == layer)
        history[layer] = [[float(r[c] or 0.0) for _, c in cols] for r in rows]
    return [int(r["step"]) for r in rows], history


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a recipe's output directory")
    parser.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    args = parser.parse_args()

    found = sorted((args.run / "train" / "csv").glob("version_*/metrics.csv"))
    if not found:
        parser.error(f"{args.run}: no train/csv/version_*/metrics.csv")
    steps, history = load_history(found[-1])
    fig, axes = plt.subplots(len(history), 1, figsize=(7, 2.6 * len(history)), squeeze=False)
    summary = {}
    for ax, (layer, rows) in zip(axes[:, 0], history.items(), strict=True):
        shares = list(map(list, zip(*rows, strict=True)))  # [experts][intervals]
        image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(steps[0], steps[-1], len(shares) - 0.5, -0.5))  # fmt: skip
        ax.set_title(f"{layer}: share of token assignments per expert")
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax)
        last = rows[-1]
        summary[layer] = {
            "final_share": [round(x, 4) for x in last],
            "max_over_uniform": round(max(last) * len(last), 3),
        }
    axes[-1, 0].set_xlabel("training step")
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=120)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Multi30k English->German, dense baseline: multi30k_en_de's steps with config.yaml from this directory.
# Usage: recipes/multi30k_dense/run.sh [--smoke] [DATA_DIR [OUT_DIR]] [-- TRAIN_ARGS...]
#   (defaults ../shared/data/multi30k and runs/multi30k_dense; see recipes/multi30k_en_de/run.sh --help)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RECIPE=multi30k_dense CONFIG="$here/config.yaml" exec "$here/../multi30k_en_de/run.sh" "$@"

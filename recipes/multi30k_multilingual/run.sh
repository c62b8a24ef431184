#!/usr/bin/env bash
# Multi30k English->{German, French, Czech} in one model: multi30k_en_de's steps with this directory's
# config, then each pair translated (--target-lang) and scored on test_2016_flickr.
# Usage: recipes/multi30k_multilingual/run.sh [--dense] [--smoke] [DATA_DIR [OUT_DIR]] [-- TRAIN_ARGS...]
#   --dense   the dense twin (config_dense.yaml; default OUT_DIR runs/multi30k_multilingual_dense)
#   (defaults ../shared/data/multi30k and runs/multi30k_multilingual; see recipes/multi30k_en_de/run.sh)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="$here/config.yaml"
recipe=multi30k_multilingual
args=()
while (($#)); do
  case "$1" in
    --dense) config="$here/config_dense.yaml"; recipe=multi30k_multilingual_dense ;;
    --) args+=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done
RECIPE="$recipe" CONFIG="$config" TGT="de fr cs" exec "$here/../multi30k_en_de/run.sh" "${args[@]}"

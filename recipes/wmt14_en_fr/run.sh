#!/usr/bin/env bash
# WMT'14 English->French (Shazeer et al. 2017 setup): the WMT'14 English->German pipeline with this recipe's
# configs and languages. Arguments, data layout (train.en train.fr newstest2013.* newstest2014.*), --smoke,
# --variant and the 8-GPU and SLURM launch lines: see recipes/wmt14_en_de/run.sh, with wmt14_en_fr in the paths.
#
#   nmt-moe plan recipes/wmt14_en_fr/config.yaml --gpus 8 --expert-parallel-size 8
#   recipes/wmt14_en_fr/run.sh /data/wmt14_en_fr runs/wmt14_en_fr
#   sbatch --nodes 4 --ntasks-per-node 8 --gpus-per-node 8 --cpus-per-task 8 --time 72:00:00 \
#     --wrap "TRAIN_LAUNCHER=srun NUM_NODES=4 recipes/wmt14_en_fr/run.sh /data/wmt14_en_fr runs/wmt14_en_fr"
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RECIPE=wmt14_en_fr SRC=en TGT=fr HUB_CONFIG=fr-en RECIPE_DIR="$here" exec "$here/../wmt14_en_de/run.sh" "$@"

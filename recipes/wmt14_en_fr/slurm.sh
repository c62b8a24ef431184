#!/usr/bin/env bash
# WMT'14 English->French (config.yaml: 2048 experts, 8.7B parameters) on 8 nodes x 8 GPUs under SLURM.
#
#   sbatch recipes/wmt14_en_fr/slurm.sh DATA_DIR OUT_DIR [TRAIN_ARGS...]     (from the repository root)
#
# One task per GPU (--ntasks-per-node equals the config's trainer.devices, 8); Lightning reads SLURM's
# variables under srun. Data preparation, averaging, export and scoring run once, in this batch script;
# only training runs under srun (run.sh's TRAIN_LAUNCHER). The experts are sharded over all 64 GPUs
# (expert_parallel_size 64): `nmt-moe plan recipes/wmt14_en_fr/config.yaml --gpus 64
# --expert-parallel-size 64` gives the memory per GPU. Generated settings must agree with config.yaml:
# tests/recipes/test_wmt.py checks them and `bash -n`s this file.
#SBATCH --job-name=wmt14_en_fr
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
set -euo pipefail

RECIPE=wmt14_en_fr
NODES=8
EXPERT_PARALLEL_SIZE=64
cd "${SLURM_SUBMIT_DIR:-.}"  # sbatch runs a copy of this file; paths are relative to where it was submitted
data="${1:-../shared/data/$RECIPE}"
out="${2:-runs/$RECIPE}"
shift $(($# < 2 ? $# : 2))
TRAIN_LAUNCHER=srun NUM_NODES="${SLURM_JOB_NUM_NODES:-$NODES}" exec "recipes/$RECIPE/run.sh" "$data" "$out" -- \
  --model.expert_parallel_size "$EXPERT_PARALLEL_SIZE" "$@"

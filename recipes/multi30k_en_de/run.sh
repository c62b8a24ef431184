#!/usr/bin/env bash
# Multi30k English->German on one CPU box (the quick start): prepare -> train -> average -> export ->
# translate test_2016_flickr with beam search -> score (cased sacreBLEU 13a and chrF, with signatures).
#
# Usage: recipes/multi30k_en_de/run.sh [--smoke] [DATA_DIR [OUT_DIR]] [-- TRAIN_ARGS...]
#   DATA_DIR  Multi30k raw text: train.{en,de} val.{en,de} test_2016_flickr.{en,de} (and .fr/.cs for the
#             multilingual recipe)
#             (default ../shared/data/multi30k, relative to the repository root).
#             With a network, the same files come from the HF hub, e.g. the `bentrevett/multi30k` dataset:
#               python -c "import datasets; ds = datasets.load_dataset('bentrevett/multi30k')
#               [open(f'data/multi30k/{n}.{l}', 'w').writelines(r[l] + '\n' for r in ds[s])
#                for s, n in [('train', 'train'), ('validation', 'val'), ('test', 'test_2016_flickr')]
#                for l in ('en', 'de')]"
#   OUT_DIR   everything the run writes (default runs/multi30k_en_de); the exported model ends up in
#             OUT_DIR/export, ready for `nmt-moe translate -m OUT_DIR/export`.
#   --smoke   the same steps with a tiny model on the first few hundred lines (CI check, about a minute).
#   TRAIN_ARGS are passed to `nmt-moe train fit` after the configs (e.g. --trainer.max_time 00:00:10:00).
#   Other recipes reuse this script through RECIPE, CONFIG and TGT (several target languages:
#   TGT="de fr cs" translates and scores each pair, asking for it with --target-lang).
#   Environment: FRESH=1 discards an earlier run's checkpoints (default: resume from last.ckpt);
#   WANDB=auto|online|offline|off (default auto: offline, online once an API key is configured;
#   off logs CSV only); OMP_NUM_THREADS (default 2);
#   OMP_WAIT_POLICY (default PASSIVE: steady on a shared machine; unset it on a quiet one).
set -euo pipefail

RECIPE_DIR="${RECIPE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}"
REPO_DIR="$(cd "$RECIPE_DIR/../.." && pwd)"
RECIPE="${RECIPE:-multi30k_en_de}"
CONFIG="${CONFIG:-$RECIPE_DIR/config.yaml}"
SRC="${SRC:-en}"
read -r -a TGTS <<<"${TGT:-de}"
BEAM=5
ALPHA=0.6
AVERAGE_N=3
SAVE_EVERY=50

smoke=false
positional=()
train_args=()
while (($#)); do
  case "$1" in
    --smoke) smoke=true ;;
    --) shift; train_args=("$@"); break ;;
    -h|--help) sed -n '2,22p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) positional+=("$1") ;;
  esac
  shift
done
DATA="${positional[0]:-$REPO_DIR/../shared/data/multi30k}"
OUT="${positional[1]:-runs/$RECIPE}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
WANDB="${WANDB:-auto}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"

for split in train val test_2016_flickr; do
  for lang in "$SRC" "${TGTS[@]}"; do
    if [[ ! -f "$DATA/$split.$lang" ]]; then
      echo "run.sh: expected $DATA/$split.$lang (Multi30k raw text; see --help for the HF hub route)" >&2
      exit 2
    fi
  done
done
mkdir -p "$OUT"
start=$SECONDS

configs=(--config "$CONFIG")
data_settings=(pipeline.train "$DATA/train" pipeline.valid "$DATA/val" pipeline.test "$DATA/test_2016_flickr"
  cache_dir "$OUT/cache")
if $smoke; then
  # The first lines of each split, so the smoke run needs nothing but the real corpus.
  mkdir -p "$OUT/data"
  for lang in "$SRC" "${TGTS[@]}"; do
    head -n 400 "$DATA/train.$lang" >"$OUT/data/train.$lang"
    head -n 40 "$DATA/val.$lang" >"$OUT/data/val.$lang"
    head -n 40 "$DATA/test_2016_flickr.$lang" >"$OUT/data/test_2016_flickr.$lang"
  done
  DATA="$OUT/data"
  configs+=(--config "$RECIPE_DIR/smoke.yaml")
  # Data settings 400 lines can support (also given to prepare, which reads one config only).
  data_settings=(pipeline.train "$DATA/train" pipeline.valid "$DATA/val" pipeline.test "$DATA/test_2016_flickr"
    cache_dir "$OUT/cache" pipeline.vocab_size 300 max_tokens 1024 pipeline.cleaning.max_tokens_per_sentence 64)
  BEAM=2
  AVERAGE_N=2
  SAVE_EVERY=4
fi
# Periodic checkpoints named step=N (what `nmt-moe average --last` orders by), the newest AVERAGE_N kept,
# in a directory of their own (the best-by-BLEU and last.ckpt checkpoints must not enter the average).
cat >"$OUT/average_checkpoints.yaml" <<YAML
trainer:
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args:
        dirpath: $OUT/train/average
        filename: "avg-{step}"
        monitor: step
        mode: max
        save_top_k: $AVERAGE_N
        every_n_train_steps: $SAVE_EVERY
YAML
configs+=(--config "$OUT/average_checkpoints.yaml")
prepare_flags=()
train_data_flags=()
for ((i = 0; i < ${#data_settings[@]}; i += 2)); do
  prepare_flags+=("--${data_settings[i]}" "${data_settings[i + 1]}")
  train_data_flags+=("--data.${data_settings[i]}" "${data_settings[i + 1]}")
done

echo "== prepare ($((SECONDS - start)) s)"
nmt-moe prepare --config "$CONFIG" "${prepare_flags[@]}"

echo "== train ($((SECONDS - start)) s)"
# An interrupted run (Ctrl-C, SIGTERM, a crash) left OUT/train/checkpoints/last.ckpt: carry on from it
# rather than starting over. FRESH=1 starts from scratch.
resume=()
if [[ "${FRESH:-0}" == 1 ]]; then
  rm -rf "$OUT/train/checkpoints" "$OUT/train/average"
elif [[ -f "$OUT/train/checkpoints/last.ckpt" ]]; then
  echo "resuming from $OUT/train/checkpoints/last.ckpt (FRESH=1 starts over)"
  resume=(--ckpt_path last)
fi
# The recipes train in bf16-mixed, which pays only on CPUs with native bfloat16 arithmetic.
precision=()
if [[ -r /proc/cpuinfo ]] && ! grep -q -E -m1 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
  echo "this CPU has no native bfloat16: training in 32-true"
  precision=(--trainer.precision 32-true)
fi
nmt-moe train fit "${configs[@]}" "${train_data_flags[@]}" "${precision[@]}" \
  --trainer.default_root_dir "$OUT/train" --wandb "$WANDB" "${resume[@]}" "${train_args[@]}"

echo "== average the $AVERAGE_N latest checkpoints, export ($((SECONDS - start)) s)"
rm -rf "$OUT/export"
nmt-moe average --last "$AVERAGE_N" "$OUT/train/average" -o "$OUT/averaged.ckpt"
nmt-moe export "$OUT/averaged.ckpt" -o "$OUT/export"
if [[ "$WANDB" != off ]]; then
  nmt-moe log-model --bundle "$OUT/export" --train_dir "$OUT/train" --wandb "$WANDB"
fi

: >"$OUT/scores.txt"
for tgt in "${TGTS[@]}"; do
  tag=()
  if ((${#TGTS[@]} > 1)); then tag=(--target-lang "$tgt"); fi
  echo "== translate test_2016_flickr $SRC->$tgt (beam $BEAM, alpha $ALPHA), score"
  nmt-moe translate -m "$OUT/export" -i "$DATA/test_2016_flickr.$SRC" -o "$OUT/test_2016_flickr.hyp.$tgt" \
    --beam "$BEAM" --alpha "$ALPHA" --threads "$OMP_NUM_THREADS" --quiet "${tag[@]}"
  echo "$SRC->$tgt" >>"$OUT/scores.txt"
  nmt-moe evaluate -i "$OUT/test_2016_flickr.hyp.$tgt" -r "$DATA/test_2016_flickr.$tgt" | tee -a "$OUT/scores.txt"
done
echo "wall clock: $((SECONDS - start)) s" | tee -a "$OUT/scores.txt"
echo "exported model: $OUT/export"
shopt -s nullglob
offline_runs=("$OUT"/train/wandb/offline-run-* "$OUT"/train/export/wandb/offline-run-*)
if ((${#offline_runs[@]})); then
  echo "W&B runs saved offline (training and export); upload them with:"
  echo "  wandb sync ${offline_runs[*]}"
fi

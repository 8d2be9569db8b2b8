#!/bin/bash
# RealEstate10K -> shards as a Slurm job array: each task takes every N-th group of --shard-size
# clips (group g goes to task g % N) and writes OUT/shard-<g>.tar and OUT/motion_images/shard-<g>.tar.
# Tasks are resumable: resubmitting skips finished groups. When all tasks are done, merge once:
#   python -m data_prep.merge "$OUT"
# Usage: RE10K=/data/re10k SPLIT=train OUT=/data/shards/re10k/train sbatch slurm/prep_realestate10k.sh
#SBATCH --job-name=prep-re10k
#SBATCH --array=0-63
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
: "${RE10K:?set RE10K to the dataset root (with <split>/ camera files and videos/ or frames/)}"
SPLIT=${SPLIT:-train}
OUT=${OUT:-data/re10k/$SPLIT}
FRAMES_ARG=${FRAMES_ARG:---videos $RE10K/videos}   # or: --frames $RE10K/frames/$SPLIT
CAPTIONS_ARG=${CAPTIONS_ARG:-}                     # e.g. --captions $RE10K/captions_$SPLIT.json
python -m data_prep.realestate10k --cameras "$RE10K/$SPLIT" $FRAMES_ARG $CAPTIONS_ARG --out "$OUT" \
    --size 256x256 --window 16 --stride 8 --shard-size 64 --workers "${SLURM_CPUS_PER_TASK:-1}" \
    --array-index "$SLURM_ARRAY_TASK_ID" --array-count "$SLURM_ARRAY_TASK_COUNT"

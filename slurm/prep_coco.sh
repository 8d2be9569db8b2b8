#!/bin/bash
# COCO -> image shards as a Slurm job array (group g of --shard-size images goes to task g % N).
# Resubmitting skips finished groups. When all tasks are done, merge once:
#   python -m data_prep.merge "$OUT"
# Usage: COCO=/data/coco SPLIT=train2017 OUT=/data/shards/coco/train sbatch slurm/prep_coco.sh
#SBATCH --job-name=prep-coco
#SBATCH --array=0-31
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=4:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
: "${COCO:?set COCO to the COCO root (with <split>/ images and annotations/)}"
SPLIT=${SPLIT:-train2017}
OUT=${OUT:-data/coco/$SPLIT}
python -m data_prep.coco --images "$COCO/$SPLIT" --captions "$COCO/annotations/captions_$SPLIT.json" \
    --instances "$COCO/annotations/instances_$SPLIT.json" --out "$OUT" --size 256 --shard-size 256 \
    --workers "${SLURM_CPUS_PER_TASK:-1}" \
    --array-index "$SLURM_ARRAY_TASK_ID" --array-count "$SLURM_ARRAY_TASK_COUNT"

#!/bin/bash
# Synthetic/AIGC image folder (flat + prompts.jsonl, or <split>/<motion>/*.jpg) -> image shards as a
# Slurm job array (group g of --shard-size images goes to task g % N). Resubmitting skips finished
# groups. When all tasks are done, merge once:
#   python -m data_prep.merge "$OUT"
# Usage: IMAGES=/data/aigc/train OUT=/data/shards/aigc/train [PROMPTS=/data/aigc/prompts.jsonl] sbatch slurm/prep_images.sh
#SBATCH --job-name=prep-images
#SBATCH --array=0-15
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=2:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
: "${IMAGES:?set IMAGES to the image folder}"
: "${OUT:?set OUT to the output folder}"
PROMPTS_ARG=${PROMPTS:+--prompts $PROMPTS}
python -m data_prep.images --images "$IMAGES" $PROMPTS_ARG --out "$OUT" --size 256 --shard-size 256 \
    --workers "${SLURM_CPUS_PER_TASK:-1}" \
    --array-index "$SLURM_ARRAY_TASK_ID" --array-count "$SLURM_ARRAY_TASK_COUNT"

#!/bin/bash
# Evaluate generators on test shards (python -m d4d.evaluate, one GPU; see docs/evaluation.md).
#   sbatch slurm/evaluate.sh --shards data/re10k/test --out runs/eval/dyn --dynamic runs/dynamic/checkpoints/step00010000.ckpt
# All arguments go to d4d.evaluate; --device cuda is added unless given. PYTHON: the interpreter.
#SBATCH --job-name=d4d-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
SCRIPT=$(realpath "$0")
cd "${SLURM_SUBMIT_DIR:-$(dirname "$SCRIPT")/..}"
source slurm/common.sh
d4d_submit_if_outside "$SCRIPT" "$@"
args=("$@")
[[ " $* " == *" --device "* ]] || args+=(--device cuda)
srun "${PYTHON:-python}" -m d4d.evaluate "${args[@]}"

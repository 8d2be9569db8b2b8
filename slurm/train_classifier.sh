#!/bin/bash
# Train the camera-motion classifier with d4d.fit on Slurm: one task per GPU, DDP or DeepSpeed as the recipe says.
#   sbatch slurm/train_classifier.sh [--d4d.fit overrides ...]
#   NODES=8 GPUS_PER_NODE=4 RECIPE=recipes/my.yaml bash slurm/train_classifier.sh --trainer.max_steps 1000
# (run with bash, the script submits itself with NODES / GPUS_PER_NODE as sbatch options; with
# sbatch, override the #SBATCH lines on its command line: sbatch --nodes=2 slurm/train_classifier.sh).
# Preemption: Slurm sends SIGUSR1 180 s before the time limit; d4d.fit saves
# <run_dir>/hpc_ckpt_<step>.ckpt, requeues the job, and the requeued job resumes (resume: auto)
# into the same wandb run. Other variables: see slurm/common.sh.
#SBATCH --job-name=d4d-classifier
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=2:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
SCRIPT=$(realpath "$0")
cd "${SLURM_SUBMIT_DIR:-$(dirname "$SCRIPT")/..}"
source slurm/common.sh
d4d_submit_if_outside "$SCRIPT" "$@"
STAGE=classifier
DEFAULT_RECIPE=recipes/classifier.yaml
d4d_train "$@"

#!/bin/bash
# Shared launcher of the slurm/train_*.sh scripts (sourced, not run). Each train script sets
#   STAGE (name used for the job and the default run dir) and DEFAULT_RECIPE, then calls
#   d4d_train "$@".
#
# Environment (all optional):
#   RECIPE         recipe YAML (default: the script's DEFAULT_RECIPE)
#   NODES          nodes to ask for when the script submits itself (bash slurm/train_x.sh ...)
#   GPUS_PER_NODE  GPUs (= tasks) per node when the script submits itself
#   RUN_DIR        run directory (default: the recipe's run_dir)
#   RESUME         resume mode passed to d4d.fit (default: auto, so a requeued job continues)
#   PYTHON         python interpreter (default: python on PATH, e.g. an activated venv)
#   MASTER_ADDR / MASTER_PORT   rendezvous (default: first node of the allocation / 10000 + job id % 20000)
#   D4D_FIT_ARGS   extra d4d.fit arguments (also: everything after the script name)
#   PROGRESS_EVERY progress-bar refresh every N training/validation batches (default 50): Lightning's bar
#                  redraws after every batch, a line per batch in the Slurm log. Exported as TQDM_MINITERS,
#                  which Lightning's TQDMProgressBar reads (refresh_rate = max(TQDM_MINITERS, the
#                  recipe's)); PROGRESS_EVERY=1 restores the per-batch bar
#
# Inside an allocation: checks that the Slurm task layout is one task per device on every node,
# derives nodes/devices from Slurm, then `srun python -m d4d.fit RECIPE --trainer.num_nodes N
# --trainer.devices T --resume auto ARGS`. Outside one: submits the script with sbatch.
set -euo pipefail

d4d_fail() {
    echo "d4d slurm: error: $*" >&2
    exit 2
}

# Submit this script when it is run outside Slurm: NODES / GPUS_PER_NODE become sbatch options.
d4d_submit_if_outside() {
    local script=$1
    shift
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        local opts=()
        [[ -n "${NODES:-}" ]] && opts+=("--nodes=$NODES")
        [[ -n "${GPUS_PER_NODE:-}" ]] && opts+=("--ntasks-per-node=$GPUS_PER_NODE" "--gpus-per-node=$GPUS_PER_NODE")
        mkdir -p logs
        exec sbatch "${opts[@]}" "$script" "$@"
    fi
}

# The layout d4d needs: SLURM_NTASKS = nodes x tasks-per-node and, when GPUs are allocated, as many
# tasks on each node as GPUs. Prints "NODES TASKS_PER_NODE" or fails with the mismatch.
d4d_check_layout() {
    local nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local ntasks=${SLURM_NTASKS:-1}
    local per_node=${SLURM_NTASKS_PER_NODE:-}
    per_node=${per_node%%(*}  # "2(x4)" -> "2"
    if [[ -z "$per_node" ]]; then
        per_node=$((ntasks / nodes))
    fi
    if [[ "$per_node" == *,* ]] || (( ntasks != nodes * per_node )); then
        d4d_fail "Slurm task layout ${SLURM_TASKS_PER_NODE:-?} tasks over $nodes nodes (ntasks=$ntasks) is uneven;" \
                 "d4d runs the same number of tasks on every node: use --nodes=N --ntasks-per-node=T"
    fi
    local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}
    gpus=${gpus##*:}  # "gpu:4" -> "4"
    if [[ -n "$gpus" && "$gpus" != "0" && "$gpus" != "$per_node" ]]; then
        d4d_fail "Slurm task layout: $per_node tasks per node but $gpus GPUs per node;" \
                 "d4d runs one task per GPU: set --ntasks-per-node equal to --gpus-per-node"
    fi
    echo "$nodes $per_node"
}

d4d_train() {
    local recipe=${RECIPE:-$DEFAULT_RECIPE}
    [[ -f "$recipe" ]] || d4d_fail "RECIPE $recipe: recipe file not found (run from the repository root)"
    local layout nodes per_node
    layout=$(d4d_check_layout) || exit 2
    read -r nodes per_node <<<"$layout"
    if [[ -z "${MASTER_ADDR:-}" ]]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    fi
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}
    export PYTHONUNBUFFERED=1
    [[ "${PROGRESS_EVERY:-50}" =~ ^[1-9][0-9]*$ ]] || d4d_fail "PROGRESS_EVERY ${PROGRESS_EVERY}: expected an integer >= 1"
    export TQDM_MINITERS=${PROGRESS_EVERY:-50}  # a log file, not a terminal: refresh every N batches
    local python=${PYTHON:-python}
    local args=(--trainer.num_nodes "$nodes" --trainer.devices "$per_node" --resume "${RESUME:-auto}")
    [[ -n "${RUN_DIR:-}" ]] && args+=(--run_dir "$RUN_DIR")
    # shellcheck disable=SC2206  # D4D_FIT_ARGS is split on spaces on purpose
    local extra=(${D4D_FIT_ARGS:-})
    echo "d4d slurm: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): $nodes nodes x $per_node tasks," \
         "master $MASTER_ADDR:$MASTER_PORT, recipe $recipe"
    srun --kill-on-bad-exit=1 "$python" -m d4d.fit "$recipe" "${args[@]}" "${extra[@]}" "$@"
}

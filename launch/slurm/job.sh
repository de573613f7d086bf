# Shared body of launch/slurm/*.sbatch (sourced by them; not submitted itself).
#
# One srun task per node runs `accelerate launch` for that node: node rank from SLURM_NODEID,
# evaluated inside each task (expanding it in the batch script would give every node rank 0);
# the main address is the allocation's first host; c10d rendezvous. Processes per node = the
# GPUs found there (1 on CPU nodes) unless NPROC_PER_NODE is set. ACCELERATE_CONFIG picks the
# accelerate config (default launch/accelerate/multi_gpu.yaml; e.g. deepspeed_zero3.yaml).
#
# Preemption: SLURM sends USR1 to this script <grace> seconds before the end (--signal=B:USR1@...).
# It is passed on to the training processes (the launchers ignore it), which finish the current
# optimizer step, save a checkpoint and exit 0; then the job is requeued and, started again,
# resumes from the latest checkpoint in output_dir. It is passed on only once every node's task
# ignores it (a task starts with SLURM's default, which a USR1 would kill: each one marks itself
# ready after its `trap`), then again every FTKIT_RESIGNAL_S seconds (10) until they exit, for
# processes still starting; a run warned before its first optimizer step (loading the model,
# scoring the base model) stops there, with nothing to save.
# A USR1 after the last optimizer step stops nothing: the run finishes its evaluation and export,
# and the job ends without a requeue (the training processes write FTKIT_STOPPED_FILE only when
# they stopped before the end).

if [ $# -lt 1 ]; then
    echo "usage: sbatch [options] launch/slurm/<file>.sbatch scripts/<recipe>.py --config RECIPE.yaml [--option value ...]" >&2
    exit 2
fi
submitted_from=${SLURM_SUBMIT_DIR:?submit with sbatch}
cd "$(dirname "${BASH_SOURCE[0]}")/../.."  # the repository root, where recipes name their paths from
if [ -f "${VENV:-.venv}/bin/activate" ]; then source "${VENV:-.venv}/bin/activate"; fi
mkdir -p logs
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$first_node" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2)  # what the nodes reach it by
MASTER_ADDR=${MASTER_ADDR:-$first_node}
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/accelerate/multi_gpu.yaml}
FTKIT_STOPPED_FILE="$PWD/logs/.ftkit-stopped-$SLURM_JOB_ID"  # written by the main process if it stopped early
FTKIT_READY_DIR="$PWD/logs/.ftkit-ready-$SLURM_JOB_ID"  # a file per node whose task ignores USR1
rm -rf "$FTKIT_STOPPED_FILE" "$FTKIT_READY_DIR"
mkdir -p "$FTKIT_READY_DIR"
export MASTER_ADDR MASTER_PORT ACCELERATE_CONFIG FTKIT_STOPPED_FILE FTKIT_READY_DIR
preempted=0
resender=
on_preemption() {
    [ "$preempted" = 1 ] && return
    preempted=1
    echo "[ftkit] $(date +%T) USR1: the training processes checkpoint and stop; the job will be requeued"
    # To the job steps' processes (not to this script), once every node's task ignores USR1: a task still
    # starting (before its `trap ""` below) would be killed by it. A process that has not yet installed its
    # handler (a launcher, or a training process still importing) ignores USR1 (inherited from that trap): say
    # it again every FTKIT_RESIGNAL_S seconds until the step ends. The training processes act on the first one
    # they get and ignore the rest.
    (
        trap "" USR1
        until [ "$(ls "$FTKIT_READY_DIR" 2>/dev/null | wc -l)" -ge "$SLURM_JOB_NUM_NODES" ]; do sleep 0.2; done
        while :; do
            scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null
            sleep "${FTKIT_RESIGNAL_S:-10}"
        done
    ) &
    resender=$!
}
trap on_preemption USR1
if [ "$PWD" != "$(cd "$submitted_from" && pwd)" ]; then
    echo "[ftkit] submitted from $submitted_from; runs in the repository root, $PWD, where relative paths are read from"
fi
echo "[ftkit] $(date +%T) job $SLURM_JOB_ID, start $(( ${SLURM_RESTART_COUNT:-0} + 1 )), $SLURM_JOB_NUM_NODES node(s) $SLURM_JOB_NODELIST, main $MASTER_ADDR:$MASTER_PORT, $ACCELERATE_CONFIG: $*"

srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 bash -c '
    trap "" USR1  # ignored by the launchers (inherited through exec); the training processes catch it
    touch "$FTKIT_READY_DIR/$SLURM_NODEID"  # from now on this node may be sent USR1
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
    per_node=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
    exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
        --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
        --num_processes $(( per_node * SLURM_NNODES )) \
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
        --rdzv_backend c10d --same_network "$@"
' ftkit "$@" &
srun_pid=$!
status=0
wait "$srun_pid" || status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal interrupts `wait`: keep waiting
    status=0
    wait "$srun_pid" || status=$?
done
if [ -n "$resender" ]; then kill "$resender" 2>/dev/null; fi  # before a requeue: the job id stays the same
rm -rf "$FTKIT_READY_DIR"
if [ "$preempted" = 1 ] && [ "$status" = 0 ] && [ -f "$FTKIT_STOPPED_FILE" ]; then
    echo "[ftkit] $(date +%T) the run stopped at step $(cat "$FTKIT_STOPPED_FILE"); requeueing job $SLURM_JOB_ID"
    rm -f "$FTKIT_STOPPED_FILE"
    scontrol requeue "$SLURM_JOB_ID"
elif [ "$preempted" = 1 ] && [ "$status" = 0 ]; then
    echo "[ftkit] $(date +%T) USR1 came after the last optimizer step: the run finished; not requeued"
fi
echo "[ftkit] $(date +%T) training exited with status $status"
exit "$status"

#!/bin/bash
# Multi-node without SLURM: run this on every node, each with its own --node_rank.
#
#   # node 0 (its address is the rendezvous point):
#   launch/torchrun.sh --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 scripts/qlora_summarize.py --config recipes/phi2_qlora_dialogsum.yaml
#   # node 1:
#   launch/torchrun.sh --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 scripts/qlora_summarize.py --config recipes/phi2_qlora_dialogsum.yaml
#
# Options (before the script): --nnodes N (1), --node_rank R (0), --master_addr HOST (localhost),
# --master_port PORT (29500), --nproc_per_node N (GPUs on this node, else 1),
# --accelerate_config FILE (launch/accelerate/multi_gpu.yaml; e.g. deepspeed_zero3.yaml).
# Everything from the script on is passed through. Rendezvous is c10d at master_addr:master_port.
set -euo pipefail
nnodes=1 node_rank=0 master_addr=localhost master_port=29500 nproc_per_node=""
config="$(dirname "$0")/accelerate/multi_gpu.yaml"  # beside this script, from whatever folder it is run
while [ $# -gt 0 ]; do
    case "$1" in
        --nnodes) nnodes=$2; shift 2 ;;
        --node_rank) node_rank=$2; shift 2 ;;
        --master_addr) master_addr=$2; shift 2 ;;
        --master_port) master_port=$2; shift 2 ;;
        --nproc_per_node) nproc_per_node=$2; shift 2 ;;
        --accelerate_config) config=$2; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        --*) echo "torchrun.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -lt 1 ]; then echo "torchrun.sh: name the script to run, e.g. scripts/classify.py --config ..." >&2; exit 2; fi
if [ -z "$nproc_per_node" ]; then
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    nproc_per_node=$(( gpus > 0 ? gpus : 1 ))
fi
exec accelerate launch --config_file "$config" --num_machines "$nnodes" --machine_rank "$node_rank" \
    --num_processes $(( nproc_per_node * nnodes )) --main_process_ip "$master_addr" \
    --main_process_port "$master_port" --rdzv_backend c10d --same_network "$@"

#!/usr/bin/env bash
# Slurm batch script, elastic: one torchrun agent per node with a c10d rendezvous on the first node. When a node
# is lost the allocation survives (--no-kill), the agents left restart their workers (--max-restarts) on the
# nodes that remain (at least MIN_NODES) and the workers resume from the newest complete checkpoint on the new
# world size (--resume auto; ZeRO 1-3 through DeepSpeed's universal checkpoint). The global batch stays; the
# micro-batch / accumulation layout is re-derived for the new world size.
#   MIN_NODES=2 sbatch --nodes 4 launch/slurm_elastic.sh configs/xxl.json /shared/runs/xxl [--set KEY=VALUE ...]
#SBATCH --job-name=lct_fast_elastic
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --no-kill
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail
config=${1:?usage: sbatch launch/slurm_elastic.sh CONFIG OUT_DIR [--set KEY=VALUE ...]}
out=${2:?usage: sbatch launch/slurm_elastic.sh CONFIG OUT_DIR [--set KEY=VALUE ...]}
shift 2
master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${SLURM_GPUS_ON_NODE:-8}
min=${MIN_NODES:-1}
mkdir -p "$out"
# keep_alive_*: how soon a silent node is dropped from the rendezvous; last_call_timeout: how long the agents
# left wait for latecomers before restarting on fewer nodes.
# The extra arguments travel as arguments ("$@" of the inner shell), so values with spaces survive. The store
# is served by the first node: losing that node ends the job (Slurm --requeue then restarts it).
srun --kill-on-bad-exit=0 bash -c '
  python -m torch.distributed.run --nnodes "$0" --nproc-per-node "$1" --max-restarts 10 \
    --rdzv-backend c10d --rdzv-endpoint "$2:29400" --rdzv-id "$3" \
    --rdzv-conf join_timeout=600,last_call_timeout=30,keep_alive_interval=10,keep_alive_max_attempt=6 \
    launch/train.py --config "$4" --out "$5" --resume auto --set train.collective_timeout_s=300 "${@:6}"' \
  "$min:$SLURM_NNODES" "$gpus" "$master" "$SLURM_JOB_ID" "$config" "$out" "$@"

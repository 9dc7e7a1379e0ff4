#!/usr/bin/env bash
# Slurm batch script: one task per node, the DeepSpeed launcher starting one process per GPU there.
#   sbatch --nodes 4 launch/slurm.sh configs/xxl.json /shared/runs/xxl [--set KEY=VALUE ...]
# A lost node fails the step (collectives time out after train.collective_timeout_s); with --requeue Slurm puts
# the job back in the queue, and the next allocation -- of any size -- resumes from the newest complete
# checkpoint (--resume auto; another world size loads through DeepSpeed's universal checkpoint).
#SBATCH --job-name=lct_fast
#SBATCH --requeue
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail
config=${1:?usage: sbatch launch/slurm.sh CONFIG OUT_DIR [--set KEY=VALUE ...]}
out=${2:?usage: sbatch launch/slurm.sh CONFIG OUT_DIR [--set KEY=VALUE ...]}
shift 2
master=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus=${SLURM_GPUS_ON_NODE:-8}
mkdir -p "$out"
# --no_ssh mode still reads the node list from a hostfile: write it from Slurm's allocation.
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$gpus/" > "$out/hostfile"
# Each node runs its own launcher with the same rendezvous; collectives time out instead of hanging
# if a rank dies (lct_fast.distributed sets the process-group timeout).
srun --kill-on-bad-exit=1 bash -c "
  deepspeed --hostfile $out/hostfile --node_rank \$SLURM_NODEID \
    --master_addr $master --master_port 29500 --no_ssh \
    launch/train.py --config $config --out $out --resume auto $*"

#!/usr/bin/env bash
# Multi-node Megatron-core GPT pretraining with PISA: a torchrun template (run the same command on every node).
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 DATA=/data/tokens CKPT=/ckpt/gpt-pisa \
#       bash scripts/pretrain_gpt_pisa.sh [extra pretrain_gpt_pisa.py flags]
#
# Every flag is explained by `python scripts/pretrain_gpt_pisa.py --help`. Extra arguments are appended, so a later
# flag overrides one set here (argparse keeps the last value). Resuming is automatic when $CKPT holds a checkpoint.
#
# Stopping: Ctrl-C or SIGTERM to torchrun (a scheduler's stop) is forwarded to the ranks, which finish the current
# step, write a final checkpoint and exit; run the same command again to continue. torchrun SIGKILLs ranks still
# running TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds after forwarding (torch's default: 30), so it is raised here to
# give a large checkpoint time to be written; keep the scheduler's own grace period (e.g. Slurm's KillWait) above it.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-2}
CKPT=${CKPT:-checkpoints/gpt-pisa}
TB=${TB:-$CKPT/tensorboard}
DATA_ARGS=()
if [[ -n "${DATA:-}" ]]; then DATA_ARGS=(--data-path "$DATA"); fi
LOAD_ARGS=()
if [[ -f "$CKPT/latest_checkpointed_iteration.txt" ]]; then LOAD_ARGS=(--load "$CKPT"); fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

cd "$(dirname "$0")/.."
exec torchrun \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    scripts/pretrain_gpt_pisa.py \
    --tensor-model-parallel-size "$TP" \
    --num-layers 24 --hidden-size 1024 --num-attention-heads 16 --seq-length 2048 \
    --micro-batch-size 4 --global-batch-size 512 --train-iters 20000 --bf16 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 1000 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \
    --pisa-sigma 30 --pisa-rho 100 --pisa-preconditioner sisa --pisa-other-preconditioner adamw \
    --save "$CKPT" --save-interval 1000 --tensorboard-dir "$TB" --log-interval 10 --eval-interval 500 \
    "${DATA_ARGS[@]}" "${LOAD_ARGS[@]}" "$@"

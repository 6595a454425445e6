#!/usr/bin/env bash
# Quickstart: set up a virtual environment, then pretrain the tiny GPT-2 with PISA on 2 DeepSpeed ZeRO-3 ranks
# for a few minutes on the embedded corpus (the Python standard library's own source, byte-level, built on first use).
#
#   bash scripts/quickstart.sh                     # defaults below; extra arguments go to engine/train.py
#   VENV=/tmp/venv MINUTES=10 bash scripts/quickstart.sh --model llama
#
# Without 2 CUDA GPUs the two ranks run on the CPU (DS_ACCELERATOR=cpu, gloo). Stop it any time with Ctrl-C: a final
# checkpoint is written; the same command plus --resume continues.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV="${VENV:-.venv}"
MINUTES="${MINUTES:-6}"
STEPS="${STEPS:-1500}"
OUT="${OUT:-runs/quickstart}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[quickstart] creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
echo "[quickstart] installing torch==2.13.0 (pinned first: an unpinned torch pulls a multi-GB CUDA build) and pisa_zero"
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[all]"

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)"; then
    export DS_ACCELERATOR=cpu
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    echo "[quickstart] fewer than 2 CUDA GPUs: the 2 ranks run on the CPU"
fi

LOGDIR="$OUT/tensorboard"
echo "[quickstart] TensorBoard logs: $LOGDIR   (open: $VENV/bin/tensorboard --logdir $LOGDIR)"
status=0
deepspeed --num_gpus 2 engine/train.py --deepspeed_config configs/pisa_zero3.json \
    --model gpt2 --size tiny --max-steps "$STEPS" --max-minutes "$MINUTES" --eval-interval 50 \
    --ckpt-interval 100 --out-dir "$OUT" "$@" || status=$?
echo "[quickstart] TensorBoard logs are in $LOGDIR; open them with:"
echo "    $VENV/bin/tensorboard --logdir $LOGDIR"
echo "[quickstart] continue training with: bash scripts/quickstart.sh --resume"
exit "$status"

#!/usr/bin/env bash
# IBPO with TRL on one node: accelerate + DeepSpeed ZeRO-2, NUM_GPUS processes (default 8).
#   bash ibpo_lab/integrations/recipes/run_trl_ibpo.sh [--set key=value ...]
# e.g. --set model=/models/Qwen2.5-7B-Instruct --set per_device_train_batch_size=8
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NUM_GPUS="${NUM_GPUS:-8}"
accelerate launch \
  --config_file "$HERE/accelerate_zero2.yaml" \
  --num_processes "$NUM_GPUS" \
  -m ibpo_lab.integrations.trl \
  --config "${CONFIG:-$HERE/trl_ibpo_gsm8k.yaml}" "$@"

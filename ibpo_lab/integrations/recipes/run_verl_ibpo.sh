#!/usr/bin/env bash
# IBPO with verl on one node (8 GPUs by default). Needs verl==0.9.1 in its own environment
# (it pins torch/vllm/ray) with ibpo_lab installed into it (`pip install -e /path/to/ibpo_lab`)
# and the two-part patch from `python -m ibpo_lab.integrations.verl patch` applied to verl.
#   bash ibpo_lab/integrations/recipes/run_verl_ibpo.sh [hydra overrides ...]
# e.g. actor_rollout_ref.model.path=/models/Qwen2.5-7B-Instruct trainer.n_gpus_per_node=4
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export IBPO_LAB_ROOT="${IBPO_LAB_ROOT:-$(cd "$HERE/../../.." && pwd)}"
export IBPO_VERL_DATA="${IBPO_VERL_DATA:-$IBPO_LAB_ROOT/data/verl_gsm8k}"
TASK="${TASK:-gsm8k}"

# 1. verl's parquet layout (data_source ibpo_lab/<task>, extra_info.example_id) for the task
python -m ibpo_lab.integrations.verl prepare --task "$TASK" --out "$IBPO_VERL_DATA"

# 2. train (Ray starts locally; on a cluster start Ray first and set trainer.nnodes)
python -m verl.trainer.main_ppo \
  --config-path "$HERE" \
  --config-name verl_ibpo_gsm8k \
  trainer.n_gpus_per_node="${NUM_GPUS:-8}" \
  "$@"

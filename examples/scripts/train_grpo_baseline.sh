#!/usr/bin/env bash
# The GRPO baseline: exactly the settings of the EntroPIC scripts with EntroPIC off. MODE picks the
# on-policy hybrid engine (default) or the async off-policy setup; staleness is logged either way.
#
#   DATASET=/data/math.jsonl MODE=off_policy bash examples/scripts/train_grpo_baseline.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/entropic_common.sh"
MODE=${MODE:-on_policy}
case "$MODE" in
  on_policy) MODE_FLAGS=("${ON_POLICY_FLAGS[@]}") ;;
  off_policy) MODE_FLAGS=("${OFF_POLICY_FLAGS[@]}") ;;
  *) echo "MODE must be on_policy or off_policy, got '$MODE'" >&2; exit 2 ;;
esac
RUN_NAME=${RUN_NAME:-grpo_$MODE}
set_run_flags "$RUN_NAME"
start_local_ray_head

ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV_JSON" \
  -- python3 -m openrlhf_entropic.cli.train_ppo_ray \
  "${MODE_FLAGS[@]}" "${RUN_FLAGS[@]}" \
  --entropic.enable false \
  "$@"

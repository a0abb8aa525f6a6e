#!/usr/bin/env bash
# EntroPIC, async off-policy: OpenRLHF's --train.async_enable with a queue of 4 rollout batches
# (half the GPUs generate, half train). The controller measures the current policy's entropy with
# the importance-weighted estimate from vLLM's sampling log-probs, which corrects for stale samples;
# the policy loss itself is unchanged. Samples older than MAX_STALENESS versions are dropped.
#
#   DATASET=/data/math.jsonl bash examples/scripts/train_entropic_offpolicy_async.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/entropic_common.sh"
RUN_NAME=${RUN_NAME:-entropic_off_policy}
MAX_STALENESS=${MAX_STALENESS:-4}  # = the queue size: nothing is dropped unless you lower it
set_run_flags "$RUN_NAME"
start_local_ray_head

ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV_JSON" \
  -- python3 -m openrlhf_entropic.cli.train_ppo_ray \
  "${OFF_POLICY_FLAGS[@]}" "${ENTROPIC_FLAGS[@]}" "${RUN_FLAGS[@]}" \
  --entropic.estimator importance_weighted \
  --entropic.max_staleness "$MAX_STALENESS" \
  "$@"

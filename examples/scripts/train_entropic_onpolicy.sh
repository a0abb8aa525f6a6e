#!/usr/bin/env bash
# EntroPIC, on-policy: OpenRLHF's synchronous hybrid engine (actor and vLLM colocated on every GPU
# of one node), one optimizer step per rollout batch, entropy held at TARGET_ENTROPY.
#
#   DATASET=/data/math.jsonl bash examples/scripts/train_entropic_onpolicy.sh
#
# Settings shared with the other scripts are in entropic_common.sh; extra arguments are appended
# to the trainer's flags (e.g. --entropic.kp 5).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/entropic_common.sh"
RUN_NAME=${RUN_NAME:-entropic_on_policy}
set_run_flags "$RUN_NAME"
start_local_ray_head

ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV_JSON" \
  -- python3 -m openrlhf_entropic.cli.train_ppo_ray \
  "${ON_POLICY_FLAGS[@]}" "${ENTROPIC_FLAGS[@]}" "${RUN_FLAGS[@]}" \
  --entropic.estimator on_policy \
  "$@"

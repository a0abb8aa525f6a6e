#!/usr/bin/env bash
# GRPO vs EntroPIC, on-policy vs async off-policy: submits the four runs one after another (each
# `ray job submit` waits for its job), then builds the compare report from their TensorBoard logs.
#
#   DATASET=/data/math.jsonl bash examples/scripts/compare_on_off_policy.sh
#
# REPORT_DIR gets report.md and the plots. Set SKIP_TRAINING=1 to rebuild the report only.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/entropic_common.sh"
REPORT_DIR=${REPORT_DIR:-$SAVE_ROOT/compare_report}
export DATASET MODEL SAVE_ROOT TENSORBOARD_ROOT TARGET_ENTROPY RAY_ADDRESS

if [[ "${SKIP_TRAINING:-0}" != 1 ]]; then
  RUN_NAME=grpo_on_policy MODE=on_policy bash "$HERE/train_grpo_baseline.sh" "$@"
  RUN_NAME=entropic_on_policy bash "$HERE/train_entropic_onpolicy.sh" "$@"
  RUN_NAME=grpo_off_policy MODE=off_policy bash "$HERE/train_grpo_baseline.sh" "$@"
  RUN_NAME=entropic_off_policy bash "$HERE/train_entropic_offpolicy_async.sh" "$@"
fi

python3 -m openrlhf_entropic.cli.compare --report-only \
  --runs grpo_on_policy="$TENSORBOARD_ROOT/grpo_on_policy" \
  entropic_on_policy="$TENSORBOARD_ROOT/entropic_on_policy" \
  grpo_off_policy="$TENSORBOARD_ROOT/grpo_off_policy" \
  entropic_off_policy="$TENSORBOARD_ROOT/entropic_off_policy" \
  --output-dir "$REPORT_DIR" \
  --target-entropy "$TARGET_ENTROPY"
echo "report: $REPORT_DIR/report.md"

#!/usr/bin/env bash
# EntroPIC on-policy on several nodes. Run it once per node, in this order:
#
#   HEAD_IP=10.0.0.1 bash examples/scripts/train_entropic_multinode.sh head       # on the head node
#   HEAD_IP=10.0.0.1 bash examples/scripts/train_entropic_multinode.sh worker     # on every other node
#   HEAD_IP=10.0.0.1 NUM_NODES=2 DATASET=/data/math.jsonl \
#     bash examples/scripts/train_entropic_multinode.sh submit                   # on the head node
#
# Security: Ray's job API runs arbitrary code for whoever reaches it. The head's dashboard (which
# serves that API) stays on 127.0.0.1, so jobs are submitted from the head node itself (or through
# `ssh -L 8265:127.0.0.1:8265 head`). HEAD_IP and the Ray ports must be on a private network that
# only the cluster's nodes reach; docs/cluster.md covers an authenticating proxy.
set -euo pipefail
ROLE=${1:?usage: train_entropic_multinode.sh head|worker|submit [trainer flags...]}
shift
: "${HEAD_IP:?set HEAD_IP to the private IP address of the head node}"
RAY_PORT=${RAY_PORT:-6379}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

case "$ROLE" in
  head)
    ray start --head --node-ip-address "$HEAD_IP" --port "$RAY_PORT" \
      --dashboard-host 127.0.0.1 --num-gpus "$GPUS_PER_NODE"
    ;;
  worker)
    ray start --address "$HEAD_IP:$RAY_PORT" --num-gpus "$GPUS_PER_NODE" --block
    ;;
  submit)
    source "$(dirname "${BASH_SOURCE[0]}")/entropic_common.sh"
    RUN_NAME=${RUN_NAME:-entropic_on_policy_${NUM_NODES}nodes}
    set_run_flags "$RUN_NAME"
    ray job submit --address="$RAY_ADDRESS" --runtime-env-json="$RUNTIME_ENV_JSON" \
      -- python3 -m openrlhf_entropic.cli.train_ppo_ray \
      "${ON_POLICY_FLAGS[@]}" "${ENTROPIC_FLAGS[@]}" "${RUN_FLAGS[@]}" \
      --entropic.estimator on_policy \
      "$@"
    ;;
  *)
    echo "role must be head, worker or submit, got '$ROLE'" >&2
    exit 2
    ;;
esac

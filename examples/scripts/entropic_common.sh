#!/usr/bin/env bash
# Settings shared by the cluster scripts, sourced by them, so GRPO and EntroPIC runs differ only in
# the EntroPIC flags. Override any variable from the environment. Flags after the
# `openrlhf_entropic.cli.train_ppo_ray` module name are OpenRLHF 0.11.2's own plus our --entropic.*.
#
# Defaults follow the EntroPIC paper's on-policy math run where one 8-GPU node allows it
# (Qwen3-8B-Base, GRPO advantages, lr 1e-6, temperature 0.6, 8 samples per prompt, dual clip 3.0;
# the paper used 512 prompts per step, ROLLOUT_PROMPTS below is smaller to fit one node).

: "${DATASET:?set DATASET to a JSONL/parquet file (or HF dataset) of math prompts with a prompt and an answer column}"
MODEL=${MODEL:-Qwen/Qwen3-8B-Base}
INPUT_KEY=${INPUT_KEY:-prompt}
LABEL_KEY=${LABEL_KEY:-answer}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_NODES=${NUM_NODES:-1}
ROLLOUT_PROMPTS=${ROLLOUT_PROMPTS:-128}
SAMPLES_PER_PROMPT=${SAMPLES_PER_PROMPT:-8}
TARGET_ENTROPY=${TARGET_ENTROPY:-0.1}
SAVE_ROOT=${SAVE_ROOT:-$PWD/runs/cluster}
TENSORBOARD_ROOT=${TENSORBOARD_ROOT:-$SAVE_ROOT/tensorboard}
RAY_ADDRESS=${RAY_ADDRESS:-http://127.0.0.1:8265}
SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPTS_DIR/../.." && pwd)
# The job's working directory is uploaded to the cluster; the reward file is found relative to it.
RUNTIME_ENV_JSON=${RUNTIME_ENV_JSON:-"{\"working_dir\": \"$REPO_ROOT\", \"excludes\": [\"runs\", \".venv\", \".git\"]}"}

# One full rollout batch per optimizer step (train batch = prompts x samples): on-policy updates.
TRAIN_BATCH=$((ROLLOUT_PROMPTS * SAMPLES_PER_PROMPT))

# shellcheck disable=SC2034  # used by the scripts that source this file
GRPO_FLAGS=(
  --actor.model_name_or_path "$MODEL"
  --data.prompt_dataset "$DATASET"
  --data.input_key "$INPUT_KEY"
  --data.label_key "$LABEL_KEY"
  --data.apply_chat_template
  --reward.remote_url examples/python/math_reward_func.py
  --algo.advantage.estimator group_norm
  --algo.kl.init_coef 0
  # Dual-clip PPO at 3.0, as the official EntroPIC run: a negative-advantage token's loss is capped at 3|A|.
  --actor.dual_clip 3.0
  --rollout.batch_size "$ROLLOUT_PROMPTS"
  --rollout.n_samples_per_prompt "$SAMPLES_PER_PROMPT"
  --rollout.temperature 0.6
  --rollout.top_p 1.0
  --rollout.micro_batch_size 8
  --data.max_len 4096
  --rollout.max_new_tokens 3072
  --train.batch_size "$TRAIN_BATCH"
  --train.micro_batch_size 4
  --train.max_epochs 1
  --train.num_episodes 1
  --actor.adam.lr 1e-6
  --actor.num_nodes "$NUM_NODES"
  --ds.zero_stage 3
  --ds.param_dtype bf16
  --ds.packing_samples
  --actor.gradient_checkpointing_enable
  --ckpt.save_steps 50
  --ckpt.load_enable
)

# Synchronous hybrid engine: actor and vLLM share every GPU, vLLM sleeps while the actor trains.
# shellcheck disable=SC2034
ON_POLICY_FLAGS=(
  "${GRPO_FLAGS[@]}"
  --train.colocate_all
  --actor.num_gpus_per_node "$GPUS_PER_NODE"
  --vllm.num_engines $((NUM_NODES * GPUS_PER_NODE))
  --vllm.tensor_parallel_size 1
  --vllm.gpu_memory_utilization 0.6
  --vllm.enable_sleep
  --ds.enable_sleep
)

# Async off-policy: half the GPUs generate, half train; up to 4 rollout batches wait in the queue,
# so a batch can be up to 4 policy versions old when it is trained on.
# shellcheck disable=SC2034
OFF_POLICY_FLAGS=(
  "${GRPO_FLAGS[@]}"
  --train.async_enable
  --train.async_queue_size 4
  --actor.num_gpus_per_node $((GPUS_PER_NODE / 2))
  --vllm.num_engines $((NUM_NODES * GPUS_PER_NODE / 2))
  --vllm.tensor_parallel_size 1
  --vllm.gpu_memory_utilization 0.9
)
# shellcheck disable=SC2034
ENTROPIC_FLAGS=(
  --entropic.enable
  --entropic.target_entropy "$TARGET_ENTROPY"
  --entropic.kp 1.0
  --entropic.ki 0.01
  --entropic.mode high_prob
)

# Per-run output in RUN_FLAGS: checkpoints, final model, and TensorBoard events, which OpenRLHF
# writes to <tensorboard_dir>/<wandb.run_name>, i.e. $TENSORBOARD_ROOT/<run name>.
set_run_flags() {
  local run_name=$1
  RUN_FLAGS=(
    --ckpt.path "$SAVE_ROOT/$run_name/ckpt"
    --ckpt.output_dir "$SAVE_ROOT/$run_name/final"
    --logger.tensorboard_dir "$TENSORBOARD_ROOT"
    --logger.wandb.run_name "$run_name"
  )
}

# Single node: start a local Ray head unless one runs. Its dashboard, which serves the job API that
# runs arbitrary code, listens on 127.0.0.1 only; see docs/cluster.md before exposing it.
start_local_ray_head() {
  if ! ray status >/dev/null 2>&1; then
    ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --num-gpus "$GPUS_PER_NODE"
  fi
}

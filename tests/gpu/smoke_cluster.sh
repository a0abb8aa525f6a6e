#!/usr/bin/env bash
# GPU smoke test of the cluster runtime (not run in CI): 3 training steps of OpenRLHF 0.11.2 with
# the EntroPIC actor, on a tiny random-initialized Llama built here from a config (nothing is
# downloaded), then the same 3 steps async off-policy when a second GPU is free.
#
# Needs: NVIDIA GPU(s), and openrlhf==0.11.2, vllm, flash-attn, ray[default] installed with this
# package (the image of dockerfile/Dockerfile has all of them):
#
#   bash tests/gpu/smoke_cluster.sh            # WORK_DIR defaults to a fresh temporary directory
#
# Passes when each run exits 0 and its TensorBoard log has train/entropic/alpha for 3 steps (the
# async run also train/rollout/staleness_max). It checks plumbing, not learning: 3 steps of a random
# model say nothing about entropy control.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK_DIR=${WORK_DIR:-$(mktemp -d)}
GPUS=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
if [[ "$GPUS" -lt 1 ]]; then
  echo "smoke_cluster: no NVIDIA GPU visible; this test needs one" >&2
  exit 2
fi
python3 -c "import openrlhf, vllm, flash_attn" || {
  echo "smoke_cluster: openrlhf, vllm and flash_attn must be importable (see docs/docker.md)" >&2
  exit 2
}
echo "smoke_cluster: $GPUS GPU(s), work dir $WORK_DIR"

# 1. A tiny model with a character-level tokenizer and chat template, and 12 arithmetic prompts.
python3 - "$WORK_DIR" <<'EOF'
import json
import sys
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

work = Path(sys.argv[1])
characters = list("0123456789+-=*/(){}\\ .,:?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n")
special = ["<unk>", "<s>", "</s>", "<pad>"]
vocab = {token: index for index, token in enumerate(special + characters)}
tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
tokenizer.decoder = decoders.Fuse()  # decode without spaces between characters
hf_tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
)
hf_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    torch_dtype="bfloat16",
)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(work / "tiny_llama", safe_serialization=True)
hf_tokenizer.save_pretrained(work / "tiny_llama")
with open(work / "prompts.jsonl", "w") as file:
    for a in range(12):
        prompt = [{"role": "user", "content": f"{a}+{a + 1}=? Put the answer in \\boxed{{}}."}]
        file.write(json.dumps({"prompt": prompt, "answer": str(2 * a + 1)}) + "\n")
EOF

# Our own cluster, under its own temp dir, so that the cleanup stops exactly it (the ray CLI's stop
# command would kill every Ray cluster on the host, other users'. A short path: Ray's sockets live there.)
RAY_TMP=$(mktemp -d /tmp/ray_smoke.XXXXXX)
ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --num-gpus "$GPUS" --temp-dir "$RAY_TMP"
stop_our_ray() {
  pkill -TERM -f -- "$RAY_TMP" 2>/dev/null || true
  sleep 3
  pkill -KILL -f -- "$RAY_TMP" 2>/dev/null || true
}
trap stop_our_ray EXIT

# 12 prompts, 4 per step: 3 steps. Everything small enough for one GPU.
COMMON=(
  --actor.model_name_or_path "$WORK_DIR/tiny_llama"
  --data.prompt_dataset "$WORK_DIR/prompts.jsonl" --data.input_key prompt --data.label_key answer
  --data.apply_chat_template
  --reward.remote_url examples/python/math_reward_func.py
  --algo.advantage.estimator group_norm --algo.kl.init_coef 0
  --rollout.batch_size 4 --rollout.n_samples_per_prompt 4 --rollout.micro_batch_size 4
  --rollout.max_new_tokens 32 --data.max_len 128 --rollout.temperature 1.0
  --train.batch_size 16 --train.micro_batch_size 4 --train.max_epochs 1 --train.num_episodes 1
  --actor.num_nodes 1 --ds.zero_stage 2 --ds.param_dtype bf16
  --vllm.num_engines 1 --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.3
  --entropic.enable --entropic.target_entropy 1.0 --entropic.kp 1.0 --entropic.ki 0.1
  --logger.tensorboard_dir "$WORK_DIR/tensorboard" --ckpt.save_steps 3
)
RUNTIME_ENV="{\"working_dir\": \"$REPO_ROOT\", \"excludes\": [\"runs\", \".venv\", \".git\"]}"

check_steps() {  # check_steps RUN_NAME TAG...: each tag has 3 steps in the run's TensorBoard log
  python3 - "$WORK_DIR/tensorboard/$1" "${@:2}" <<'EOF'
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(sys.argv[1]).Reload()
for tag in sys.argv[2:]:
    steps = [event.step for event in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []
    assert len(steps) == 3, f"{tag}: expected 3 logged steps, got {steps}"
    print(f"smoke_cluster: {sys.argv[1]} {tag} steps={steps} last={events.Scalars(tag)[-1].value:.4f}")
EOF
}

# 2. On-policy, hybrid engine on one GPU.
ray job submit --address=http://127.0.0.1:8265 --runtime-env-json="$RUNTIME_ENV" \
  -- python3 -m openrlhf_entropic.cli.train_ppo_ray "${COMMON[@]}" \
  --actor.num_gpus_per_node 1 --train.colocate_all --vllm.enable_sleep --ds.enable_sleep \
  --ckpt.path "$WORK_DIR/on_policy/ckpt" --ckpt.output_dir "$WORK_DIR/on_policy/final" \
  --logger.wandb.run_name on_policy --entropic.estimator on_policy
check_steps on_policy train/entropic/alpha train/entropic/entropy

# 3. Async off-policy (vLLM on its own GPU), importance-weighted estimate, staleness logged.
if [[ "$GPUS" -ge 2 ]]; then
  ray job submit --address=http://127.0.0.1:8265 --runtime-env-json="$RUNTIME_ENV" \
    -- python3 -m openrlhf_entropic.cli.train_ppo_ray "${COMMON[@]}" \
    --actor.num_gpus_per_node 1 --train.async_enable --train.async_queue_size 2 \
    --ckpt.path "$WORK_DIR/off_policy/ckpt" --ckpt.output_dir "$WORK_DIR/off_policy/final" \
    --logger.wandb.run_name off_policy --entropic.estimator importance_weighted --entropic.max_staleness 2
  check_steps off_policy train/entropic/alpha train/entropic/entropy_iw train/rollout/staleness_max
else
  echo "smoke_cluster: one GPU only, so the async run (which needs a GPU for vLLM and one for the actor) was skipped"
fi
echo "smoke_cluster: passed"

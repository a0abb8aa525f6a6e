"""Learner actors: DeepSpeed data-parallel training with the EntroPIC step and loss.

Each of `--num-learners` Ray actors is one data-parallel rank (gloo on CPU, NCCL on GPU). Per
optimizer step the `EntroPICStep` measures the current policy's entropy on the mini-batch and sets
alpha, identical on every rank; then the clipped PPO loss with EntroPIC coefficients is
back-propagated. Old log-probs in the PPO ratio are the behavior log-probs.
"""

from __future__ import annotations

import importlib
import itertools
import os
import time
from pathlib import Path

import numpy as np
import torch

from openrlhf_entropic.entropic import (
    EntroPICConfig,
    EntroPICStep,
    Metric,
    all_reduce_sum,
    entropic_policy_loss,
    entropy_from_logits,
    masked_mean,
)
from openrlhf_entropic.reporting.metrics import RunMetric
from openrlhf_entropic.runtime.local.buffer import Sample
from openrlhf_entropic.runtime.local.config import RunConfig
from openrlhf_entropic.runtime.local.generator import Generator, Job, Rollout, pin_to_cores, sample_responses


def collate(samples: list[Sample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt + response into tensors aligned with next-token positions.

    Returns input_ids, attention_mask [batch, seq]; mask, behavior_log_probs [batch, seq - 1]
    (position j scores token j + 1; mask is 1 on response tokens); advantages [batch].
    Built with one scatter per tensor (not one small tensor per sample): it runs on every step.
    """
    prompt_lens = np.array([len(s.prompt_ids) for s in samples])
    response_lens = np.array([len(s.response_ids) for s in samples])
    lengths = prompt_lens + response_lens
    width = int(lengths.max())
    columns = np.arange(width)
    filled = columns < lengths[:, None]  # [batch, seq]: row-major order is the samples' token order
    input_ids = np.full((len(samples), width), pad_token_id, dtype=np.int64)
    input_ids[filled] = list(itertools.chain.from_iterable(s.prompt_ids + s.response_ids for s in samples))
    # Response token k of a sample sits at position prompt_len + k, so it is scored at prompt_len - 1 + k.
    scored = (columns[:-1] >= prompt_lens[:, None] - 1) & (columns[:-1] < lengths[:, None] - 1)  # [batch, seq - 1]
    behavior = np.zeros((len(samples), width - 1), dtype=np.float32)
    behavior[scored] = list(itertools.chain.from_iterable(s.behavior_log_probs for s in samples))
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(filled.astype(np.int64)),
            "mask": torch.from_numpy(scored.astype(np.float32)), "behavior_log_probs": torch.from_numpy(behavior),
            "advantages": torch.tensor([float(s.advantage) for s in samples])}


def policy_outputs(model, batch: dict, temperature: float, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the taken tokens and per-position entropy of the temperature-scaled policy.

    Returns (log_probs [batch, seq - 1] with grad if enabled, entropy [batch, seq - 1] detached).
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    taken = log_probs.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(logits.detach(), temperature=temperature, chunk_size=chunk_size)
    return taken, entropy


def _rows(batch: dict, index: slice) -> dict:
    return {name: tensor[index] for name, tensor in batch.items()}


class Learner:
    """One data-parallel rank: a DeepSpeed engine, the EntroPIC step, and the train/eval/checkpoint methods."""

    def __init__(self, rank: int, world_size: int, rendezvous: str, model_factory, run: RunConfig,
                 entropic: EntroPICConfig, cores: list[int] | None, reward_fn=None):
        """`reward_fn` is needed with --colocate-all only: this rank then also generates (`generate`)."""
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
        pin_to_cores(cores)
        import deepspeed

        # DeepSpeed JIT-builds a shared-memory all-reduce that only its inference path calls: up to
        # ~25 s a start, and a wait forever on the lock file that an interrupted build leaves behind.
        # (`deepspeed.comm.torch` as an attribute is torch itself: hence the module lookup.)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False, init_method=rendezvous, rank=rank, world_size=world_size)
        torch.manual_seed(run.seed + rank)
        model, self.tokenizer = model_factory()
        self.run, self.config = run, entropic
        self.rank, self.world_size = rank, world_size
        micro, mini = run.micro_train_batch_size, run.train_batch_size
        ds_config = {
            "train_batch_size": mini,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": mini // (micro * world_size),
            "gradient_clipping": run.max_norm,
            "zero_optimization": {"stage": run.zero_stage if run.zero_stage is not None else 2 * (world_size > 1)},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=run.actor_learning_rate, weight_decay=0.0)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.entropic = EntroPICStep(entropic, reduce_fn=all_reduce_sum)
        self.version = 0
        self.generator = Generator(None, reward_fn, run, cores, training_model=(self.engine.module, self.tokenizer)) \
            if run.colocate_all else None

    def _measure(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(log_probs, entropy), both [batch, seq - 1], of the current policy over `batch`, micro-batch by micro-batch; no grad."""
        micro = self.run.micro_train_batch_size
        with torch.no_grad():
            parts = [policy_outputs(self.engine, _rows(batch, slice(i, i + micro)), self.run.temperature,
                                    self.run.entropy_chunk_size) for i in range(0, len(batch["advantages"]), micro)]
        log_probs, entropy = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
        return log_probs, entropy

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """Train on this rank's share of one rollout batch (PPO epochs x mini-batches); returns metrics.

        The EntroPIC step runs once per optimizer step. Metrics are averaged over optimizer steps and
        ranks (entropies token-weighted), keyed by `Metric` names, so rank 0's dict speaks for all.
        """
        run, config = self.run, self.config
        started = time.perf_counter()
        batch = {k: v.to(self.engine.device) for k, v in collate(samples, self.tokenizer.pad_token_id).items()}
        micro = run.micro_train_batch_size
        local_mini = run.train_batch_size // self.world_size
        # One micro-batch per optimizer step: the controller reads the entropy of the very forward
        # the loss uses (alpha does not change the forward). Otherwise a no-grad pass measures the
        # whole mini-batch first, so that alpha is set before its first backward.
        single_forward = micro == local_mini
        measured = torch.zeros(4, dtype=torch.float64)  # over all ranks: sums of H * n, H_iw * n, ESS, n
        trained = torch.zeros(3, dtype=torch.float64)  # on this rank: sums of loss, clip and adjusted fractions
        seconds = dict.fromkeys((RunMetric.FORWARD_SECONDS, RunMetric.BACKWARD_SECONDS, RunMetric.OPTIMIZER_SECONDS),
                                0.0)
        updates = 0
        for _ in range(run.max_epochs):
            for start in range(0, len(samples), local_mini):
                mini = _rows(batch, slice(start, start + local_mini))
                clock = time.perf_counter()
                if single_forward:
                    outputs = policy_outputs(self.engine, mini, run.temperature, run.entropy_chunk_size)
                    log_probs, entropy = outputs[0].detach(), outputs[1]
                else:
                    log_probs, entropy = self._measure(mini)
                seconds[RunMetric.FORWARD_SECONDS] += time.perf_counter() - clock
                alpha = self.entropic.update(entropy, log_probs, mini["behavior_log_probs"], mini["mask"])
                step = self.entropic
                measured += torch.tensor([step.entropy * step.tokens, step.estimate * step.tokens, step.ess,
                                          step.tokens], dtype=torch.float64)
                updates += 1
                for i in range(0, local_mini, micro):
                    part = _rows(mini, slice(i, i + micro))
                    clock = time.perf_counter()
                    if not single_forward:
                        outputs = policy_outputs(self.engine, part, run.temperature, run.entropy_chunk_size)
                    log_probs, entropy = outputs
                    loss, loss_metrics = entropic_policy_loss(
                        log_probs, part["behavior_log_probs"], part["advantages"], part["mask"], alpha,
                        mode=config.mode, high_prob_threshold=config.high_prob_threshold,
                        clip_eps_low=run.eps_clip, clip_eps_high=run.eps_clip, entropy=entropy)
                    backward_start = time.perf_counter()
                    seconds[RunMetric.FORWARD_SECONDS] += backward_start - clock
                    self.engine.backward(loss)
                    optimizer_start = time.perf_counter()
                    seconds[RunMetric.BACKWARD_SECONDS] += optimizer_start - backward_start
                    self.engine.step()
                    seconds[RunMetric.OPTIMIZER_SECONDS] += time.perf_counter() - optimizer_start
                    trained += torch.tensor([float(loss.detach()), float(loss_metrics["clip_fraction"]),
                                             float(loss_metrics["adjusted_fraction"])], dtype=torch.float64) * (
                        micro / local_mini)
        trained = all_reduce_sum(trained) / (updates * self.world_size)
        self.version += 1
        controller = self.entropic.metrics()
        return {
            Metric.ENTROPY: float(measured[0] / measured[3]),
            Metric.ENTROPY_IW: float(measured[1] / measured[3]),
            Metric.ESS_FRACTION: float(measured[2] / measured[3]),
            Metric.POLICY_LOSS: float(trained[0]),
            Metric.CLIP_FRACTION: float(trained[1]),
            Metric.ADJUSTED_FRACTION: float(trained[2]),
            **{name: controller[name] for name in (Metric.ALPHA, Metric.P_TERM, Metric.I_TERM, Metric.ENTROPY_TARGET,
                                                   Metric.NONFINITE_SKIPPED)},
            RunMetric.TRAIN_SECONDS: time.perf_counter() - started,
            **seconds,
        }

    def get_weights(self) -> np.ndarray:
        """The full weights as one float32 array [parameters], in `state_dict` order (ZeRO stages 0-2 keep
        full parameters on every rank); `Generator.load_weights` splits it by its own model's layout.

        One numpy array, not a dict of tensors: Ray moves it without pickling its data. A sync of the
        4.2M-parameter benchmark model took about 50 ms as tensors, 13-22 ms as arrays.
        """
        state = self.engine.module.state_dict()
        return torch.cat([tensor.detach().reshape(-1).to("cpu", torch.float32) for tensor in state.values()]).numpy()

    # --colocate-all: this rank is also its own generator (on-policy; it samples between its steps).
    def generate(self, job: Job) -> tuple[Rollout, list[Sample]]:
        """`Generator.generate`, in this process (call with num_returns=2)."""
        return self.generator.generate(job)

    def sync_generator(self, version: int) -> int:
        """Hand the weights just trained (policy `version`) to this rank's generator, in memory. The hf engine
        samples from the training module itself: it only takes the version."""
        if self.generator.shares_weights:
            self.generator.version = version
            return version
        return self.generator.load_weights(self.get_weights(), version)

    @torch.no_grad()
    def evaluate(self, rows: list[dict], correct_fn, seed: int) -> dict[str, float]:
        """Fresh samples of `rows` from the current weights: true entropy, pass@1 and pass@k (RunMetric keys).

        The true entropy is the plain token mean of the current policy's entropy on its own samples.
        `correct_fn(queries, prompts, labels)` judges each sample True/False, or None where its reward
        was NaN/inf: such samples are left out of pass@k, as training leaves them out, and counted.
        """
        from openrlhf_entropic.tasks.data import pass_at_k

        run, n = self.run, self.run.eval_n_samples
        from openrlhf_entropic.runtime.local.engines import HFEngine

        samples = sample_responses(HFEngine(self.engine.module, self.tokenizer), self.tokenizer, rows, n,
                                   run.temperature, run.top_p, run.generate_max_len, seed)
        verdicts = correct_fn([s.text for s in samples], [s.prompt for s in samples], [s.label for s in samples])
        batch = {k: v.to(self.engine.device) for k, v in collate(samples, self.tokenizer.pad_token_id).items()}
        _, entropy = policy_outputs(self.engine.module, batch, run.temperature, run.entropy_chunk_size)
        groups = [[verdicts[g * n + j] for j in range(n)] for g in range(len(rows))]
        judged = [[bool(v) for v in group if v is not None] for group in groups]
        # A prompt with fewer than k judged samples has no pass@k; it is left out (all samples are counted).
        usable = [group for group in judged if len(group) >= run.eval_k]
        return {RunMetric.EVAL_ENTROPY_TRUE: float(masked_mean(entropy, batch["mask"])),
                RunMetric.EVAL_PASS_AT_1: pass_at_k(usable, 1) if usable else float("nan"),
                RunMetric.EVAL_PASS_AT_K: pass_at_k(usable, run.eval_k) if usable else float("nan"),
                RunMetric.EVAL_K: run.eval_k, RunMetric.EVAL_DROPPED_NAN: sum(v is None for v in verdicts)}

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """The AdamW inside DeepSpeed's ZeRO wrapper (stages 1-2), or DeepSpeed's optimizer itself (stage 0)."""
        return getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)

    def save(self, directory: str) -> dict:
        """Write this rank's part of a checkpoint; returns the controller state (plain data).

        Rank 0 writes model.safetensors; every rank writes its optimizer state (its ZeRO partition) and
        RNG state to optim_rank<r>.pt (tensors and plain containers only, read with weights_only=True).
        """
        from safetensors.torch import save_file

        path = Path(directory)
        if self.rank == 0:
            weights = {k: v.detach().cpu().contiguous() for k, v in self.engine.module.state_dict().items()
                       if k != "lm_head.weight" or
                       not self.engine.module.config.tie_word_embeddings}
            save_file(weights, str(path / "model.safetensors"))
        torch.save({"optimizer": self._torch_optimizer().state_dict(), "rng": torch.get_rng_state()},
                   path / f"optim_rank{self.rank}.pt")
        return {"controller": self.entropic.state_dict(), "version": self.version}

    def load(self, directory: str, state: dict) -> None:
        """Restore weights, optimizer partition, RNG, controller and version written by `save`."""
        from safetensors.torch import load_file

        path = Path(directory)
        self.engine.module.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        if hasattr(self.engine.optimizer, "refresh_fp32_params"):  # ZeRO keeps an fp32 master copy of the weights
            self.engine.optimizer.refresh_fp32_params()
        saved = torch.load(path / f"optim_rank{self.rank}.pt", weights_only=True)
        self._torch_optimizer().load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        self.entropic.load_state_dict(state["controller"])
        self.version = state["version"]

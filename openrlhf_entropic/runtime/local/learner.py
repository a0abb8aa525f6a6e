"""Learner actors: DeepSpeed ZeRO-2 data-parallel training with the EntroPIC controller and loss.

Each of `--num-learners` Ray actors is one data-parallel rank (gloo on CPU, NCCL on GPU). Per
optimizer step a rank measures the current policy's entropy on its share of the mini-batch (the
importance-weighted estimate when samples are stale), the controller averages it over ranks
(token-weighted) so every rank uses the same alpha, then the clipped PPO loss with EntroPIC
coefficients is back-propagated. Old log-probs in the PPO ratio are the behavior log-probs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from openrlhf_entropic.entropic import (
    EntroPICConfig,
    EntroPICController,
    all_reduce_sum,
    entropic_policy_loss,
    entropy_from_logits,
    importance_weighted_entropy,
    masked_mean,
)
from openrlhf_entropic.runtime.local.generator import sample_responses


def collate(samples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad prompt + response into tensors aligned with next-token positions.

    Returns input_ids, attention_mask [batch, seq]; mask, behavior_log_probs [batch, seq - 1]
    (position j scores token j + 1; mask is 1 on response tokens); advantages [batch].
    """
    width = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width - 1)
    behavior = torch.zeros(len(samples), width - 1)
    for row, sample in enumerate(samples):
        prompt_len, response_len = len(sample["prompt_ids"]), len(sample["response_ids"])
        input_ids[row, : prompt_len + response_len] = torch.tensor(sample["prompt_ids"] + sample["response_ids"])
        attention_mask[row, : prompt_len + response_len] = 1
        mask[row, prompt_len - 1 : prompt_len - 1 + response_len] = 1
        behavior[row, prompt_len - 1 : prompt_len - 1 + response_len] = torch.tensor(sample["behavior_log_probs"])
    advantages = torch.tensor([float(s.get("advantage", 0.0)) for s in samples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask,
            "behavior_log_probs": behavior, "advantages": advantages}


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
    """One data-parallel rank: a DeepSpeed engine, the controller, and the train/eval/checkpoint methods."""

    def __init__(self, rank: int, world_size: int, master_port: int, model_factory, settings: dict,
                 entropic: dict, seed: int):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(master_port))
        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
        torch.set_num_threads(1)
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        torch.manual_seed(seed + rank)
        model, self.tokenizer = model_factory()
        self.settings = settings  # temperature, lr, micro_batch, mini_batch, max_epochs, clip_eps, ...
        self.entropic = EntroPICConfig(**entropic)
        self.rank, self.world_size = rank, world_size
        micro, mini = settings["micro_train_batch_size"], settings["train_batch_size"]
        ds_config = {
            "train_batch_size": mini,
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": mini // (micro * world_size),
            "gradient_clipping": settings["max_norm"],
            "zero_optimization": {"stage": 2},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings["actor_learning_rate"], weight_decay=0.0)
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.controller = EntroPICController.from_config(self.entropic, reduce_fn=all_reduce_sum)
        self.version = 0

    def _estimate(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(plain token mean, estimate the controller sees, ESS) of the current policy's entropy; no grad."""
        cfg, micro = self.entropic, self.settings["micro_train_batch_size"]
        with torch.no_grad():
            parts = [policy_outputs(self.engine, _rows(batch, slice(i, i + micro)), self.settings["temperature"],
                                    cfg.entropy_chunk_size) for i in range(0, len(batch["advantages"]), micro)]
        log_probs, entropy = (torch.cat(tensors) for tensors in zip(*parts, strict=True))
        plain = masked_mean(entropy, batch["mask"])
        if cfg.estimator == "on_policy":
            return plain, plain, batch["mask"].sum()
        estimate, ess = importance_weighted_entropy(entropy, log_probs, batch["behavior_log_probs"], batch["mask"],
                                                    log_clip=cfg.iw_log_clip, min_ess_fraction=cfg.min_ess_fraction,
                                                    level=cfg.iw_level)
        return plain, estimate, ess

    def train_step(self, samples: list[dict]) -> dict:
        """Train on this rank's share of one rollout batch (PPO epochs x mini-batches); returns metrics.

        The controller is updated once per optimizer step. Metrics are averaged over ranks
        (entropies token-weighted), so rank 0's dict speaks for all.
        """
        cfg, settings = self.entropic, self.settings
        started = time.perf_counter()
        batch = {k: v.to(self.engine.device) for k, v in collate(samples, self.tokenizer.pad_token_id).items()}
        micro = settings["micro_train_batch_size"]
        local_mini = settings["train_batch_size"] // self.world_size
        totals = torch.zeros(8, dtype=torch.float64)  # sums of: H*n, H_iw*n, n, ess, loss, clip, adjusted, updates
        for _ in range(settings["max_epochs"]):
            for start in range(0, len(samples), local_mini):
                mini = _rows(batch, slice(start, start + local_mini))
                plain, estimate, ess = self._estimate(mini)
                tokens = mini["mask"].sum()
                alpha = self.controller.update(estimate, weight=tokens) if cfg.enable else 0.0
                for i in range(0, local_mini, micro):
                    part = _rows(mini, slice(i, i + micro))
                    log_probs, entropy = policy_outputs(self.engine, part, settings["temperature"],
                                                        cfg.entropy_chunk_size)
                    loss, loss_metrics = entropic_policy_loss(
                        log_probs, part["behavior_log_probs"], part["advantages"], part["mask"], alpha,
                        mode=cfg.mode, high_prob_threshold=cfg.high_prob_threshold,
                        clip_eps_low=settings["eps_clip"], clip_eps_high=settings["eps_clip"], entropy=entropy)
                    self.engine.backward(loss)
                    self.engine.step()
                    share = micro / local_mini
                    totals[4:7] += torch.tensor([float(loss.detach()), float(loss_metrics["clip_fraction"]),
                                                 float(loss_metrics["adjusted_fraction"])]) * share
                totals[:4] += torch.tensor([float(plain * tokens), float(estimate * tokens), float(tokens), float(ess)])
                totals[7] += 1
        totals = all_reduce_sum(totals)
        self.version += 1
        ranks_updates = float(totals[7])  # updates summed over ranks
        return {
            "entropy": float(totals[0] / totals[2]),
            "entropy_iw": float(totals[1] / totals[2]),
            "ess_fraction": float(totals[3] / totals[2]),
            "policy_loss": float(totals[4] / ranks_updates),
            "clip_fraction": float(totals[5] / ranks_updates),
            "adjusted_fraction": float(totals[6] / ranks_updates),
            "alpha": self.controller.alpha if cfg.enable else 0.0,
            "p_term": self.controller.p_term if cfg.enable else 0.0,
            "i_term": self.controller.i_term if cfg.enable else 0.0,
            "target_entropy": self.controller.target,
            "nonfinite_skipped": self.controller.nonfinite_skipped,
            "version": self.version,
            "train_seconds": time.perf_counter() - started,
        }

    def get_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the full weights (ZeRO-2 keeps full parameters on every rank)."""
        return {name: tensor.detach().cpu().clone() for name, tensor in self.engine.module.state_dict().items()}

    @torch.no_grad()
    def evaluate(self, rows: list[dict], correct_fn, n_samples: int, k: int, sampling: dict) -> dict:
        """Fresh samples of `rows` from the current weights: true entropy, pass@1 and pass@k.

        The true entropy is the plain token mean of the current policy's entropy on its own samples.
        `correct_fn(queries, prompts, labels) -> list[bool]` judges each sample.
        """
        from openrlhf_entropic.tasks.data import pass_at_k

        samples = sample_responses(self.engine.module, self.tokenizer, rows, n_samples, sampling["temperature"],
                                   sampling["top_p"], sampling["max_new_tokens"])
        verdicts = correct_fn([s["text"] for s in samples], [s["prompt"] for s in samples],
                              [s["label"] for s in samples])
        batch = {k: v.to(self.engine.device) for k, v in collate(samples, self.tokenizer.pad_token_id).items()}
        _, entropy = policy_outputs(self.engine.module, batch, sampling["temperature"], self.entropic.entropy_chunk_size)
        correct = [[bool(verdicts[g * n_samples + j]) for j in range(n_samples)] for g in range(len(rows))]
        return {"entropy_true": float(masked_mean(entropy, batch["mask"])),
                "pass_at_1": pass_at_k(correct, 1), "pass_at_k": pass_at_k(correct, k)}

    def save(self, directory: str) -> dict:
        """Write this rank's part of a checkpoint; returns the controller state (plain data).

        Rank 0 writes model.safetensors; every rank writes its ZeRO-2 optimizer partition and RNG
        state to optim_rank<r>.pt (tensors and plain containers only, read with weights_only=True).
        """
        from safetensors.torch import save_file

        path = Path(directory)
        if self.rank == 0:
            weights = {k: v.contiguous() for k, v in self.get_weights().items() if k != "lm_head.weight" or
                       not self.engine.module.config.tie_word_embeddings}
            save_file(weights, str(path / "model.safetensors"))
        torch.save({"optimizer": self.engine.optimizer.optimizer.state_dict(), "rng": torch.get_rng_state()},
                   path / f"optim_rank{self.rank}.pt")
        return {"controller": self.controller.state_dict(), "version": self.version}

    def load(self, directory: str, state: dict) -> None:
        """Restore weights, optimizer partition, RNG, controller and version written by `save`."""
        from safetensors.torch import load_file

        path = Path(directory)
        self.engine.module.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        self.engine.optimizer.refresh_fp32_params()  # ZeRO keeps an fp32 master copy of the weights
        saved = torch.load(path / f"optim_rank{self.rank}.pt", weights_only=True)
        self.engine.optimizer.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])
        self.controller.load_state_dict(state["controller"])
        self.version = state["version"]

"""Forward + backward time of `entropic_policy_loss` against a plain clipped PPO loss.

Both get the same [batch, seq] tensors; the plain loss is a minimal PPO loss that also reports
its clip fraction, as a trainer would. The variants are interleaved round by round, so that
drift in machine speed hits all of them alike; the ratios of the fastest rounds (and of the
medians) are printed as JSON.

    python benchmarks/loss_overhead.py            # [64, 4096], the goal's size
"""

import argparse
import json
import statistics
import time

import torch

from openrlhf_entropic.entropic import entropic_policy_loss


def plain_ppo_loss(log_probs, old_log_probs, advantages, mask, clip_eps=0.2):
    """Plain clipped PPO: token mean over the mask, plus the clip fraction."""
    ratio = torch.exp(log_probs - old_log_probs)
    surrogate = ratio * advantages
    clipped_surrogate = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages
    loss = (-torch.min(surrogate, clipped_surrogate) * mask).sum() / mask.sum()
    with torch.no_grad():
        clip_fraction = ((clipped_surrogate < surrogate).float() * mask).sum() / mask.sum()
    return loss, {"clip_fraction": clip_fraction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    shape = (args.batch, args.seq)
    log_probs = (-torch.rand(shape, device=device) * 2).requires_grad_(True)
    old_log_probs = log_probs.detach() + 0.1 * torch.randn(shape, device=device)
    # GRPO-style advantages, one per sequence: [batch] for ours, [batch, 1] broadcast for plain PPO.
    advantages = torch.randn(args.batch, device=device)
    mask = (torch.rand(shape, device=device) > 0.1).float()
    entropy = torch.rand(shape, device=device) * 2

    variants = {"plain_ppo": lambda: plain_ppo_loss(log_probs, old_log_probs, advantages.unsqueeze(-1), mask)}
    for mode in ("high_prob", "all_tokens", "covariance"):
        variants[mode] = lambda mode=mode: entropic_policy_loss(
            log_probs, old_log_probs, advantages, mask, args.alpha, mode=mode, entropy=entropy
        )

    def step(loss_fn):
        start = time.perf_counter()
        loss, metrics = loss_fn()
        loss.backward()
        float(loss.detach()), [float(v) for v in metrics.values()]  # force the values, as logging would
        if device.type == "cuda":
            torch.cuda.synchronize()
        log_probs.grad = None
        return time.perf_counter() - start

    for loss_fn in variants.values():  # warm-up
        step(loss_fn)
    seconds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, loss_fn in variants.items():
            seconds[name].append(step(loss_fn))

    # The fastest round is the least disturbed by other processes; the median is reported beside it.
    best = {name: min(values) for name, values in seconds.items()}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    overhead = {name: round(best[name] / best["plain_ppo"] - 1, 4) for name in variants if name != "plain_ppo"}
    overhead_median = {
        name: round(median[name] / median["plain_ppo"] - 1, 4) for name in variants if name != "plain_ppo"
    }
    report = {
        "benchmark": "entropic_policy_loss forward+backward",
        "shape": list(shape),
        "device": args.device,
        "rounds": args.rounds,
        "best_ms": {name: round(value * 1000, 3) for name, value in best.items()},
        "median_ms": {name: round(value * 1000, 3) for name, value in median.items()},
        "overhead_vs_plain_ppo": overhead,
        "overhead_vs_plain_ppo_medians": overhead_median,
        "goal": "overhead <= 0.05",
        "goal_met": {name: value <= 0.05 for name, value in overhead.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""PPO's losses and estimates: per-token rewards with a KL penalty, GAE, whitening, the clipped
value loss, and the approximate KL and explained variance it logs.

Shapes as in losses/policy.py: N samples, T tokens, L = T-1 predicted tokens. Entry t of an
(N, L) tensor is about token t+1 of the sequence: its log-prob, its reward, and the critic's
value of the state before it (the prefix up to token t). ``mask`` (N, L) marks the response tokens.
"""
from __future__ import annotations

import torch

from losses.policy import k3_kl
from model.logprobs import last_token_index

KL_ESTIMATORS = ("k1", "k3")


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from tokens sampled from pi: k1 = logp - ref (unbiased,
    can be negative), or k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, never negative)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        return k3_kl(logps, ref_logps)
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """(N, L) rewards: -kl_coef * kl on every response token, plus each sample's score (N,) on
    its last response token. Zero outside the mask; a sample with no response token gets nothing."""
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    has = mask.any(-1)
    last = last_token_index(mask)
    rewards[has, last[has]] += scores[has].to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, each (N, L), zero outside the mask.

    Right to left over the response tokens, with V_{t+1} = 0 after the last one:
        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V_t.
    lam = 1 gives the discounted return minus V_t; lam = 0 the one-step TD error.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards.to(values.dtype) * m
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages[:, t] = next_adv
        next_value = values[:, t]          # 0 outside the response: the episode ends there
    return advantages, (advantages + values) * m


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None,
                  eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries only (unbiased variance), 0 elsewhere.

    shift_mean=False keeps the mean (only rescales). all_sum: sums a tensor over processes
    (core.runtime.DistInfo.all_sum) so the statistics are those of the whole distributed batch.
    """
    all_sum = all_sum or (lambda t: t)
    m = mask.to(x.dtype)
    count, total = all_sum(torch.stack([m.sum(), (x * m).sum()])).unbind()
    mean = total / count.clamp(min=1)
    var = all_sum(((x - mean) ** 2 * m).sum()) / (count - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float, normaliser=None):
    """PPO's value loss: the critic's values pulled to the returns, clipped around the rollout's.

    values, old_values, returns, mask: (N, L); values are the critic's now, old_values its
    values at the rollout, returns the GAE returns; mask 1 on response tokens.

        V_clip = V_old + clamp(V - V_old, -clip, clip)
        loss   = 0.5 * sum over mask of max((V - R)^2, (V_clip - R)^2) / normaliser
                 (clip <= 0: 0.5 * sum of (V - R)^2 / normaliser, no clipping)

    normaliser: what the token sum is divided by (default: this batch's response tokens; the
    step's, from losses.policy.step_normalisers, under accumulation or torchrun).
    Returns (loss, metrics) with value_clip_ratio, the share of response tokens where the
    clipped term is the larger (0 with no clipping).
    """
    shapes = {tuple(t.shape) for t in (values, old_values, returns, mask)}
    if len(shapes) != 1 or values.dim() != 2:
        raise ValueError(f"clipped_value_loss expects four (N, L) tensors of one shape, got {sorted(shapes)}")
    m = mask.to(values.dtype)
    normaliser = m.sum().clamp(min=1) if normaliser is None else normaliser
    unclipped = (values - returns) ** 2
    if clip <= 0:
        return 0.5 * (unclipped * m).sum() / normaliser, {"value_clip_ratio": torch.zeros((), device=values.device)}
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    loss = 0.5 * (torch.maximum(unclipped, clipped) * m).sum() / normaliser
    return loss, {"value_clip_ratio": masked_mean((clipped > unclipped).to(values.dtype), mask).detach()}


def approx_kl(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of (r - 1) - log r, r = pi / pi_old: an estimate of
    KL(pi_old || pi) from tokens sampled from pi_old, never negative, 0 when nothing moved."""
    log_ratio = (logps - old_logps).detach()
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over response tokens: 1 for a perfect critic, 0 for one that
    predicts the mean, negative for worse (0 when the returns do not vary)."""
    var_r = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    diff = returns - values
    var_d = masked_mean((diff - masked_mean(diff, mask)) ** 2, mask)
    return float(1 - var_d / var_r) if var_r > 0 else 0.0

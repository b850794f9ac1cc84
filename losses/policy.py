"""The policy-gradient losses of GPO, GRPO and PPO's policy, with group advantages and KL.

Shapes: P prompts, G samples per prompt, N = P*G samples (grouped: rows g*G..g*G+G-1 answer
prompt g), T tokens, L = T-1 predicted tokens (model.logprobs.token_logprobs's layout).
"""
from __future__ import annotations

import torch

from model.logprobs import masked_reduce

ADV_EPS = 1e-4
# --loss_type of the group scripts (policy_loss); PPO takes the aggregations only.
LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo", "cispo", "seed_sum")
AGGREGATION_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
IS_LEVELS = ("token", "sequence")
CISPO_EPSILON_HIGH = 5.0                                        # MiniMind's default cap of the CISPO ratio


def group_advantages(rewards: torch.Tensor, G: int, baseline: str = "mean", scale: str = "group",
                     level: str = "sample", eps: float = ADV_EPS) -> torch.Tensor:
    """Advantages (N,) of rewards (N,), G samples per prompt.

    level "sample" (GRPO / RLOO): A_i = r_i - b_i, with b_i the group mean (baseline "mean") or
      the mean of the group's other G-1 rewards (baseline "loo"), then divided by the group's
      reward std (scale "group"), the whole batch's (scale "batch"), or not at all ("none").
    level "group" (the seed's literal A_g): each group's mean reward m_g, z-scored across the
      groups of the batch, (m_g - mean(m)) / (std(m) + eps), shared by all its responses.
    Stds are the unbiased ones (torch.std). A group whose rewards are all equal has advantage 0.
    """
    if rewards.dim() != 1 or rewards.numel() % G:
        raise ValueError(f"rewards must be (N,) with N a multiple of G={G}, got {tuple(rewards.shape)}")
    if G < 2:
        raise ValueError("group advantages need at least 2 samples per prompt")
    r = rewards.float().view(-1, G)                                          # (P, G)
    if level == "group":
        means = r.mean(1)                                                    # (P,)
        spread = means.std() if means.numel() > 1 else torch.zeros(())
        centred = means - means.mean()
        adv = centred / (spread + eps) if scale != "none" else centred
        return adv.repeat_interleave(G)
    if level != "sample":
        raise ValueError(f"level must be 'sample' or 'group', got {level!r}")
    if baseline == "mean":
        adv = r - r.mean(1, keepdim=True)
    elif baseline == "loo":
        adv = (r - r.mean(1, keepdim=True)) * G / (G - 1)                   # r_i - mean of the others
    else:
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    if scale == "group":
        adv = adv / (r.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (r.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return adv.reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 >= 0, 0 where equal."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def loss_normaliser(loss_mask: torch.Tensor, loss_type: str, G: int = 1, max_gen_len: int | None = None) -> torch.Tensor:
    """The count ``loss_type`` divides its summed loss by, over the rows of loss_mask (N, L).

    dapo, cispo, bnpo: response tokens in the loss;  grpo: sequences in the loss (rows with a token
    in it);  dr_grpo: those sequences x max_gen_len;  seed_sum: those sequences / G (groups).
    A 0-d float tensor; step_normalisers sums it over a whole optimizer step.
    """
    m = loss_mask.to(torch.float32)
    if loss_type in ("dapo", "cispo", "bnpo"):
        return m.sum()
    rows = m.amax(-1).sum() if m.numel() else m.sum()
    if loss_type == "grpo":
        return rows
    if loss_type == "dr_grpo":
        if not max_gen_len:
            raise ValueError("dr_grpo divides by sequences x max_gen_len: give max_gen_len")
        return rows * max_gen_len
    if loss_type == "seed_sum":
        return rows / G
    raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")


def summed_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, loss_type: str, seq_reduce: str = "sum") -> torch.Tensor:
    """The numerator of ``loss_type``: per-token losses (N, L) summed over loss_mask (N, L) as the
    type weighs them. grpo sums each sequence's token mean; seed_sum each sequence's token sum
    (or mean, seq_reduce "mean"); every other type sums the tokens themselves."""
    if loss_type == "grpo":
        return masked_reduce(per_token, loss_mask, "mean").sum()
    if loss_type == "seed_sum":
        return masked_reduce(per_token, loss_mask, seq_reduce).sum()
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    return (per_token * loss_mask.to(per_token.dtype)).sum()


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, epsilon: float = 0.2, epsilon_high: float | None = None,
                ref_logps: torch.Tensor | None = None, beta: float = 0.0, loss_type: str = "dapo", G: int = 1, *,
                importance_sampling_level: str = "token", normaliser: torch.Tensor | float | None = None,
                max_gen_len: int | None = None, seq_reduce: str = "sum"):
    """The policy-gradient loss of the group methods (and PPO's), one of ``loss_type``, plus
    beta * k3 KL to the reference.

    logps, old_logps, ref_logps, response_mask: (N, L); advantages: (N,), one per sample, or
    (N, L), one per token (PPO's GAE). response_mask is the loss mask: tokens off it count nowhere.

    Ratio: token level r_t = exp(logp_t - old_t); sequence level (GSPO, Zheng et al. 2025)
    s = exp(mean over the sequence's tokens of (logp_t - old_t)), one per sequence for all its tokens.
    Per token, with A the advantage and sg() stop-gradient:
        every type but cispo  l_t = max(-A r, -A clip(r, 1 - epsilon, 1 + epsilon_high))   (PPO-clip)
        cispo                 l_t = -sg(min(r, epsilon_high)) A logp_t      (MiniMax-M1; MiniMind, TRL)
    then l_t += beta k3_t, and the loss is summed_loss / normaliser:
        dapo     sum of l_t / response tokens              (DAPO: each token weighs the same)
        cispo    as dapo
        grpo     sum over sequences of their token mean / sequences    (DeepSeekMath)
        bnpo     as dapo, but over the local batch only (TRL's bnpo)
        dr_grpo  sum of l_t / (sequences x max_gen_len), a constant    (Dr. GRPO, Liu et al. 2025)
        seed_sum sum over sequences of their token sum (seq_reduce "mean": token mean) / groups:
                 the chapter's -E_x[sum_i A_i log pi(y_i|x)]
    normaliser None: this batch's own count (loss_normaliser); under gradient accumulation or
    torchrun the caller passes the whole optimizer step's count (step_normalisers), so
    the micro-batch losses add up to the loss of the whole step. These match TRL's
    GRPOTrainer._compute_loss per type. epsilon_high None: epsilon, or 5.0 under cispo (MiniMind's
    cap). Returns (loss, metrics) with clip_ratio (share of loss
    tokens where the clip, or cispo's cap, is active) and kl (mean k3 per loss token).
    """
    shapes = {tuple(t.shape) for t in (logps, old_logps, response_mask, *([] if ref_logps is None else [ref_logps]))}
    if len(shapes) != 1 or logps.dim() != 2 or advantages.shape not in (logps.shape[:1], logps.shape):
        raise ValueError(f"policy_loss expects (N, L) log-probs and mask of one shape and (N,) or (N, L) advantages, "
                         f"got {sorted(shapes)} and {tuple(advantages.shape)}")
    if epsilon_high is None:
        epsilon_high = CISPO_EPSILON_HIGH if loss_type == "cispo" else epsilon
    mask = response_mask.to(logps.dtype)
    log_ratio = logps - old_logps.detach()
    if importance_sampling_level == "sequence":
        log_ratio = (masked_reduce(log_ratio, mask, "mean"))[:, None]                 # (N, 1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)                                                      # (N, L) or (N, 1)
    adv = advantages.detach().to(logps.dtype)
    adv = adv[:, None] if adv.dim() == 1 else adv
    if loss_type == "cispo":
        capped = torch.clamp(ratio, max=epsilon_high).detach()
        per_token = -capped * adv * logps
        active = (ratio > epsilon_high).expand_as(logps)
    else:
        unclipped = -adv * ratio
        clipped = -adv * torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
        per_token = torch.maximum(unclipped, clipped).expand_as(logps)
        active = (clipped > unclipped).expand_as(logps)
    count = mask.sum().clamp(min=1)
    metrics = {}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps.detach())
        if beta:
            per_token = per_token + beta * kl
        metrics["kl"] = (kl.detach() * mask).sum() / count
    if normaliser is None:
        normaliser = loss_normaliser(mask, loss_type, G, max_gen_len)
    loss = summed_loss(per_token, mask, loss_type, seq_reduce) / torch.as_tensor(normaliser).clamp(min=1e-8)
    with torch.no_grad():
        metrics["clip_ratio"] = (active.to(mask.dtype) * mask).sum() / count
    return loss, metrics


def step_normalisers(loss_masks: list[torch.Tensor], loss_type: str, G: int = 1, max_gen_len: int | None = None,
                     all_sum=None, world_size: int = 1) -> list[torch.Tensor]:
    """The normaliser of each micro-batch of one optimizer step, from their loss masks (n_k, L),
    computed before any backward.

    Every type but bnpo: the step's count (loss_normaliser) over all its micro-batches and, through
    ``all_sum`` (core.runtime.DistInfo.all_sum), all ranks, divided by the number of ranks because DDP
    averages the ranks' gradients. The micro-batch losses then add up, over micro-batches and
    ranks, to the loss of the whole step: its gradient does not depend on how the step is cut.
    bnpo is local by definition: each micro-batch's own token count times the number of
    micro-batches (the mean of the micro-batches' token means, as TRL's bnpo under accumulation).
    """
    counts = [loss_normaliser(m, loss_type, G, max_gen_len) for m in loss_masks]
    if loss_type == "bnpo":
        return [c.clamp(min=1) * len(loss_masks) for c in counts]
    total = torch.stack(counts).sum()
    if all_sum is not None:
        total = all_sum(total)
    return [total.clamp(min=1e-8) / world_size] * len(loss_masks)


def overlong_penalty(lengths: torch.Tensor, max_gen_len: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of response lengths (N,) in tokens:
    0 up to max_gen_len - cache, then falling linearly, (max_gen_len - cache - |y|) / cache, to -1
    at max_gen_len (no response is longer: sampling stops there). Added to the reward."""
    if cache < 1 or cache > max_gen_len:
        raise ValueError(f"the overlong cache must be in [1, max_gen_len={max_gen_len}], got {cache}")
    return ((max_gen_len - cache - lengths.float()) / cache).clamp(max=0.0)


def group_loss_mask(response_mask: torch.Tensor, ended: torch.Tensor, zero_std: torch.Tensor,
                    mask_truncated: bool, drop_zero_std: bool) -> torch.Tensor:
    """The loss mask (N, L): response_mask (N, L) without the rows of responses that never ended
    (ended (N,) False; with mask_truncated) and of groups with no reward signal (zero_std (N,)
    True; with drop_zero_std). Those rows count nowhere: not in the loss, not in its normaliser."""
    keep = torch.ones(response_mask.shape[0], dtype=torch.bool, device=response_mask.device)
    if mask_truncated:
        keep &= ended.to(keep.device)
    if drop_zero_std:
        keep &= ~zero_std.to(keep.device)
    return response_mask * keep[:, None].to(response_mask.dtype)


def zero_std_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """(N,) bool: the samples of groups whose G rewards (N,) are all equal (no signal: advantage 0)."""
    return (rewards.float().view(-1, G).std(1) < 1e-8).repeat_interleave(G)

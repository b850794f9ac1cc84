"""The losses of preference pairs: DPO and its variants, SimPO, RPO's NLL term, and the
Bradley-Terry loss of a reward model. Tensors in, ``(loss, metrics)`` out.

Shapes: B batch (pairs). Log-probs are sequence-level, l(y) or l(y)/|y| (see model/logprobs.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "apo_zero")   # with a reference: dpo_loss
REFERENCE_FREE_LOSS_TYPES = ("simpo",)                                # without one: simpo_loss


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Direct Preference Optimization loss, mean over the batch.

    policy_*_logps, ref_*_logps: (B,) log-probs of the chosen (y+) and rejected (y-) responses
    under the policy and the frozen reference.

        h = (l_pol(y+) - l_pol(y-)) - (l_ref(y+) - l_ref(y-))
        sigmoid  -(1-e) log s(beta h) - e log s(-beta h)      (e = label_smoothing: cDPO; e=0: the seed's DPO)
        robust   [-(1-e) log s(beta h) + e log s(-beta h)] / (1-2e)
        ipo      (h - 1/(2 beta))^2
        hinge    relu(1 - beta h)
        apo_zero (1 - s(beta (l_pol(y+) - l_ref(y+)))) + s(beta (l_pol(y-) - l_ref(y-)))   (APO-zero,
                 D'Oosterlinck et al. 2024, as TRL: each side on its own, chosen up, rejected down)

    Returns (loss, metrics) with metrics (all detached, batch means):
    rewards/chosen = beta (l_pol(y+) - l_ref(y+)), rewards/rejected likewise, rewards/margins
    their difference, rewards/accuracies the share of pairs with margin > 0, and
    logps/chosen, logps/rejected the policy's log-probs.
    """
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1 or policy_chosen_logps.dim() != 1:
        raise ValueError(f"dpo_loss expects four (B,) tensors of one shape, got {sorted(map(tuple, shapes))}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    ref_chosen_logps = ref_chosen_logps.detach().to(policy_chosen_logps.dtype)
    ref_rejected_logps = ref_rejected_logps.detach().to(policy_chosen_logps.dtype)
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # (B,)
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "apo_zero":
        losses = (1 - torch.sigmoid(beta * (policy_chosen_logps - ref_chosen_logps))
                  + torch.sigmoid(beta * (policy_rejected_logps - ref_rejected_logps)))
    else:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    with torch.no_grad():
        metrics = _pair_metrics(beta * (policy_chosen_logps - ref_chosen_logps),
                                beta * (policy_rejected_logps - ref_rejected_logps),
                                policy_chosen_logps, policy_rejected_logps)
    return losses.mean(), metrics


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               beta: float, gamma: float = 0.5):
    """SimPO loss (Meng et al. 2024), reference-free, mean over the batch.

    policy_*_logps: (B,) length-normalised log-probs l(y)/|y| (the mean per response token) of
    the chosen (y+) and rejected (y-) responses under the policy; gamma the target margin.

        simpo    -log s(beta (l(y+)/|y+| - l(y-)/|y-|) - gamma)

    (TRL writes it as -log s(beta (margin - gamma/beta)), the same.) Returns (loss, metrics) with
    the keys of dpo_loss, the rewards being the policy's own: rewards/chosen = beta l(y+)/|y+|,
    rewards/rejected likewise.
    """
    if policy_chosen_logps.shape != policy_rejected_logps.shape or policy_chosen_logps.dim() != 1:
        raise ValueError(f"simpo_loss expects two (B,) tensors of one shape, got "
                         f"{tuple(policy_chosen_logps.shape)} and {tuple(policy_rejected_logps.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    losses = -F.logsigmoid(beta * (policy_chosen_logps - policy_rejected_logps) - gamma)
    with torch.no_grad():
        metrics = _pair_metrics(beta * policy_chosen_logps, beta * policy_rejected_logps,
                                policy_chosen_logps, policy_rejected_logps)
    return losses.mean(), metrics


def rpo_nll(chosen_token_mean_logps: torch.Tensor) -> torch.Tensor:
    """The NLL term of RPO (Pang et al. 2024; TRL's rpo_alpha): the negative log-likelihood per
    token of each chosen response, -l(y+)/|y+|, averaged over the batch. The training loss is
    preference loss + alpha * rpo_nll. (TRL averages over all chosen tokens of the batch at
    once; here every pair weighs the same, so micro-batches of equal size add up exactly.)"""
    return -chosen_token_mean_logps.mean()


def _pair_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps) -> dict:
    """The logged batch means of a pairwise loss (see dpo_loss)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().mean(),
        "logps/rejected": policy_rejected_logps.detach().mean(),
    }


def reward_model_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      margin: torch.Tensor | None = None, center_coef: float = 0.0):
    """Bradley-Terry loss of a reward model, mean over the batch.

    chosen_rewards, rejected_rewards: (B,) scalar rewards r(x, y+), r(x, y-); margin: (B,)
    optional required gap (Llama 2's margin loss).

        loss = -log s(r+ - r- - margin) + center_coef * (r+ + r-)^2

    The second term (center_coef > 0) keeps the rewards centred on 0. Returns (loss, metrics)
    with accuracy (share of pairs with r+ > r-), rewards/chosen, rewards/rejected,
    rewards/margins (batch means, detached).
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(f"reward_model_loss expects two (B,) tensors, got {tuple(chosen_rewards.shape)} "
                         f"and {tuple(rejected_rewards.shape)}")
    gap = chosen_rewards - rejected_rewards
    if margin is not None:
        gap = gap - margin.to(gap.dtype)
    loss = -F.logsigmoid(gap).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    with torch.no_grad():
        metrics = {
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        }
    return loss, metrics
